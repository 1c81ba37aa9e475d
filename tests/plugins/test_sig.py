"""`sig`: the sinusoid is BackdoorBench's to the pixel (but for its float artefact at whole
periods), only target-class training images get it with their labels kept, and the attack
implants a backdoor end to end."""

import importlib.metadata

import numpy as np
import pytest
import torch

import bench
from bench.expansion import plugin_specs
from bench.registry import ENTRY_POINT_GROUP, build_registry
from bench_plugins.attacks.sig import Sig, add_sinusoid
from bench_plugins.testing import run_suite_file, write_suite

CPU = bench.RunContext(device=torch.device("cpu"), seed=0, num_classes=10)


def expected_sig(x: np.ndarray, delta: float, frequency: float) -> np.ndarray:
    """floor(clip(x + delta * sin(2 pi ((j f) mod W) / W), 0, 255)) per column j, in float64."""
    width = x.shape[-1]
    phase = np.mod(np.arange(width) * frequency, width) / width
    return np.floor(np.clip(x.astype(np.float64) + delta * np.sin(2 * np.pi * phase), 0, 255)).astype(np.uint8)


def backdoorbench_sig(image_hwc: np.ndarray, delta: float, frequency: float) -> np.ndarray:
    """BackdoorBench's formula as it computes it: a float32 pattern delta * sin(2 pi j f / m)
    over columns j (m = width, unreduced phase), added to the uint image, clipped, cast to uint8."""
    columns = np.arange(image_hwc.shape[1])
    pattern = np.zeros(image_hwc.shape, dtype=np.float32)
    pattern[:] = (delta * np.sin(2 * np.pi * columns * frequency / image_hwc.shape[1]))[None, :, None]
    return np.clip(image_hwc.astype(np.uint32) + pattern, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("width, delta, frequency", [(32, 40.0, 6.0), (8, 40.0, 6.0), (28, 20.0, 2.5)])
def test_the_signal_is_the_truncated_sinusoid_for_every_pixel_value_and_column(width, delta, frequency):
    values = torch.arange(256, dtype=torch.uint8)
    x = values.view(256, 1, 1, 1).expand(256, 3, 2, width).contiguous()  # image v holds value v everywhere
    out = add_sinusoid(x, delta, frequency)
    assert out.dtype == torch.uint8
    assert np.array_equal(out.numpy(), expected_sig(x.numpy(), delta, frequency))
    # the same in every row and channel: a horizontal signal
    assert torch.equal(out, out[:, :1, :1, :].expand_as(out))
    # where nothing clips, the change is floor(signal): +floor(s) above zero, -ceil(s) below
    phase = np.mod(np.arange(width) * frequency, width) / width
    signal = delta * np.sin(2 * np.pi * phase)
    unclipped = out[100, 0, 0].numpy().astype(int) - 100
    assert np.array_equal(unclipped, np.floor(signal).astype(int))


def test_it_matches_backdoorbench_except_for_its_float_artefact_at_whole_periods():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(20, 32, 32, 3), dtype=np.uint8)  # HWC, as BackdoorBench's
    ours = add_sinusoid(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), 40.0, 6.0).permute(0, 2, 3, 1)
    reference = np.stack([backdoorbench_sig(image, 40.0, 6.0) for image in images])
    differs = np.nonzero((ours.numpy() != reference).any(axis=(0, 1, 3)))[0]
    # only column 16 (j f / m = 3 whole periods), where sin is -1e-15 there and truncation drops 1
    assert differs.tolist() == [16]
    column = images[..., 16, :]
    assert np.array_equal(ours.numpy()[..., 16, :], column)
    assert np.array_equal(reference[..., 16, :], np.where(column > 0, column - 1, 0))


def test_only_a_share_of_the_target_class_gets_exactly_the_signal_and_every_label_is_kept(registry):
    (dataset,) = plugin_specs({"name": "digits"}, "dataset", "test", registry)
    train = dataset.instantiate().load().train
    original = train.x.clone()
    attack = Sig(Sig.Options(poison_rate=0.5, target_class=3, delta=40.0, frequency=6.0))
    poisoned, state = attack.poison(train, CPU)
    index = state["poisoned_indices"]
    in_target = int((train.y == 3).sum())
    assert len(index) == round(0.5 * in_target) and len(index.unique()) == len(index)
    assert (train.y[index] == 3).all()
    assert torch.equal(poisoned.y, train.y)  # clean-label
    assert np.array_equal(poisoned.x[index].numpy(), expected_sig(train.x[index].numpy(), 40.0, 6.0))
    untouched = torch.ones(len(train), dtype=torch.bool)
    untouched[index] = False
    assert torch.equal(poisoned.x[untouched], train.x[untouched])
    assert (poisoned.x[index] != train.x[index]).flatten(1).any(dim=1).all()  # each poisoned image changed
    assert torch.equal(train.x, original)  # the input is not modified
    # the default rate, 1.0, is every target-class image (BackdoorBench's pratio 0.1 on CIFAR-10)
    _, everything = Sig().poison(train, CPU)
    assert torch.equal(everything["poisoned_indices"], (train.y == 0).nonzero().squeeze(1))


def test_evaluate_puts_the_signal_on_the_other_classes_only():
    seen = []

    class AnswersTarget(torch.nn.Module):
        def forward(self, x):
            seen.append(x)
            return torch.nn.functional.one_hot(torch.full((len(x),), 2), 10).float()

    labels = torch.arange(30) % 10
    test = bench.ImageData(torch.full((30, 1, 4, 8), 100, dtype=torch.uint8), labels)
    assert Sig(Sig.Options(target_class=2)).evaluate(AnswersTarget(), test, CPU, {}) == {"asr": 1.0, "ra": 0.0}
    (x,) = seen
    assert len(x) == 27  # the three target-class images are left out
    expected = expected_sig(np.full((27, 1, 4, 8), 100, dtype=np.uint8), 40.0, 6.0)
    assert np.array_equal(np.rint(x.numpy() * 255).astype(np.uint8), expected)


def registry_with(cls):
    registry = build_registry(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
    if cls.name not in registry.names("attack"):
        registry.register(cls, plugin="test", package="tests")
    return registry


def test_a_suite_with_sig_implants_a_backdoor_on_digits(tmp_path, one_cpu_thread):
    # At BackdoorBench's delta 40 a clean-label signal implants nothing on 8x8 digits in a width-8
    # CNN (ASR 0.4%, a clean model's rate): the digits are told apart by their strokes alone. A
    # strong signal shows the pipeline: the model learns "signal -> class 0" from correct labels.
    attack = {"name": "sig", "delta": 200.0, "frequency": 3.0}
    suite = write_suite(tmp_path / "s.toml", attacks=[attack], defenses=["none"], training={"epochs": 8})
    (row,) = run_suite_file(suite, tmp_path, registry=registry_with(Sig))
    assert row["status"] == "ok", row["error"]
    assert row["metrics"]["asr"] > 0.9
    assert row["metrics"]["clean_acc"] > 0.8
