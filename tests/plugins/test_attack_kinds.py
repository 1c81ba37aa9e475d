"""The attack kinds beyond all-to-one poisoning: all-to-all targets, clean-label poisoning, and
attacks that control training; and every option of a training-stage attack reaches the key of
the attacked model it makes."""

import dataclasses
import enum
import importlib.metadata
import typing
from dataclasses import dataclass

import pytest
import torch

import bench
from bench.expansion import expand, plugin_specs
from bench.keys import model_key
from bench.registry import ENTRY_POINT_GROUP, build_registry
from bench.suite import load_suite
from bench_plugins.attacks.badnets import BadNets
from bench_plugins.attacks.trigger_backdoor import CleanLabelBackdoor, TargetMode
from bench_plugins.testing import run_suite_file, write_suite


def digits(registry):
    (spec,) = plugin_specs({"name": "digits"}, "dataset", "test", registry)
    return spec.instantiate().load()


def test_all_to_all_relabels_every_class_to_the_next_and_scores_that_mapping(registry):
    splits = digits(registry)
    attack = BadNets(BadNets.Options(poison_rate=0.2, trigger_size=2, target_mode=TargetMode.ALL_TO_ALL))
    ctx = bench.RunContext(device=torch.device("cpu"), seed=0, num_classes=10)
    poisoned, state = attack.poison(splits.train, ctx)
    index = state["poisoned_indices"]
    assert len(index) == round(0.2 * len(splits.train))
    assert set(splits.train.y[index].tolist()) == set(range(10))  # drawn from every class, the target's too
    assert torch.equal(poisoned.y[index], (splits.train.y[index] + 1) % 10)
    untouched = torch.ones(len(splits.train), dtype=torch.bool)
    untouched[index] = False
    assert torch.equal(poisoned.y[untouched], splits.train.y[untouched])

    class NextClass(torch.nn.Module):  # predicts (y + 1) mod 10 for every image of class y
        def __init__(self, labels_by_image):
            super().__init__()
            self.lookup = labels_by_image

        def forward(self, x):
            labels = self.lookup[tuple(x.shape)]
            return torch.nn.functional.one_hot((labels + 1) % 10, 10).float()

    test = splits.test
    model = NextClass({tuple(test.x.shape): test.y})
    assert attack.evaluate(model, test, ctx, state) == {"asr": 1.0, "ra": 0.0}


class Stripe(CleanLabelBackdoor):
    name = "stripe_clean_label"
    description = "adds 40 to the top row of target-class images, labels kept"

    @dataclass(frozen=True)
    class Options:
        poison_rate: float = bench.option(0.5, "share of the target class poisoned", min=0, max=1)
        target_class: int = bench.option(3, "target class", min=0)

    def apply_trigger(self, x):
        out = x.clone().int()
        out[:, :, 0, :] += 40
        return out.clamp(0, 255).to(torch.uint8)


def test_clean_label_poisons_a_share_of_the_target_class_only_and_keeps_every_label(registry):
    splits = digits(registry)
    attack = Stripe()
    ctx = bench.RunContext(device=torch.device("cpu"), seed=0, num_classes=10)
    poisoned, state = attack.poison(splits.train, ctx)
    index = state["poisoned_indices"]
    in_target = int((splits.train.y == 3).sum())
    assert len(index) == round(0.5 * in_target)  # a share of the target class, not of the whole set
    assert (splits.train.y[index] == 3).all()
    assert torch.equal(poisoned.y, splits.train.y)
    changed = (poisoned.x != splits.train.x).flatten(1).any(dim=1).nonzero().squeeze(1)
    assert set(changed.tolist()) <= set(index.tolist())
    assert attack.withheld_training_images(splits) == len(index)
    with pytest.raises(bench.BenchError, match="rounds to no image; a clean-label rate is a share of the target"):
        Stripe(Stripe.Options(poison_rate=0.001)).poison(splits.train, ctx)


class RelabelHalf(bench.Attack):
    """Controls training: the second half of every batch gets a bright top-left pixel and label 0."""

    name = "relabel_half"
    description = "a training-controlling test attack"
    stage = bench.Stage.TRAINING
    controls_training = True
    metrics = (bench.Metric("asr", "ASR", False),)
    success_metric = "asr"
    seen: list = []

    @dataclass(frozen=True)
    class Options:
        brightness: float = bench.option(1.0, "value of the trigger pixel", min=0, max=1)

    def training_batch(self, model, x, y, generator, ctx, state):
        RelabelHalf.seen.append((x.dtype, float(x.min()), float(x.max()), len(x)))
        half = len(x) // 2
        x, y = x.clone(), y.clone()
        x[half:, :, 0, 0] = self.options.brightness
        y[half:] = 0
        return x, y

    def evaluate(self, model, test, ctx, state):
        from bench.toolkit import predict

        others = test.y != 0
        x = test.x[others].clone()
        x[:, :, 0, 0] = round(255 * self.options.brightness)
        return {"asr": (predict(model, x, ctx) == 0).float().mean().item()}


def test_an_attack_that_controls_training_changes_every_batch_inside_the_cores_training(tmp_path):
    registry = build_registry(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
    registry.register(RelabelHalf, plugin="test", package="tests")
    RelabelHalf.seen.clear()
    suite = write_suite(tmp_path / "s.toml", attacks=["relabel_half"], defenses=["none"], training={"epochs": 3})
    (row,) = run_suite_file(suite, tmp_path, registry=registry)
    assert row["status"] == "ok", row["error"]
    assert RelabelHalf.seen and all(
        dtype == torch.float32 and 0 <= lo <= hi <= 1 for dtype, lo, hi, _ in RelabelHalf.seen
    )
    assert row["metrics"]["asr"] > 0.9  # half of every batch taught the pixel -> class 0 rule


def changed(value, field: dataclasses.Field, hint):
    """A valid value other than `value` for an option."""
    if isinstance(value, enum.Enum):
        return next(member for member in type(value) if member is not value)
    if isinstance(value, bool):
        return not value
    if isinstance(value, list):
        return value + value[:1] if value else [1]
    high = field.metadata.get("max")
    if isinstance(value, int):
        return value - 1 if high is not None and value + 1 > high else value + 1
    if isinstance(value, float):
        return value / 2 if value else 0.5 * (high if high is not None else 1.0)
    if isinstance(value, str):
        return value + "x"
    raise AssertionError(f"no other value for {field.name}: {value!r} ({hint})")


def attacks_that_make_their_model() -> list[str]:
    registry = build_registry(
        ep
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
        if ep.dist is not None and ep.dist.name == "robustness-bench"
    )
    return [n for n in registry.names("attack") if registry.get("attack", n).cls.stage is not bench.Stage.TEST_TIME]


@pytest.mark.parametrize("name", attacks_that_make_their_model())
def test_every_option_of_an_attack_that_makes_its_model_changes_the_models_cache_key(name, registry, tmp_path):
    cls = registry.get("attack", name).cls
    suite = write_suite(tmp_path / "s.toml", attacks=[name], defenses=["none"])
    (job,) = expand(load_suite(suite, registry))
    splits = digits(registry)
    base = model_key(job, job.seed, splits, torch.device("cpu"))
    hints = typing.get_type_hints(cls.Options)
    for field in dataclasses.fields(cls.Options):
        value = changed(getattr(job.attack.parsed, field.name), field, hints[field.name])
        spec = plugin_specs(
            {
                "name": name,
                **job.attack.options,
                field.name: value if not isinstance(value, enum.Enum) else value.value,
            },
            "attack",
            "test",
            registry,
        )[0]
        assert model_key(dataclasses.replace(job, attack=spec), job.seed, splits, torch.device("cpu")) != base, (
            field.name
        )


@pytest.mark.parametrize("name", attacks_that_make_their_model())
def test_every_attack_that_makes_its_model_links_its_paper_and_code(name, registry):
    cls = registry.get("attack", name).cls
    assert cls.paper.startswith("https://") and cls.code.startswith("https://"), name
