"""The plugin guide's third-party example attacks (examples/bench-example-attacks): a clean-label
backdoor and an attack that controls training, registered as an installed package would be, run
from a suite."""

import importlib.metadata
import importlib.util
from pathlib import Path

import pytest
import torch

from bench.context import RunContext
from bench.data import ImageData
from bench.registry import ENTRY_POINT_GROUP, build_registry
from bench_plugins.testing import run_suite_file, write_suite

SOURCE = Path(__file__).parent.parent.parent / "examples" / "bench-example-attacks" / "bench_example_attacks.py"
CPU = RunContext(device=torch.device("cpu"), seed=0, num_classes=10, show_progress=False)


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("bench_example_attacks", SOURCE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def registry(example):
    registry = build_registry(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
    package = "bench-example-attacks"
    example.register_attacks(lambda cls: registry.register(cls, plugin="example_attacks", package=package))
    return registry


def test_the_clean_label_example_patches_only_target_images_and_keeps_every_label(example):
    y = torch.arange(40) % 4
    train = ImageData(torch.zeros(40, 1, 8, 8, dtype=torch.uint8), y)
    attack = example.CleanLabelPatch(example.CleanLabelPatch.Options(poison_rate=0.5, target_class=2, size=3))
    poisoned, state = attack.poison(train, CPU)
    changed = (poisoned.x != train.x).flatten(1).any(1).nonzero().squeeze(1)
    assert torch.equal(changed, state["poisoned_indices"]) and len(changed) == 5  # half of the 10 images of class 2
    assert (y[changed] == 2).all() and torch.equal(poisoned.y, y)


def test_the_training_controlling_example_changes_batches_not_the_training_set(example):
    attack = example.JitteredBlend(example.JitteredBlend.Options(poison_rate=0.25, target_class=1))
    train = ImageData(torch.zeros(8, 1, 8, 8, dtype=torch.uint8), torch.full((8,), 3))
    same, state = attack.poison(train, CPU)
    assert same is train and len(state["poisoned_indices"]) == 0
    x, y = torch.zeros(8, 1, 8, 8), torch.full((8,), 3)
    new_x, new_y = attack.training_batch(None, x, y, torch.Generator().manual_seed(0), CPU, state)
    assert new_y.tolist() == [1, 1] + [3] * 6 and torch.equal(new_x[2:], x[2:])
    alpha = new_x[0] / state["pattern"]  # x is zero: the blend is alpha * pattern
    assert 0.1 <= alpha.mean() <= 0.3 and torch.allclose(alpha, alpha.flatten()[0].expand_as(alpha), atol=1e-5)


def test_both_example_attacks_implant_their_backdoor_from_a_suite(tmp_path, registry, one_cpu_thread):
    # The clean-label attack at rate 0 trains a clean model: the patch's rate without poisoning.
    attacks = [
        {"name": "clean_label_patch", "poison_rate": [1.0, 0.0], "size": 4},
        {"name": "jittered_blend"},
    ]
    suite = write_suite(tmp_path / "s.toml", attacks=attacks, training={"epochs": 10})
    rows = {row["attack_label"]: row for row in run_suite_file(suite, tmp_path, registry=registry)}
    for label, row in rows.items():
        assert row["status"] == "ok", row["error"]
        assert row["metrics"]["clean_acc"] > 0.8, label
    asr = {label: row["metrics"]["asr"] for label, row in rows.items()}
    assert asr["jittered_blend"] > 0.9, asr
    poisoned, control = (asr[next(k for k in asr if f"poison_rate={r}" in k)] for r in ("1.0", "0.0"))
    assert poisoned > control + 0.3, asr


def test_the_plugin_guide_shows_the_shipped_example():
    guide = (Path(__file__).parent.parent.parent / "docs" / "plugins.md").read_text()
    source = SOURCE.read_text()
    assert source[source.index("from dataclasses import dataclass") :].strip() in guide
