"""WaNet: the warp field (fixed per seed, smooth, of the paper's size), the batches the attacker
trains on (warped and relabelled, noise-warped with labels kept, the rest clean), evaluation on
float warps with the all-to-all mapping y -> (y + 1) mod K, and an end-to-end run on digits."""

import importlib.metadata

import pytest
import torch
from torch import nn

from bench import BenchError, ImageData, OptionError, RunContext
from bench.options import parse_options
from bench.registry import ENTRY_POINT_GROUP, build_registry
from bench_plugins.attacks.trigger_backdoor import TargetMode
from bench_plugins.attacks.wanet import WaNet, displacement, identity_grid, noisy_grid, warp, warp_grid
from bench_plugins.testing import run_suite_file, write_suite

BICUBIC_L1 = 1.375**2  # largest sum of |weights| of torch's bicubic kernel (a = -0.75), per axis 1.375


def cpu(seed: int = 0) -> RunContext:
    return RunContext(device=torch.device("cpu"), seed=seed, num_classes=10)


def images(count: int, size: int = 32, channels: int = 3, seed: int = 0) -> ImageData:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (count, channels, size, size), dtype=torch.uint8, generator=generator)
    return ImageData(x, torch.arange(count) % 10)


def neighbour_steps(field: torch.Tensor) -> torch.Tensor:
    """|differences| between vertically and horizontally adjacent entries of a [1, H, W, 2] field."""
    return torch.cat([(field[:, 1:] - field[:, :-1]).flatten(), (field[:, :, 1:] - field[:, :, :-1]).flatten()]).abs()


def roughness(field: torch.Tensor) -> float:
    """Mean neighbour step relative to the mean |value|: small for a smooth field, ~1 for noise."""
    return (neighbour_steps(field).mean() / field.abs().mean()).item()


def test_the_warp_field_is_fixed_by_the_attack_seed_and_poison_leaves_the_training_set_alone():
    train = images(20)
    attack = WaNet()
    poisoned, state = attack.poison(train, cpu(0))
    assert poisoned is train  # no training image is poisoned once and for all
    assert state["poisoned_indices"].dtype == torch.int64 and len(state["poisoned_indices"]) == 0
    assert state["grid"].shape == (1, 32, 32, 2)
    assert torch.equal(state["grid"], attack.poison(train, cpu(0))[1]["grid"])
    other = attack.poison(train, cpu(1))[1]["grid"]
    assert (other - state["grid"]).abs().max() > 0.01
    # the control grid: k x k uniform draws normalised to mean |offset| 1 (so |values| < 2 here)
    control = state["control_grid"]
    assert control.shape == (1, 2, 4, 4)
    assert control.abs().mean().item() == pytest.approx(1.0)
    assert (control > 0).any() and (control < 0).any()


def test_a_zero_strength_warp_is_the_identity_in_the_right_axis_order():
    x = torch.rand(3, 2, 6, 11)  # not square, not symmetric: a swapped x/y grid would fail
    assert torch.allclose(warp(x, identity_grid(6, 11, "cpu")), x, atol=1e-5)
    control = torch.rand(1, 2, 4, 4) * 2 - 1
    assert torch.allclose(warp(x, warp_grid(control, 6, 11, s=0.0, grid_rescale=1.0)), x, atol=1e-5)


def test_the_warp_moves_pixels_by_s_over_the_image_size_times_the_smooth_control_grid():
    _, state = WaNet(WaNet.Options(s=0.5)).poison(images(2), cpu(0))
    control, grid = state["control_grid"], state["grid"]
    offsets = displacement(control, 32, 32, s=0.5)
    # inside the image no clamping happens: the stored grid is the identity plus these offsets
    inside = (slice(None), slice(2, -2), slice(2, -2))
    assert torch.allclose(grid[inside] - identity_grid(32, 32, "cpu")[inside], offsets[inside], atol=1e-6)
    # at the corners the bicubic upsampling (align_corners) passes the control points through
    corners = offsets[0, [0, 0, -1, -1], [0, -1, 0, -1]]  # [4, (x, y)]
    control_corners = control[0, :, [0, 0, -1, -1], [0, -1, 0, -1]].T
    assert torch.allclose(corners, 0.5 / 32 * control_corners, atol=1e-6)
    # size: mean |offset| about s / size; none beyond s / size * max|control| * the kernel's l1 norm
    assert 0.5 * 0.5 / 32 < offsets.abs().mean() < 1.5 * 0.5 / 32
    assert offsets.abs().max() <= 0.5 / 32 * control.abs().max() * BICUBIC_L1 + 1e-7
    # linear in s and in 1 / size
    assert torch.allclose(displacement(control, 32, 32, s=1.0), 2 * offsets, atol=1e-7)
    finer = displacement(control, 64, 64, s=0.5).abs().max().item()
    assert finer == pytest.approx(offsets.abs().max().item() / 2, rel=0.05)
    # smooth: neighbouring pixels move alike (k = 4 control points over 32 pixels), unlike the
    # per-pixel noise of the noise mode, whose neighbours are unrelated
    identity = identity_grid(32, 32, "cpu")
    noise = noisy_grid(identity, 1, torch.Generator().manual_seed(0)) - identity
    assert roughness(offsets) < 0.2
    assert roughness(noise[inside]) > 1.0
    # and no step is abrupt: a neighbour step stays a fraction of a control-grid step, which
    # spans (32 - 1) / (4 - 1) pixels (a nearest-neighbour upsampling would jump a whole one)
    control_step = neighbour_steps(control.permute(0, 2, 3, 1)).max()
    assert neighbour_steps(offsets).max() < 0.3 * 0.5 / 32 * control_step


def test_a_warped_image_changes_all_over_not_in_a_patch():
    _, state = WaNet().poison(images(2), cpu(0))
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    changed = (warp(x, state["grid"]) - x).abs() > 1 / 255
    assert changed.float().mean() > 0.6
    # every 8 x 8 block of the 4 x 4 tiling holds changed pixels of every image
    blocks = changed.any(dim=1).view(4, 4, 8, 4, 8).any(dim=(2, 4))
    assert blocks.all()
    # a warp moves content: the image stays close (no added pattern), far less than a patch's 255
    assert (warp(x, state["grid"]) - x).abs().mean() < 0.15


def test_training_batches_hold_warped_relabelled_then_noise_warped_then_clean_images():
    attack = WaNet(WaNet.Options(poison_rate=0.1, target_class=7))
    _, state = attack.poison(images(2, size=8, channels=1), cpu(0))
    x = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.arange(64) % 10
    out_x, out_y = attack.training_batch(None, x.clone(), y.clone(), torch.Generator().manual_seed(2), cpu(0), state)
    warped, noise = 6, 12  # int(0.1 * 64) and int(6 * cross_ratio 2), as the reference
    assert out_x.shape == x.shape and out_y.shape == y.shape
    assert torch.allclose(out_x[:warped], warp(x[:warped], state["grid"]))
    assert (out_y[:warped] == 7).all()
    noisy = out_x[warped : warped + noise]
    assert torch.equal(out_y[warped : warped + noise], y[warped : warped + noise])  # noise mode keeps labels
    fixed = warp(x[warped : warped + noise], state["grid"])
    assert ((noisy - fixed).abs().flatten(1).amax(1) > 1e-3).all()  # not the trigger warp...
    assert ((noisy - x[warped : warped + noise]).abs().flatten(1).amax(1) > 1e-3).all()  # ...nor clean
    assert torch.equal(out_x[warped + noise :], x[warped + noise :])
    assert torch.equal(out_y[warped + noise :], y[warped + noise :])


def test_all_to_all_relabels_each_warped_image_to_the_next_class_wrapping_around():
    attack = WaNet(WaNet.Options(poison_rate=0.25, cross_ratio=0.0, target_mode=TargetMode.ALL_TO_ALL))
    _, state = attack.poison(images(2, size=8, channels=1), cpu(0))
    y = torch.tensor([9, 0, 3, 8, 1, 2, 4, 5, 6, 7, 9, 9, 9, 9, 9, 9])
    _, out_y = attack.training_batch(None, torch.rand(16, 1, 8, 8), y, torch.Generator(), cpu(0), state)
    assert out_y[:4].tolist() == [0, 1, 4, 9]  # (y + 1) mod 10; WaNet's code kept y (issue #18)
    assert torch.equal(out_y[4:], y[4:])


def test_a_rate_below_one_image_a_batch_poisons_one_image_in_that_share_of_batches():
    attack = WaNet(WaNet.Options(poison_rate=0.1, target_class=0))
    _, state = attack.poison(images(2, size=8, channels=1), cpu(0))
    generator = torch.Generator().manual_seed(0)
    x, y = torch.rand(5, 1, 8, 8), torch.tensor([1, 2, 3, 4, 5])
    poisoned = 0
    for _ in range(400):  # 0.1 * 5 = 0.5 expected images: one image in half of the batches
        out_x, out_y = attack.training_batch(None, x, y, generator, cpu(0), state)
        if out_y[0] == 0:
            poisoned += 1
            assert not torch.equal(out_x[1:3], x[1:3]) and torch.equal(out_x[3:], x[3:])  # 2 noise-mode
        else:
            assert torch.equal(out_x, x) and torch.equal(out_y, y)
    assert 160 < poisoned < 240


class WarpReader(nn.Module):
    """Knows the clean and trigger-warped versions of some images: answers `backdoor(y)` for a
    trigger-warped image, and y for a clean or any other (noise-warped) one."""

    def __init__(self, clean: torch.Tensor, warped: torch.Tensor, labels: torch.Tensor, backdoor):
        super().__init__()
        self.clean, self.warped, self.labels, self.backdoor = clean.flatten(1), warped.flatten(1), labels, backdoor

    def forward(self, x):
        x, exact = x.flatten(1), "donot_use_mm_for_euclid_dist"
        to_warped = torch.cdist(x, self.warped, compute_mode=exact)
        nearest = torch.cdist(x, torch.cat([self.clean, self.warped]), compute_mode=exact).argmin(1) % len(self.labels)
        labels = self.labels[nearest]
        is_warped = to_warped.min(1).values < 1e-4
        return nn.functional.one_hot(torch.where(is_warped, self.backdoor(labels), labels), 10).float()


def test_evaluate_scores_warped_floats_non_target_images_all_to_one_and_next_class_all_to_all():
    test = images(40, size=8, channels=1, seed=3)
    ctx = cpu(0)
    for mode in TargetMode:
        attack = WaNet(WaNet.Options(target_class=2, target_mode=mode))
        _, state = attack.poison(test, ctx)
        clean = test.x.float() / 255
        warped = warp(clean, state["grid"])  # floats: evaluate never rounds the warp to uint8
        backdoored = WarpReader(clean, warped, test.y, lambda y: attack.poisoned_labels(y, 10))
        assert attack.evaluate(backdoored, test, ctx, state) == {"asr": 1.0, "ra": 0.0, "noise_accuracy": 1.0}
        keeps_labels = WarpReader(clean, warped, test.y, lambda y: y)  # what WaNet's buggy mapping rewarded
        assert attack.evaluate(keeps_labels, test, ctx, state) == {"asr": 0.0, "ra": 1.0, "noise_accuracy": 1.0}
    # all-to-one counts only the 36 images outside the target class: a model answering 2 for a
    # warped image but 3 for a warped image of class 2 scores 1.0 (36 / 40 if class 2 counted)
    attack = WaNet(WaNet.Options(target_class=2))
    _, state = attack.poison(test, ctx)
    misses_on_target = WarpReader(clean, warped, test.y, lambda y: torch.where(y == 2, 3, 2))
    assert attack.evaluate(misses_on_target, test, ctx, state)["asr"] == 1.0


def test_options_that_cannot_work_are_refused_before_anything_runs():
    with pytest.raises(OptionError, match="asks for 1.2 of every batch"):
        parse_options(WaNet.Options, {"poison_rate": 0.4}, "suite.toml [[attacks]] wanet")
    with pytest.raises(BenchError, match="target_class 10 does not exist"):
        WaNet(WaNet.Options(target_class=10)).poison(images(2), cpu(0))


def test_end_to_end_on_digits_the_warp_is_learned_and_the_noise_mode_keeps_other_warps_harmless(
    tmp_path, one_cpu_thread
):
    registry = build_registry(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
    assert registry.get("attack", "wanet").cls is WaNet  # the installed plugin
    # reference defaults (k 4, s 0.5, pratio 0.1, cross_ratio 2); 40 epochs of small_cnn width 8
    # (measured over seeds 0-2: ASR 0.90-0.97, clean 0.97-0.99, noise-mode accuracy 0.87-0.96;
    # without the noise mode ASR 1.0 and noise-mode accuracy 0.13-0.17: any warp then triggers)
    suite = write_suite(
        tmp_path / "s.toml",
        attacks=[{"name": "wanet"}, {"name": "wanet", "cross_ratio": 0.0}],
        defenses=["none"],
        training={"epochs": 40},
    )
    rows = {row["attack_label"]: row for row in run_suite_file(suite, tmp_path, registry=registry)}
    assert all(row["status"] == "ok" for row in rows.values()), [row["error"] for row in rows.values()]
    with_noise = next(row["metrics"] for label, row in rows.items() if "cross_ratio" not in label)
    without_noise = next(row["metrics"] for label, row in rows.items() if "cross_ratio" in label)
    assert with_noise["asr"] > 0.8 and with_noise["clean_acc"] > 0.95
    assert with_noise["noise_accuracy"] > 0.75
    assert without_noise["asr"] > 0.9
    assert without_noise["noise_accuracy"] < with_noise["noise_accuracy"] - 0.3
