"""The `mcr` defense: curve definitions, batch-norm recomputation on bonafide data only, and a
small end-to-end run on CPU."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from torch import nn

import bench
from bench.errors import BenchError
from bench.evaluation import to_model_input
from bench.models import Classifier
from bench.training import train_classifier
from bench_plugins.datasets.digits import Digits
from bench_plugins.defenses import mcr
from bench_plugins.defenses.mcr import (
    Curve,
    Endpoint,
    ModeConnectivityRepair,
    ParameterCurve,
    TSelection,
    recompute_batchnorm,
)
from bench_plugins.models.small_cnn import SmallCNN

CPU = torch.device("cpu")
SHAPE = bench.InputShape(1, 8, 8, 10)


def tiny_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return Classifier(SmallCNN(SmallCNN.Options(width=4)).build(SHAPE), (0.5,), (0.25,)).eval()


def context(**kwargs) -> bench.DefenseContext:
    return bench.DefenseContext(**{"device": CPU, "seed": 0, "num_classes": 10, "recipe": SmallCNN.recipe, **kwargs})


@pytest.fixture(scope="module")
def digits():
    return Digits().load()


@pytest.fixture(scope="module")
def trained_pair(digits):
    """Two tiny models trained briefly on digits with different seeds."""
    models = []
    for seed in (0, 1):
        model = tiny_model(seed)
        ctx = bench.RunContext(device=CPU, seed=seed, num_classes=10)
        train_classifier(model, digits.train, dataclasses.replace(SmallCNN.recipe, epochs=2), ctx, flip=False)
        models.append(model)
    return models


def curve_parameters(curve: ParameterCurve, t) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in curve.as_parameters(curve.weights(t)).items()}


def perturbed_curve(kind: Curve) -> tuple[nn.Module, nn.Module, ParameterCurve, dict[str, torch.Tensor]]:
    start, end = tiny_model(0), tiny_model(1)
    curve = ParameterCurve(start, end, kind)
    with torch.no_grad():
        curve.bend.add_(torch.randn_like(curve.bend))  # so theta is not just the midpoint
    theta = {k: v.detach() for k, v in curve.as_parameters(curve.bend).items()}
    return start, end, curve, theta


def test_bezier_curve_is_its_endpoints_at_0_and_1_and_quadratic_at_half():
    start, end, curve, theta = perturbed_curve(Curve.BEZIER)
    w0, w1 = dict(start.named_parameters()), dict(end.named_parameters())
    at_0, at_1, at_half = (curve_parameters(curve, t) for t in (0.0, 1.0, 0.5))
    for name in w0:
        assert torch.equal(at_0[name], w0[name])
        assert torch.equal(at_1[name], w1[name])
        expected = 0.25 * w0[name] + 0.5 * theta[name] + 0.25 * w1[name]
        torch.testing.assert_close(at_half[name], expected)
    # t drawn on the device as a tensor (training) gives the same curve as a float t
    at_tensor = curve_parameters(curve, torch.tensor(0.3))
    for name, value in curve_parameters(curve, 0.3).items():
        torch.testing.assert_close(at_tensor[name], value)


def test_polychain_passes_through_the_bend_at_half():
    start, end, curve, theta = perturbed_curve(Curve.POLYCHAIN)
    w0, w1 = dict(start.named_parameters()), dict(end.named_parameters())
    at = {t: curve_parameters(curve, t) for t in (0.0, 0.25, 0.5, 0.75, 1.0)}
    for name in w0:
        assert torch.equal(at[0.0][name], w0[name])
        assert torch.equal(at[1.0][name], w1[name])
        assert torch.equal(at[0.5][name], theta[name])
        torch.testing.assert_close(at[0.25][name], (w0[name] + theta[name]) / 2)
        torch.testing.assert_close(at[0.75][name], (theta[name] + w1[name]) / 2)


def test_bend_starts_at_the_midpoint_and_views_keep_channels_last_layout():
    start = tiny_model(0).to(memory_format=torch.channels_last)
    end = tiny_model(1)
    curve = ParameterCurve(start, end, Curve.BEZIER)
    theta = curve.as_parameters(curve.bend)
    for name, p in start.named_parameters():
        assert theta[name].stride() == p.stride()
        torch.testing.assert_close(theta[name], (p + dict(end.named_parameters())[name]) / 2)


def test_curve_rejects_endpoints_of_different_architectures():
    other = Classifier(SmallCNN(SmallCNN.Options(width=3)).build(SHAPE), (0.5,), (0.25,))
    with pytest.raises(BenchError, match="same architecture"):
        ParameterCurve(tiny_model(0), other, Curve.BEZIER)


def test_recompute_batchnorm_gives_the_bonafide_mean():
    net = Classifier(nn.Sequential(nn.BatchNorm2d(1), nn.Flatten(), nn.Linear(64, 10)), (0.5,), (0.25,))
    bn = net.net[0]
    bn.running_mean.fill_(123.0)  # stale statistics from training must not leak into the estimate
    generator = torch.Generator().manual_seed(0)
    bonafide = bench.ImageData(
        torch.randint(200, 256, (50, 1, 8, 8), dtype=torch.uint8, generator=generator),
        torch.zeros(50, dtype=torch.long),
    )
    ctx = context(eval_batch_size=7)  # uneven batches: 7 x 7 + 1
    recompute_batchnorm(net, bonafide, ctx)
    normalized = (to_model_input(bonafide.x) - 0.5) / 0.25
    torch.testing.assert_close(bn.running_mean, normalized.mean().reshape(1), rtol=1e-5, atol=1e-5)
    assert bn.momentum == 0.1 and not net.training
    # each batch's variance, weighted by batch size: close to the set's variance
    torch.testing.assert_close(bn.running_var, normalized.var().reshape(1), rtol=0.05, atol=0)


def test_mcr_only_ever_sees_bonafide_images():
    bonafide = bench.ImageData(torch.randint(100, 150, (40, 1, 8, 8), dtype=torch.uint8), torch.randint(0, 10, (40,)))
    allowed = {row.numpy().tobytes() for row in to_model_input(bonafide.x)}
    seen, seeds = [], []

    def record(module, args):
        seen.append(args[0].detach().clone())

    model, second = tiny_model(0), tiny_model(1)
    for m in (model, second):
        m.register_forward_pre_hook(record)

    def second_model(seed):
        seeds.append(seed)
        return second

    defense = ModeConnectivityRepair(
        ModeConnectivityRepair.Options(epochs=2, batch_size=16, path_points=3, samples_per_epoch=0)
    )
    repaired = defense.apply(model, bonafide, context(seed=5, attacked_model_with_seed=second_model))
    points = list(repaired.points())
    assert seeds == [6]
    assert len(seen) > 0 and len(points) == 3
    for batch in seen:
        for row in batch:
            assert row.numpy().tobytes() in allowed


def test_second_seed_endpoint_needs_a_second_model_and_finetuned_does_not(digits):
    bonafide = digits.test.subset(torch.arange(64))
    options = ModeConnectivityRepair.Options(epochs=1, path_points=2, samples_per_epoch=0)
    with pytest.raises(BenchError, match="finetuned"):
        ModeConnectivityRepair(options).apply(tiny_model(0), bonafide, context())
    finetuned = dataclasses.replace(options, endpoint=Endpoint.FINETUNED, finetune_epochs=1)
    repaired = ModeConnectivityRepair(finetuned).apply(tiny_model(0), bonafide, context())
    assert [c["t"] for _, c, _ in repaired.points()] == [0.0, 1.0]


def fixed_t_repair(start, end, bonafide, t=0.4, epochs=3):
    """MCR with a fixed t; returns (defense result, the trained curve)."""
    curves = []
    original_init = ParameterCurve.__init__

    def recording_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        curves.append(self)

    defense = ModeConnectivityRepair(
        ModeConnectivityRepair.Options(epochs=epochs, t=t, t_selection=TSelection.FIXED, samples_per_epoch=0)
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ParameterCurve, "__init__", recording_init)
        result = defense.apply(copy.deepcopy(start), bonafide, context(attacked_model_with_seed=lambda seed: end))
    return result, curves[0]


def test_mcr_end_to_end_returns_phi_of_t_and_the_path(digits, trained_pair):
    start, end = trained_pair
    original = {k: v.clone() for k, v in start.named_parameters()}
    bonafide = digits.test.subset(torch.arange(200))
    result, curve = fixed_t_repair(start, end, bonafide)

    assert result.values == {"mcr_t": 0.4}
    phi = curve_parameters(curve, 0.4)
    for name, p in result.model.named_parameters():
        torch.testing.assert_close(p, phi[name], rtol=0, atol=0)
    assert [row["epoch"] for row in result.series["mcr_training"]] == [1, 2, 3]

    points = list(result.points())
    assert [name for name, _, _ in points] == ["path"] * 11
    assert [c["t"] for _, c, _ in points] == pytest.approx([i / 10 for i in range(11)])
    first, last = points[0][2], points[-1][2]
    for name, p in first.named_parameters():
        assert torch.equal(p, original[name])
        assert torch.equal(dict(last.named_parameters())[name], dict(end.named_parameters())[name])
    assert points[3][2] is not points[4][2]


def test_training_lowers_the_curve_loss_and_moves_the_bend(digits, trained_pair):
    start, end = trained_pair
    bonafide = digits.test.subset(torch.arange(200))
    result, curve = fixed_t_repair(start, end, bonafide, epochs=6)
    losses = [row["loss"] for row in result.series["mcr_training"]]
    assert losses[-1] < losses[0]
    midpoint = (curve.start + curve.end) / 2
    assert (curve.bend - midpoint).norm() > 1e-3 * midpoint.norm()
    # the endpoints stay frozen
    for name, p in curve.as_parameters(curve.start).items():
        assert torch.equal(p, dict(start.named_parameters())[name].float())


def correctness(right: int, total: int = 20, offset: int = 0) -> torch.Tensor:
    """Per-image correctness on `total` held-out images: `right` of them right, from `offset` on
    (cyclically), so that two points can disagree on chosen images."""
    out = torch.zeros(total, dtype=torch.bool)
    out[(torch.arange(right) + offset) % total] = True
    return out


def test_the_rule_rejects_only_points_significantly_below_the_better_endpoint():
    # 20 held-out images; the better endpoint gets 18 right
    path = {
        0.0: correctness(17),
        0.25: correctness(15),  # 3 fewer, nothing gained: p = 1/8, kept
        0.5: correctness(8),  # 10 fewer: p = 2^-10, rejected
        0.75: correctness(16),  # 2 fewer: p = 1/4, kept
        1.0: correctness(18),
    }
    t, p_values = mcr.farthest_acceptable_t(path, significance=0.05)
    assert p_values[0.5] == pytest.approx(2**-10) and p_values[1.0] == 1.0
    assert p_values[0.25] == pytest.approx(1 / 8) and p_values[0.75] == pytest.approx(1 / 4)
    assert t == 0.75  # 0.25 and 0.75 are equally far from the ends: the more accurate wins
    # 6 fewer: p = 1/64, rejected; 0.25 is left
    assert mcr.farthest_acceptable_t({**path, 0.75: correctness(12)}, 0.05)[0] == 0.25
    # a stricter level keeps more points: the middle is kept at 2^-11
    assert mcr.farthest_acceptable_t(path, 2**-11)[0] == 0.5
    # a point the test cannot tell apart from the better endpoint wins even a large drop on few images
    assert (
        mcr.farthest_acceptable_t({0.0: correctness(2, 3), 0.5: correctness(0, 3), 1.0: correctness(2, 3)}, 0.05)[0]
        == 0.5
    )
    collapsing = {0.0: correctness(18), 0.5: correctness(2), 1.0: correctness(18)}
    assert mcr.farthest_acceptable_t(collapsing, 0.05)[0] == 0.0  # no repair beats a broken model


def test_the_test_is_paired_on_the_same_images():
    # Same accuracy (10/20), but the point gets wrong every image the endpoint gets right: the
    # paired test sees 10 losses and 10 gains, not a significant loss
    endpoint, point = correctness(10), correctness(10, offset=10)
    assert mcr.paired_worse_p_value(endpoint, point) == pytest.approx(0.5 + math.comb(20, 10) / 2**21)
    # 4 lost and none gained: p = 1/16
    assert mcr.paired_worse_p_value(correctness(14), correctness(10)) == pytest.approx(1 / 16)
    assert mcr.paired_worse_p_value(correctness(10), correctness(10)) == 1.0


def test_clean_rule_scores_points_on_held_out_images_only(digits, trained_pair):
    start, end = trained_pair
    bonafide = digits.test.subset(torch.arange(100))
    trained_on = []
    options = ModeConnectivityRepair.Options(epochs=2, path_points=5, samples_per_epoch=0, holdout_fraction=0.2)
    defense = ModeConnectivityRepair(options)
    training_part, held_out = defense._split(bonafide, context())
    assert len(held_out) == 20 and len(training_part) == 80
    held = {row.numpy().tobytes() for row in held_out.x}
    assert not held & {row.numpy().tobytes() for row in training_part.x}

    original_train = ModeConnectivityRepair._train

    def recording_train(self, net, curve, images, ctx):
        trained_on.append(images)
        return original_train(self, net, curve, images, ctx)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ModeConnectivityRepair, "_train", recording_train)
        result = defense.apply(copy.deepcopy(start), bonafide, context(attacked_model_with_seed=lambda seed: end))
    assert not held & {row.numpy().tobytes() for row in trained_on[0].x}
    records = result.series["mcr_path_held_out"]
    scores = {row["t"]: row["held_out_acc"] for row in records}
    assert list(scores) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert all(abs(score * 20 - round(score * 20)) < 1e-4 for score in scores.values())  # counted on 20 images
    chosen = [row for row in records if row["t"] == result.values["mcr_t"]][0]
    assert chosen["acceptable"] == 1.0 and chosen["p_value_below_better_endpoint"] >= options.significance
    farther = [row for row in records if min(row["t"], 1 - row["t"]) > min(chosen["t"], 1 - chosen["t"])]
    assert all(row["acceptable"] == 0.0 for row in farther)


def test_mcr_registers_through_the_hook():
    registered = []
    mcr.register_defenses(register=registered.append)
    assert registered == [ModeConnectivityRepair] and ModeConnectivityRepair.name == "mcr"
