"""Input-aware dynamic backdoor: every image gets its own trigger (patterns and masks differ per
image, masks sparse), a trigger fires only on the image it was made for (the paper's cross
test), the pattern generator trains inside `training_batch` without touching the classifier's
gradients or statistics, the trained state survives a weights-only round trip, all-to-all maps
y -> (y + 1) mod K, and an end-to-end suite run on digits."""

import copy
import dataclasses
import importlib.metadata
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bench import BenchError, InputShape, OptionError, RunContext
from bench.options import parse_options
from bench.registry import ENTRY_POINT_GROUP, build_registry
from bench.toolkit import Classifier, clean_accuracy, to_model_input, train_classifier
from bench_plugins.attacks.input_aware import InputAware, blend, levels, trigger_network
from bench_plugins.attacks.trigger_backdoor import TargetMode
from bench_plugins.datasets.digits import Digits
from bench_plugins.models.small_cnn import SmallCNN
from bench_plugins.testing import run_suite_file, write_suite

SMALL = {"generator_width": 8, "mask_epochs": 10}  # the reference's networks at width 8, 10 mask epochs


def cpu(seed: int = 0) -> RunContext:
    return RunContext(device=torch.device("cpu"), seed=seed, num_classes=10, horizontal_flip=False)


def small_cnn(splits, width: int = 8, seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    return Classifier(SmallCNN(SmallCNN.Options(width=width)).build(InputShape(1, 8, 8, 10)), splits.mean, splits.std)


def pairwise_rms(t: torch.Tensor) -> torch.Tensor:
    """Root mean square distances between every two different images of `t`."""
    flat = t.flatten(1)
    distances = torch.cdist(flat, flat) / flat.shape[1] ** 0.5
    return distances[~torch.eye(len(t), dtype=torch.bool)]


@pytest.fixture(scope="module")
def splits():
    return Digits().load()


@pytest.fixture(scope="module")
def trained(splits):
    """small_cnn width 8 trained 60 epochs under the attack (reference defaults but G and M at
    width 8 and 10 mask epochs); measured over seeds 0-2: ASR 0.68-0.86, cross accuracy
    0.80-0.87, another image's trigger read as the target 0.12-0.22, clean 0.98 (seed 0: 0.86,
    0.80, 0.22, 0.98). An 8x8 digit's trigger is ~4 mask pixels: the cross mode makes it slow
    to learn (without it: ASR 0.99 in 30 epochs, see the end-to-end test)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ctx = cpu(0)
    attack = InputAware(InputAware.Options(**SMALL))
    train, state = attack.poison(splits.train, ctx)
    initial = copy.deepcopy(state)
    model = small_cnn(splits)
    recipe = dataclasses.replace(SmallCNN.recipe, epochs=60)

    def batches(x, y, generator):
        return attack.training_batch(model, x, y, generator, ctx, state)

    train_classifier(model, train, recipe, ctx, flip=False, batch_transform=batches)
    torch.set_num_threads(threads)
    return attack, model.eval(), state, initial, train, ctx


def test_each_image_gets_its_own_sparse_trigger(splits, trained, one_cpu_thread):
    attack, _, state, initial, train, ctx = trained
    assert train is splits.train and len(state["poisoned_indices"]) == 0  # nothing poisoned once and for all
    x = to_model_input(splits.test.x)
    networks, untrained = attack.networks(state, (1, 8, 8)), attack.networks(initial, (1, 8, 8))
    with torch.no_grad():
        patterns, masks = networks.pattern(networks.normalise(x)), networks.masks(x)
        untrained_patterns = untrained.pattern(untrained.normalise(x))
    # the diversity loss spreads G's patterns apart: from nearly one pattern (an untrained G
    # gives every image about the same) to patterns about 0.6 apart (rms, in [0, 1] units)
    assert pairwise_rms(untrained_patterns).mean() < 0.02
    assert pairwise_rms(patterns).mean() > 0.3
    assert (pairwise_rms(patterns) > 0.01).float().mean() > 0.99
    # masks: near-binary, sparse (the density penalty; mean 0.07 here for mask_density 0.032,
    # ~4 of 64 pixels) and placed per image (M's diversity term)
    assert ((masks < 0.05) | (masks > 0.95)).float().mean() > 0.9
    assert 0.5 * 0.032 < masks.mean() < 3 * 0.032
    assert pairwise_rms(masks).mean() > 0.15
    # without the density penalty the masks cover about half of the image
    _, unpenalised = InputAware(InputAware.Options(**{**SMALL, "lambda_norm": 0.0})).poison(splits.train, ctx)
    with torch.no_grad():
        assert attack.networks(unpenalised, (1, 8, 8)).masks(x).mean() > 0.3


def test_a_trigger_fires_on_its_own_image_but_not_on_another(splits, trained, one_cpu_thread):
    attack, model, state, _, _, ctx = trained
    result = attack.evaluate(model, splits.test, ctx, state)
    assert clean_accuracy(model, splits.test, ctx) > 0.95
    assert result["asr"] > 0.75 and result["asr"] + result["ra"] <= 1.0
    assert result["cross_accuracy"] > 0.7  # another image's trigger keeps the true class...
    # ...and does not flip to the target: the paper's cross test on the non-target images
    others = splits.test.y != 0
    x = to_model_input(splits.test.x[others])
    networks = attack.networks(state, (1, 8, 8))
    with torch.no_grad():
        own = (model(networks.triggered(x)).argmax(1) == 0).float().mean().item()
        crossed = (model(networks.triggered(x, x.roll(1, 0))).argmax(1) == 0).float().mean().item()
    assert own == pytest.approx(result["asr"])  # evaluate triggers each image with its own trigger
    assert crossed < 0.35 and crossed < own - 0.5


def test_the_trained_state_survives_a_weights_only_round_trip(splits, trained, one_cpu_thread):
    attack, model, state, initial, _, ctx = trained
    # G trained through the state's own tensors; M was fixed in `poison`
    assert any(not torch.equal(state["generator"][k], initial["generator"][k]) for k in state["generator"])
    assert all(torch.equal(state["mask_network"][k], initial["mask_network"][k]) for k in state["mask_network"])
    buffer = io.BytesIO()
    torch.save({k: v for k, v in state.items()}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    fresh = InputAware(InputAware.Options(**SMALL))  # a new instance: no live generator
    assert fresh.evaluate(model, splits.test, ctx, loaded) == attack.evaluate(model, splits.test, ctx, state)
    assert attack.evaluate(model, splits.test, ctx, initial)["asr"] < 0.5  # the untrained G's triggers fail


def test_a_training_batch_trains_g_and_leaves_the_classifier_alone(splits, one_cpu_thread):
    ctx = cpu(0)
    # no diversity term here: G then follows the classifier's CE alone
    attack = InputAware(InputAware.Options(generator_width=4, mask_epochs=1, target_class=3, lambda_div=0.0))
    _, state = attack.poison(splits.train, ctx)
    model = small_cnn(splits).train()
    x, y = to_model_input(splits.train.x[:50]), splits.train.y[:50]
    before = {k: v.clone() for k, v in state["generator"].items()}
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    out_x, out_y = attack.training_batch(model, x.clone(), y.clone(), generator, ctx, state)
    assert all(p.grad is None for p in model.parameters())  # the core's step alone sets them
    assert all(torch.equal(v, buffers[k]) for k, v in model.state_dict().items())  # BN statistics untouched
    assert not out_x.requires_grad and out_x.shape == x.shape
    # G took a step through the state's tensors (weights), and its BN statistics saw the batch
    changed = [k for k in before if not torch.equal(before[k], state["generator"][k])]
    assert any(k.endswith("weight") for k in changed) and any(k.endswith("running_mean") for k in changed)
    # layout: 5 (int(0.1 * 50)) own triggers relabelled, 5 cross triggers and the rest unchanged
    assert (out_y[:5] == 3).all() and torch.equal(out_y[5:], y[5:])
    assert torch.equal(out_x[10:], x[10:])
    # the batch is rebuilt with the updated G (train mode: one forward over all sources) for
    # some shift s: image i of the cross images carries the trigger of image i + s, not its own
    networks = attack.live_generator(state, (1, 8, 8), ctx).networks

    def rebuilt(shift):
        sources = torch.cat([x[:5], x[(torch.arange(5, 10) + shift) % 50]])
        with torch.no_grad():
            return blend(x[:10], networks.pattern(networks.normalise(sources)), networks.masks(sources))

    matches = [shift for shift in range(50) if torch.allclose(out_x[:10], rebuilt(shift), atol=1e-5)]
    assert len(matches) == 1 and matches[0] != 0
    own = rebuilt(0)[5:10]  # what the cross images would be with their own triggers
    assert ((out_x[5:10] - own).abs().flatten(1).amax(1) > 1e-3).all()
    assert ((out_x[5:10] - x[5:10]).abs().flatten(1).amax(1) > 1e-3).all()
    # against a fixed classifier (linear, sensitive to its input), G's steps drive its triggered
    # images towards the target
    torch.manual_seed(0)
    linear = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with torch.no_grad():
        linear[1].weight.mul_(10)

    def target_loss():
        out_x, _ = attack.training_batch(linear, x.clone(), y.clone(), generator, ctx, state)
        with torch.no_grad():
            return F.cross_entropy(linear(out_x[:5]), torch.full((5,), 3)).item()

    first = target_loss()
    for _ in range(20):
        last = target_loss()
    assert last < first - 1.0  # measured: 8.3 -> 5.8


class TriggerReader(nn.Module):
    """Knows the clean and own-triggered versions of some images: answers `backdoor(y)` for an
    own-triggered image and y for any other (clean, or with another image's trigger)."""

    def __init__(self, clean, triggered, labels, backdoor):
        super().__init__()
        self.clean, self.triggered = clean.flatten(1), triggered.flatten(1)
        self.labels, self.backdoor = labels, backdoor

    def forward(self, x):
        x, exact = x.flatten(1), "donot_use_mm_for_euclid_dist"
        nearest = torch.cdist(x, torch.cat([self.clean, self.triggered]), compute_mode=exact).argmin(1)
        labels = self.labels[nearest % len(self.labels)]
        own = torch.cdist(x, self.triggered, compute_mode=exact).min(1).values < 1e-4
        return F.one_hot(torch.where(own, self.backdoor(labels), labels), 10).float()


def test_all_to_all_maps_each_class_to_the_next_and_evaluate_counts_that(splits, trained, one_cpu_thread):
    _, _, state, _, _, ctx = trained
    attack = InputAware(InputAware.Options(**SMALL, poison_rate=0.25, target_mode=TargetMode.ALL_TO_ALL))
    y = torch.tensor([9, 0, 3, 8, 1, 2, 4, 5, 6, 7, 9, 9, 9, 9, 9, 9])
    live_state = copy.deepcopy(state)
    _, out_y = attack.training_batch(small_cnn(splits), torch.rand(16, 1, 8, 8), y, torch.Generator(), ctx, live_state)
    assert out_y[:4].tolist() == [0, 1, 4, 9]  # (y + 1) mod 10
    assert torch.equal(out_y[4:], y[4:])
    test = splits.test
    clean = to_model_input(test.x)
    with torch.no_grad():
        triggered = attack.networks(state, (1, 8, 8)).triggered(clean)  # floats: never rounded to uint8
    backdoored = TriggerReader(clean, triggered, test.y, lambda labels: (labels + 1) % 10)
    result = attack.evaluate(backdoored, test, ctx, state)
    assert (result["asr"], result["ra"]) == (1.0, 0.0)
    # another image's trigger is not the image's own: read as its class (nearest neighbour)
    assert result["cross_accuracy"] > 0.95
    keeps_labels = TriggerReader(clean, triggered, test.y, lambda labels: labels)
    assert attack.evaluate(keeps_labels, test, ctx, state) == {
        "asr": 0.0,
        "ra": 1.0,
        **{"cross_accuracy": result["cross_accuracy"]},
    }
    # all-to-one counts only images outside the target class
    to_one = InputAware(InputAware.Options(**SMALL, target_class=2))
    misses_on_target = TriggerReader(clean, triggered, test.y, lambda labels: torch.where(labels == 2, 3, 2))
    assert to_one.evaluate(misses_on_target, test, ctx, state)["asr"] == 1.0


def test_generators_fit_any_image_size_and_bad_options_are_refused(one_cpu_thread):
    assert [levels(size, size) for size in (8, 28, 32, 64, 7)] == [1, 2, 3, 3, 0]
    for size in (7, 8, 28, 32):
        for out in (1, 3):
            net = trigger_network(3, out, 4, (size, size)).eval()
            output = net(torch.rand(2, 3, size, size))
            assert output.shape == (2, out, size, size) and 0 <= output.min() and output.max() <= 1
    with pytest.raises(OptionError, match="asks for 1.2 of every batch"):
        parse_options(InputAware.Options, {"poison_rate": 0.6}, "suite.toml [[attacks]] input_aware")
    with pytest.raises(BenchError, match="target_class 10 does not exist"):
        InputAware(InputAware.Options(target_class=10)).poison(Digits().load().train, cpu(0))


def test_end_to_end_on_digits_without_the_cross_mode_any_trigger_fires(tmp_path, one_cpu_thread, trained):
    registry = build_registry(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
    assert registry.get("attack", "input_aware").cls is InputAware  # the installed plugin
    # without cross images (cross_ratio 0) the backdoor is learned fast, but as "any generated
    # trigger": another image's trigger fires too (cross accuracy 0.17 vs 0.81 with the mode)
    suite = write_suite(
        tmp_path / "s.toml",
        attacks=[{"name": "input_aware", "generator_width": 8, "mask_epochs": 5, "cross_ratio": 0.0}],
        defenses=["none"],
        training={"epochs": 30},
    )
    (row,) = run_suite_file(suite, tmp_path, registry=registry)
    assert row["status"] == "ok", row["error"]
    metrics = row["metrics"]
    assert metrics["asr"] > 0.95 and metrics["clean_acc"] > 0.95
    assert metrics["cross_accuracy"] < 0.4
    assert row["metric_info"]["cross_accuracy"]["diagnostic"]
