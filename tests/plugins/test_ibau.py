"""The `ibau` defense: the inner maximisation finds a universal perturbation that raises the
bonafide loss (far more than a random one of the same norm, and where the trigger is), the
hypergradient is the K-term Neumann series of the implicit function theorem, and the minimax
removes a BadNets backdoor that the same budget without the perturbation leaves in place."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import bench
from bench.toolkit import epoch_order, to_model_input
from bench_plugins.defenses.ibau import (
    IBAU,
    PERTURBATION_PENALTY,
    bonafide_losses,
    implicit_hypergradient,
    universal_perturbation,
)
from bench_plugins.testing import backdoored_digits_model

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

# a budget for 100 bonafide digits: 5 rounds of 500 samples in batches of 64 (defaults: 2,500 and
# 256), the authors' lr 1e-3, and a radius that fits the 2x2 trigger (norm 2) on 8x8 images
SMALL = {"batch_size": 64, "samples_per_round": 500, "lr": 1e-3, "radius": 3.0}


@pytest.fixture(scope="module")
def backdoored():
    torch.set_num_threads(1)
    return backdoored_digits_model(epochs=8, seed=0)


def test_the_universal_perturbation_raises_the_loss_far_more_than_a_random_one_of_its_norm(backdoored):
    b = backdoored
    generator = torch.Generator().manual_seed(0)
    order = epoch_order(len(b.bonafide), 500, generator, "cpu")
    delta = universal_perturbation(b.model, b.bonafide, order, b.ctx, batch_size=64, lr=10.0, radius=1.0)
    assert delta.shape == (1, *b.bonafide.x.shape[1:])
    assert delta.norm().item() <= 1.0 + 1e-5
    clean, perturbed = bonafide_losses(b.model, b.bonafide, delta, b.ctx)
    random_increases = []
    for _ in range(10):
        noise = torch.randn(delta.shape, generator=generator)
        _, noisy = bonafide_losses(b.model, b.bonafide, noise * delta.norm() / noise.norm(), b.ctx)
        random_increases.append(noisy - clean)
    assert perturbed - clean > 1.0
    assert perturbed - clean > 10 * max(random_increases)
    # on a backdoored model the worst universal perturbation is the trigger: most of its energy
    # sits on the 2x2 trigger (rows and columns 5-6, 4 of 64 pixels) and it sends the bonafide
    # images to the target class
    energy = delta[0, 0].pow(2)
    assert energy[5:7, 5:7].sum() / energy.sum() > 0.3
    with torch.no_grad():
        predicted = b.model(to_model_input(b.bonafide.x) + delta).argmax(dim=1)
    assert (predicted == 0).float().mean().item() > 0.7


def test_the_hypergradient_is_the_k_term_neumann_series_of_the_implicit_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    names = [name for name, _ in model.named_parameters()]
    params = list(model.parameters())
    shapes = [p.shape for p in params]
    x, y = torch.rand(6, 1, 2, 2, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    perturbed = torch.tensor([1.0, 0, 0, 1.0, 0, 0], dtype=torch.float64)
    delta = 0.3 * torch.randn(1, 1, 2, 2, dtype=torch.float64)
    inner_step = 0.1

    def weights(theta):
        return dict(zip(names, (t.view(s) for t, s in zip(theta.split([s.numel() for s in shapes]), shapes))))

    def outer(d, theta):
        logits = functional_call(model, weights(theta), (x + perturbed.view(-1, 1, 1, 1) * d.view(1, 1, 2, 2),))
        return F.cross_entropy(logits, y)

    def inner(d, theta):
        logits = functional_call(model, weights(theta), (x + d.view(1, 1, 2, 2),))
        return -F.cross_entropy(logits, y) + PERTURBATION_PENALTY * d.pow(2).sum()

    def fixed_point_map(d, theta):
        return d - inner_step * torch.func.grad(inner)(d, theta)

    d0, theta0 = delta.flatten(), torch.cat([p.detach().flatten() for p in params])
    jacobian_delta = torch.func.jacrev(fixed_point_map, argnums=0)(d0, theta0)  # [4, 4]
    jacobian_theta = torch.func.jacrev(fixed_point_map, argnums=1)(d0, theta0)  # [4, P]
    outer_delta, outer_theta = torch.func.grad(outer, argnums=(0, 1))(d0, theta0)
    ctx = bench.RunContext(device=torch.device("cpu"), seed=0, num_classes=3)
    for steps in (0, 1, 5):
        series = sum(
            (torch.linalg.matrix_power(jacobian_delta.T, k) @ outer_delta for k in range(steps)),
            torch.zeros_like(outer_delta),
        )
        expected = outer_theta + jacobian_theta.T @ series
        got = implicit_hypergradient(
            model, params, delta, x, y, perturbed, ctx, fixed_point_steps=steps, inner_step=inner_step
        )
        torch.testing.assert_close(torch.cat([g.flatten() for g in got]), expected)
    # the implicit term is not negligible here, so the comparison above has teeth
    assert (expected - outer_theta).norm() > 0.01 * outer_theta.norm()


def test_ibau_removes_the_backdoor_that_the_same_budget_without_a_perturbation_keeps(backdoored):
    b = backdoored
    accuracy_before = b.accuracy(b.model)
    assert b.asr(b.model) > 0.9
    result = IBAU(IBAU.Options(**SMALL)).apply(copy.deepcopy(b.model), b.bonafide, b.ctx)
    assert isinstance(result, bench.Defended)
    assert b.asr(result.model) < 0.2
    assert b.accuracy(result.model) > accuracy_before - 0.08
    # the control: the same Adam steps with a vanishing perturbation are clean fine-tuning
    control = IBAU(IBAU.Options(**{**SMALL, "radius": 1e-6})).apply(copy.deepcopy(b.model), b.bonafide, b.ctx)
    assert b.asr(control.model) > 0.4

    rounds = result.series["ibau_rounds"]
    assert [r["round"] for r in rounds] == list(range(5))
    assert all(0 < r["perturbation_norm"] <= SMALL["radius"] + 1e-4 for r in rounds)
    assert all(r["loss_increase"] == pytest.approx(r["perturbed_loss"] - r["bonafide_loss"]) for r in rounds)
    # each round's unlearning lowers the loss increase its own perturbation causes
    assert all(r["loss_increase_after_unlearning"] < r["loss_increase"] for r in rounds)
    assert result.values == {
        "ibau_perturbation_norm": rounds[-1]["perturbation_norm"],
        "ibau_loss_increase": rounds[-1]["loss_increase"],
    }
    assert {m.key for m in IBAU.metrics} == set(result.values)


def test_defaults_are_the_references():
    o = IBAU.Options()
    assert (o.rounds, o.fixed_point_steps, o.lr, o.batch_size, o.samples_per_round) == (5, 5, 1e-4, 256, 2500)
    assert (o.radius, o.perturbation_lr, o.inner_step, o.perturbed_fraction) == (10.0, 10.0, 0.1, 0.01)
    assert IBAU.defender_data is bench.DefenderData.BONAFIDE
