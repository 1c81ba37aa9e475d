"""The `ft_sam` defense: one (A)SAM step is the two-pass update computed by hand, the second
pass leaves batch-norm statistics alone, and FT-SAM removes more of a BadNets backdoor than the
same fine-tuning without the weight perturbation, keeping clean accuracy."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import bench
from bench.toolkit import to_model_input
from bench_plugins.defenses.ft_sam import FTSAM, sam_step
from bench_plugins.testing import backdoored_digits_model

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

CPU_CONTEXT = bench.RunContext(device=torch.device("cpu"), seed=0, num_classes=3)


def smoothed_loss_by_hand(logits: torch.Tensor, labels: torch.Tensor, smoothing: float) -> torch.Tensor:
    """(1 - s) * NLL of the true class + s / (C - 1) * the NLL summed over the other classes."""
    log_p = F.log_softmax(logits, dim=1)
    true = -log_p.gather(1, labels[:, None]).squeeze(1)
    others = -log_p.sum(dim=1) - true
    return ((1 - smoothing) * true + smoothing / (logits.shape[1] - 1) * others).mean()


@pytest.mark.parametrize("adaptive", [True, False])
def test_one_sam_step_is_the_two_pass_update_computed_by_hand(adaptive):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.rand(8, 1, 2, 2, dtype=torch.float64), torch.randint(0, 3, (8,))
    rho, lr, wd, smoothing = (2.0 if adaptive else 0.05), 0.1, 5e-4, 0.1
    names = [name for name, _ in model.named_parameters()]
    w = [p.detach().clone() for p in model.parameters()]

    def loss_at(weights):
        return smoothed_loss_by_hand(functional_call(model, dict(zip(names, weights)), (x,)), y, smoothing)

    first = torch.autograd.grad(loss_at([t.requires_grad_(True) for t in w]), w)
    w = [t.detach() for t in w]
    if adaptive:  # ASAM: e = rho * |w|^2 g / || |w| g ||
        norm = torch.sqrt(sum(((t.abs() * g) ** 2).sum() for t, g in zip(w, first)))
        e = [rho * t.pow(2) * g / norm for t, g in zip(w, first)]
    else:  # SAM: e = rho * g / ||g||
        norm = torch.sqrt(sum((g**2).sum() for g in first))
        e = [rho * g / norm for g in first]
    perturbed = [(t + d).requires_grad_(True) for t, d in zip(w, e)]
    second = torch.autograd.grad(loss_at(perturbed), perturbed)
    expected = [t - lr * (g + wd * t) for t, g in zip(w, second)]  # SGD's first momentum step
    plain = [t - lr * (g + wd * t) for t, g in zip(w, first)]

    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=wd)
    loss, perturbed_loss = sam_step(
        model, optimizer, x, y, CPU_CONTEXT, rho=rho, adaptive=adaptive, label_smoothing=smoothing
    )
    for p, want in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), want)
    assert loss.item() == pytest.approx(loss_at(w).item())
    assert perturbed_loss.item() == pytest.approx(loss_at([t + d for t, d in zip(w, e)]).item())
    assert perturbed_loss.item() > loss.item()  # the ascent step found a higher loss
    # the step is not a plain gradient step, so the comparison above has teeth
    assert max((p.detach() - q).abs().max().item() for p, q in zip(model.parameters(), plain)) > 1e-4


def test_only_the_first_pass_updates_batchnorm_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3))
    reference = copy.deepcopy(model).train()
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 3, (8,))
    with torch.no_grad():
        reference(x)  # one train-mode forward at the unperturbed weights
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train()
    sam_step(model, optimizer, x, y, CPU_CONTEXT, rho=2.0, adaptive=True, label_smoothing=0.1)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(model[1], name), getattr(reference[1], name))


def test_ft_sam_removes_more_of_the_backdoor_than_the_same_fine_tuning_without_sam():
    torch.set_num_threads(1)
    b = backdoored_digits_model(epochs=8, seed=0)
    accuracy_before = b.accuracy(b.model)
    assert b.asr(b.model) > 0.9
    # the defaults (rho 2, ASAM, lr 0.01, label smoothing 0.1) at a budget for 100 digits
    small = {"epochs": 10, "samples_per_epoch": 500, "batch_size": 64}
    result = FTSAM(FTSAM.Options(**small)).apply(copy.deepcopy(b.model), b.bonafide, b.ctx)
    control = FTSAM(FTSAM.Options(**small, rho=0.0)).apply(copy.deepcopy(b.model), b.bonafide, b.ctx)
    asr, control_asr = b.asr(result.model), b.asr(control.model)
    assert asr < 0.5
    assert asr < control_asr - 0.25
    assert b.accuracy(result.model) > accuracy_before - 0.04

    epochs = result.series["ft_sam_epochs"]
    assert [e["epoch"] for e in epochs] == list(range(10))
    assert all(e["perturbed_loss"] > e["loss"] for e in epochs)
    assert all(e["perturbed_loss"] == pytest.approx(e["loss"]) for e in control.series["ft_sam_epochs"])
    with torch.no_grad():  # the defended model comes back in eval mode
        assert not result.model.training
        result.model(to_model_input(b.bonafide.x[:2]))


def test_defaults_are_backdoorbenchs():
    o = FTSAM.Options()
    assert (o.epochs, o.samples_per_epoch, o.lr, o.batch_size, o.weight_decay) == (100, 2500, 0.01, 256, 5e-4)
    assert (o.rho, o.adaptive, o.label_smoothing, o.augment) == (2.0, True, 0.1, True)
    assert FTSAM.defender_data is bench.DefenderData.BONAFIDE
