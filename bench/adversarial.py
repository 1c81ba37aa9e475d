"""Test-time (evasion) attack primitives in native PyTorch: PGD and its one-step case FGSM, with
random restarts, a cross-entropy or DLR (margin) objective and expectation over transformation
(EOT) for stochastic models, and per-image pass counts to score them. The evaluation protocol the
built-in evasion attacks share (its metrics, the masking checks) is a plugin module,
`bench_plugins.attacks.evasion_protocol`; a third-party evasion attack may reuse it or not.

Everything runs batched on the images' device. The loss is computed in float32 even when the
forward pass runs under bf16 autocast; per-example results are accumulated as device tensors
and read back once per evaluation.

A model is *stochastic* when it declares `stochastic = True` or when two forward passes on the
same images differ (`bench.evaluation.is_stochastic`). Such a model is attacked with one-sample
gradients and with EOT gradients averaged over `eot_samples` draws, and its predictions are
counted over `passes` repeated forward passes (Athalye, Carlini & Wagner 2018).
"""

from __future__ import annotations

import contextlib
import enum
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch
import torch.nn.functional as F
from torch import nn

# eval_mode and is_stochastic live in bench.evaluation (clean accuracy needs them too); they are
# imported from here by evasion plugins.
from bench.evaluation import eval_mode, is_stochastic, to_model_input

__all__ = ["eval_mode", "is_stochastic"]


class Norm(enum.Enum):
    LINF = "linf"
    L2 = "l2"


class Loss(enum.Enum):
    """The objective PGD ascends: cross-entropy, or the DLR margin (Croce & Hein 2020), which is
    invariant to scaling and shifting the logits."""

    CE = "ce"
    DLR = "dlr"


def _per_example_norm(t: torch.Tensor) -> torch.Tensor:
    """L2 norm of each example, shaped [N, 1, 1, 1] for broadcasting."""
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


def random_start_in_ball(x: torch.Tensor, eps: float, norm: Norm, generator: torch.Generator | None) -> torch.Tensor:
    """A random perturbation inside the eps-ball: uniform per pixel for L-inf; uniform in the
    ball for L2 (a Gaussian direction, radius eps * U^(1/d))."""
    if norm is Norm.LINF:
        return (torch.rand(x.shape, device=x.device, generator=generator) * 2 - 1) * eps
    direction = torch.randn(x.shape, device=x.device, generator=generator)
    direction = direction / _per_example_norm(direction).clamp_min(1e-12)
    dims = x[0].numel()
    radius = torch.rand((len(x),) + (1,) * (x.dim() - 1), device=x.device, generator=generator) ** (1 / dims)
    return direction * radius * eps


def project(delta: torch.Tensor, x: torch.Tensor, eps: float, norm: Norm) -> torch.Tensor:
    """Project a perturbation onto the eps-ball, then so that x + delta stays in [0, 1]
    (clamping coordinates only shrinks an L2 norm, so both constraints hold)."""
    if norm is Norm.LINF:
        delta = delta.clamp(-eps, eps)
    else:
        delta = delta * (eps / _per_example_norm(delta).clamp_min(1e-12)).clamp(max=1.0)
    return (x + delta).clamp(0, 1) - x


def ascent_direction(grad: torch.Tensor, norm: Norm) -> torch.Tensor:
    """The steepest-ascent step of unit size in the norm: the sign for L-inf, the normalized
    gradient for L2."""
    if norm is Norm.LINF:
        return grad.sign()
    return grad / _per_example_norm(grad).clamp_min(1e-12)


def dlr_loss(logits: torch.Tensor, labels: torch.Tensor, targeted: bool) -> torch.Tensor:
    """Per-example margin objective to ascend, positive once the attack succeeds. Untargeted:
    DLR = (max_{i != y} z_i - z_y) / (z_pi1 - z_pi3), with z sorted decreasingly (Croce & Hein
    2020). Targeted (`labels` are the targets; the true labels are not at hand): the targeted CW
    margin z_t - max_{i != t} z_i, divided like DLR-T by z_pi1 - (z_pi3 + z_pi4) / 2. Both are
    invariant to scaling and shifting the logits. With fewer classes than the denominator needs
    (3, or 4 targeted) the plain CW margin is used, which scales with the logits but whose
    gradient does not vanish as a saturated softmax's does."""
    z = logits.float()
    own = z.gather(1, labels[:, None]).squeeze(1)
    others = z.scatter(1, labels[:, None], float("-inf")).amax(dim=1)
    margin = own - others if targeted else others - own
    ranked = z.sort(dim=1, descending=True).values
    classes = z.shape[1]
    if targeted and classes >= 4:
        margin = margin / (ranked[:, 0] - (ranked[:, 2] + ranked[:, 3]) / 2 + 1e-12)
    elif not targeted and classes >= 3:
        margin = margin / (ranked[:, 0] - ranked[:, 2] + 1e-12)
    return margin


def loss_gradient(
    model: nn.Module,
    x: torch.Tensor,
    delta: torch.Tensor,
    labels: torch.Tensor,
    *,
    targeted: bool,
    eot_samples: int,
    autocast: Callable[[], ContextManager],
    loss: Loss = Loss.CE,
) -> torch.Tensor:
    """Gradient of the attack objective at x + delta, summed over `eot_samples` forward passes
    (one sample per pass; the sum points the same way as the EOT average). With `Loss.CE`
    untargeted attacks ascend the cross-entropy of the true labels and targeted ones descend
    that of the targets; with `Loss.DLR` both ascend `dlr_loss`. Where the objective does not
    depend on the input (a zero-gradient input quantizer) the gradient is zero."""
    delta = delta.detach().requires_grad_(True)
    grad = torch.zeros_like(delta)
    for _ in range(eot_samples):
        with autocast():
            logits = model(x + delta)
        if loss is Loss.DLR:
            objective = dlr_loss(logits, labels, targeted).sum()
        else:
            objective = F.cross_entropy(logits.float(), labels, reduction="sum")
            if targeted:
                objective = -objective
        if objective.requires_grad:
            # allow_unused: a model that cuts its input from the graph (a detached quantizer)
            # has a zero gradient, which must reach the caller as zeros, not as an error.
            sample_grad = torch.autograd.grad(objective, delta, allow_unused=True)[0]
            if sample_grad is not None:
                grad += sample_grad
    return grad


def attack_succeeds(
    model: nn.Module, x_adv: torch.Tensor, labels: torch.Tensor, targeted: bool, autocast: Callable[[], ContextManager]
) -> torch.Tensor:
    with torch.no_grad(), autocast():
        predictions = model(x_adv).argmax(dim=1)
    return predictions == labels if targeted else predictions != labels


def pgd_attack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    step: float,
    steps: int,
    norm: Norm = Norm.LINF,
    random_start: bool = True,
    restarts: int = 1,
    targeted: bool = False,
    eot_samples: int = 1,
    loss: Loss = Loss.CE,
    generator: torch.Generator | None = None,
    autocast: Callable[[], ContextManager] = contextlib.nullcontext,
) -> torch.Tensor:
    """Projected gradient descent (Madry et al. 2018) on float images x in [0, 1]; returns
    x_adv with ||x_adv - x|| <= eps in `norm` and x_adv in [0, 1]. `y` holds the true labels,
    or the target labels when `targeted`. `loss` is the objective (cross-entropy or DLR). With
    `restarts` > 1 an example keeps the first restart that succeeds (else the last). The model
    runs in whatever mode it is in (callers choose: eval to evaluate, train for adversarial
    training). FGSM is steps=1, step=eps."""
    x = x.detach()
    best = x
    best_success = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    for restart in range(restarts):
        delta = torch.zeros_like(x)
        if random_start:
            delta = project(random_start_in_ball(x, eps, norm, generator), x, eps, norm)
        for _ in range(steps):
            grad = loss_gradient(
                model, x, delta, y, targeted=targeted, eot_samples=eot_samples, autocast=autocast, loss=loss
            )
            delta = project(delta + step * ascent_direction(grad, norm), x, eps, norm)
        x_adv = (x + delta).detach()
        if restarts == 1:
            return x_adv
        success = attack_succeeds(model, x_adv, y, targeted, autocast)
        # An example keeps its first successful restart; one nothing has fooled keeps the latest.
        take = ~best_success
        best = torch.where(take.view(-1, *([1] * (x.dim() - 1))), x_adv, best)
        best_success |= success
    return best


@dataclass
class PassCounts:
    """Per example, in how many of `passes` forward passes the model predicted the true label
    (`correct`) and the attack's target (`hits`, targeted attacks only). Device tensors."""

    correct: torch.Tensor
    hits: torch.Tensor
    passes: int

    def accuracy(self) -> torch.Tensor:
        """Accuracy averaged over examples and passes (a device scalar)."""
        return self.correct.float().mean() / self.passes

    def accuracy_all_passes(self) -> torch.Tensor:
        """Share of examples classified correctly in every pass (a device scalar)."""
        return (self.correct == self.passes).float().mean()

    def success(self, targeted: bool) -> torch.Tensor:
        """The attack's success averaged over examples and passes: target hits when targeted,
        else misclassifications (a device scalar)."""
        return self.hits.float().mean() / self.passes if targeted else 1 - self.accuracy()

    def head(self, count: int) -> "PassCounts":
        """The counts of the first `count` examples."""
        return PassCounts(self.correct[:count], self.hits[:count], self.passes)


def worst_case(runs: list[PassCounts]) -> PassCounts:
    """Per example, the worst case over the attacks that ran on it: the fewest correct passes
    and the most target hits. Runs may cover only the first examples (a check subset); the
    first run covers them all."""
    correct, hits = runs[0].correct.clone(), runs[0].hits.clone()
    for run in runs[1:]:
        count = len(run.correct)
        correct[:count] = torch.minimum(correct[:count], run.correct)
        hits[:count] = torch.maximum(hits[:count], run.hits)
    return PassCounts(correct, hits, runs[0].passes)


def attack_success_rate(clean: PassCounts, attacked: PassCounts, targeted: bool) -> torch.Tensor:
    """Of the images classified correctly in every clean pass, the share of passes in which the
    attacked image is misclassified (untargeted) or classified as the target (targeted); 0 when
    no image is clean-correct (a device scalar)."""
    originally_correct = (clean.correct == clean.passes).float()
    fooled = attacked.hits if targeted else attacked.passes - attacked.correct
    return (fooled.float() * originally_correct).sum() / (originally_correct.sum() * attacked.passes).clamp_min(1)


PerturbFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (images, labels or targets) -> adversarial


def robust_accuracy(
    model: nn.Module,
    x_uint8: torch.Tensor,
    labels: torch.Tensor,
    *,
    attack: PerturbFn | None,
    targets: torch.Tensor | None = None,
    passes: int = 1,
    batch_size: int = 1024,
    autocast: Callable[[], ContextManager] = contextlib.nullcontext,
    progress: Callable | None = None,
) -> PassCounts:
    """Attack uint8 images batch by batch with `attack(x, labels_or_targets) -> x_adv` (None:
    clean images), then count correct predictions over `passes` forward passes of each
    adversarial batch. No host sync: counts stay on the device."""
    correct = torch.zeros(len(labels), dtype=torch.long, device=labels.device)
    hits = torch.zeros_like(correct)
    starts = range(0, len(labels), batch_size)
    for start in progress(starts) if progress else starts:
        batch = slice(start, start + batch_size)
        x = to_model_input(x_uint8[batch])
        if attack is not None:
            x = attack(x, labels[batch] if targets is None else targets[batch])
        with torch.no_grad(), autocast():
            for _ in range(passes):
                predictions = model(x).argmax(dim=1)
                correct[batch] += predictions == labels[batch]
                if targets is not None:
                    hits[batch] += predictions == targets[batch]
    return PassCounts(correct, hits, passes)
