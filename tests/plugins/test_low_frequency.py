"""`low_frequency`: the trigger has no spectral energy above its cut-off and stays within its
budget, it pushes the surrogate toward the target more than random noise of the same norm, the
poisoning uses it (and the same one every time), `evaluate` applies the stored trigger, and the
attack implants a backdoor end to end."""

import importlib.metadata

import numpy as np
import pytest
import torch

import bench
from bench.registry import ENTRY_POINT_GROUP, build_registry
from bench_plugins.attacks.low_frequency import (
    LowFrequency,
    add_trigger,
    low_pass,
    low_pass_mask,
    project,
    search_trigger,
    target_rate,
)
from bench_plugins.testing import run_suite_file, trained_digits_model, write_suite

QUICK = {"surrogate_width": 8, "surrogate_epochs": 3, "search_steps": 50}


def energy_outside(v: torch.Tensor, cutoff: float) -> float:
    """Share of the spectral energy of v [C, H, W] at frequencies beyond `cutoff` cycles per
    image, computed in float64 with numpy's own frequency grid."""
    spectrum = np.abs(np.fft.fft2(v.double().numpy())) ** 2
    k_h = np.fft.fftfreq(v.shape[-2]) * v.shape[-2]
    k_w = np.fft.fftfreq(v.shape[-1]) * v.shape[-1]
    outside = np.hypot(k_h[:, None], k_w[None, :]) > cutoff + 1e-9
    return float(spectrum[..., outside].sum() / spectrum.sum())


@pytest.fixture(scope="module")
def clean_digits():
    """A small CNN trained on clean digits, on one torch thread for the module's tests."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield trained_digits_model(epochs=3, width=8)
    torch.set_num_threads(threads)


def test_the_projection_removes_every_frequency_beyond_the_cutoff_and_bounds_the_peak():
    generator = torch.Generator().manual_seed(0)
    noise = torch.rand((3, 32, 32), generator=generator) - 0.5
    assert energy_outside(noise, 2.0) > 0.9  # white noise: nearly all energy is high
    for cutoff in (0.0, 1.0, 2.0, 5.5):
        v = project(noise, cutoff, epsilon=0.05)
        assert energy_outside(v, cutoff) < 1e-10
        assert v.abs().max() <= 0.05 + 1e-7
        assert torch.allclose(low_pass(v, cutoff), v, atol=1e-7)  # already band-limited
    # the kept bins: a disc of radius 2 holds 13 frequencies; radius 0 only the mean
    assert int(low_pass_mask(32, 32, 2.0).sum()) == 13 and int(low_pass_mask(8, 8, 0.0).sum()) == 1
    assert torch.allclose(low_pass(noise, 0.0), noise.mean(dim=(1, 2), keepdim=True).expand_as(noise), atol=1e-6)
    # a band-limited input within budget is left as it is
    rows = torch.arange(16, dtype=torch.float32)
    wave = 0.1 * torch.cos(2 * torch.pi * rows / 16)[:, None].expand(16, 16)[None]
    assert torch.allclose(project(wave, 1.0, epsilon=0.2), wave, atol=1e-6)
    assert energy_outside(project(wave, 0.5, epsilon=0.2), 0.5) < 1e-10  # 1 cycle is above a 0.5 cut-off


def test_the_trigger_is_smooth_bounded_and_pushes_the_surrogate_to_the_target_more_than_noise(clean_digits):
    model, splits, _ = clean_digits
    train, test = splits.train, splits.test
    for target in (0, 3):
        search = train.x[(train.y != target).nonzero().squeeze(1)[:100]]
        held_out = test.x[test.y != target]  # images the search never saw
        for epsilon, check in ((0.2, "log_prob"), (0.6, "rate")):
            v = search_trigger(model, search, target, epsilon=epsilon, cutoff=2.0, steps=60, step_size=0.02)
            assert v.shape == (1, 8, 8) and v.dtype == torch.float32
            assert energy_outside(v, 2.0) < 1e-10
            assert v.abs().max() <= epsilon + 1e-6
            generator = torch.Generator().manual_seed(target)
            noises = [torch.randn(v.shape, generator=generator) for _ in range(5)]
            noises += [low_pass(torch.randn(v.shape, generator=generator), 2.0) for _ in range(5)]
            noises = [n * (v.norm() / n.norm()) for n in noises]  # the trigger's L2 norm

            def score(perturbation):
                x = add_trigger(held_out, perturbation).float() / 255
                if check == "rate":
                    return target_rate(model, x, target)
                with torch.no_grad():
                    return model(x).log_softmax(dim=1)[:, target].mean().item()

            best_noise = max(score(n) for n in noises)
            if check == "rate":  # at a large budget the argmax moves: on digits 0.20-0.25 against at most 0.08
                assert score(v) > best_noise + 0.1, (target, score(v), best_noise)
            else:  # at the default budget the clean model barely flips, but the target's probability rises
                assert score(v) > best_noise + 0.4, (target, score(v), best_noise)


def test_poisoning_adds_the_stored_trigger_to_relabelled_non_target_images_the_same_way_each_run(clean_digits):
    _, splits, _ = clean_digits
    train = splits.train
    ctx = bench.RunContext(device=torch.device("cpu"), seed=0, num_classes=10, horizontal_flip=False)
    attack = LowFrequency(LowFrequency.Options(poison_rate=0.1, target_class=4, **QUICK))
    poisoned, state = attack.poison(train, ctx)
    index = state["poisoned_indices"]
    assert len(index) == round(0.1 * len(train)) and (train.y[index] != 4).all() and (poisoned.y[index] == 4).all()
    trigger = state["trigger"]
    assert energy_outside(trigger, 2.0) < 1e-10 and trigger.abs().max() <= 0.2 + 1e-6
    assert trigger.abs().max() > 0.1  # the search used its budget
    expected = np.clip(np.rint(train.x[index].double().numpy() + 255 * trigger.double().numpy()), 0, 255)
    assert np.array_equal(poisoned.x[index].numpy(), expected.astype(np.uint8))
    untouched = torch.ones(len(train), dtype=torch.bool)
    untouched[index] = False
    assert torch.equal(poisoned.x[untouched], train.x[untouched])
    assert torch.equal(poisoned.y[untouched], train.y[untouched])
    assert state["surrogate_target_rate"] >= state["surrogate_clean_target_rate"]
    again, state_again = attack.poison(train, ctx)  # seeded: the same surrogate, trigger and images
    assert torch.equal(state_again["trigger"], trigger) and torch.equal(again.x, poisoned.x)
    other_seed = bench.RunContext(device=torch.device("cpu"), seed=1, num_classes=10, horizontal_flip=False)
    assert not torch.equal(attack.poison(train, other_seed)[1]["trigger"], trigger)


def test_evaluate_applies_the_stored_trigger_to_the_other_classes_only():
    seen = []

    class AnswersTarget(torch.nn.Module):
        def forward(self, x):
            seen.append(x)
            return torch.nn.functional.one_hot(torch.full((len(x),), 1), 10).float()

    labels = torch.arange(20) % 10
    test = bench.ImageData(torch.full((20, 1, 8, 8), 120, dtype=torch.uint8), labels)
    trigger = project(torch.randn((1, 8, 8), generator=torch.Generator().manual_seed(0)), 2.0, 0.2)
    attack = LowFrequency(LowFrequency.Options(target_class=1))
    ctx = bench.RunContext(device=torch.device("cpu"), seed=0, num_classes=10)
    assert attack.evaluate(AnswersTarget(), test, ctx, {"trigger": trigger}) == {"asr": 1.0, "ra": 0.0}
    (x,) = seen
    assert len(x) == 18
    expected = np.clip(np.rint(120 + 255 * trigger.double().numpy()), 0, 255)
    assert np.array_equal(np.rint(x.numpy() * 255), np.broadcast_to(expected, (18, 1, 8, 8)))


def test_an_unknown_surrogate_is_refused_before_the_run(clean_digits):
    _, splits, _ = clean_digits
    with pytest.raises(bench.BenchError, match="small_cn"):
        LowFrequency(LowFrequency.Options(surrogate_model="small_cn")).check_dataset(splits)


def test_a_suite_with_low_frequency_implants_a_backdoor_on_digits(tmp_path, one_cpu_thread):
    registry = build_registry(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
    if "low_frequency" not in registry.names("attack"):
        registry.register(LowFrequency, plugin="test", package="tests")
    attack = {"name": "low_frequency", **QUICK}
    suite = write_suite(tmp_path / "s.toml", attacks=[attack], defenses=["none"], training={"epochs": 8})
    (row,) = run_suite_file(suite, tmp_path, registry=registry)
    assert row["status"] == "ok", row["error"]
    assert row["metrics"]["asr"] > 0.9  # on digits: 0.98
    assert row["metrics"]["clean_acc"] > 0.9
