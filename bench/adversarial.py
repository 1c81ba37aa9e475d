"""Test-time (evasion) attacks in native PyTorch: PGD and its one-step case FGSM, with random
restarts and expectation over transformation (EOT) for stochastic models, and the evaluation
protocol the evasion attack plugins share.

Everything runs batched on the images' device. The loss is computed in float32 even when the
forward pass runs under bf16 autocast; per-example results are accumulated as device tensors
and read back once per evaluation.

A model is *stochastic* when `getattr(model, "stochastic", False)` is true (SAP, randomized
input transforms). Such a model is attacked twice, with one-sample gradients and with EOT
gradients averaged over `eot_samples` draws, and its predictions are counted over `passes`
repeated forward passes (Athalye, Carlini & Wagner 2018).
"""

from __future__ import annotations

import contextlib
import enum
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch
import torch.nn.functional as F
from torch import nn

from bench.attacks import Attack, Metric, Stage, check_target_class
from bench.context import RunContext
from bench.data import ImageData
from bench.evaluation import to_model_input
from bench.options import option

# What every evasion attack plugin reports (see evaluate_evasion and the pgd plugin).
EVASION_METRICS = (
    Metric("robust_acc", "Robust acc", higher_is_better=True),
    Metric("asr", "ASR", higher_is_better=False),
    Metric("robust_acc_eot", "Robust acc (EOT)", higher_is_better=True),
    Metric("robust_acc_eot_all", "Robust acc (EOT, all passes)", higher_is_better=True),
    Metric("clean_acc_all_passes", "C-Acc (all passes)", higher_is_better=True),
    Metric("masking_gap", "Masking gap", higher_is_better=False),
    Metric("unreliable", "Unreliable", higher_is_better=False),
)


class Norm(enum.Enum):
    LINF = "linf"
    L2 = "l2"


def is_stochastic(model: nn.Module) -> bool:
    return bool(getattr(model, "stochastic", False))


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Run `model` in eval mode inside the block, restoring its mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


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


def loss_gradient(model: nn.Module, x: torch.Tensor, delta: torch.Tensor, labels: torch.Tensor, *,
                  targeted: bool, eot_samples: int, autocast: Callable[[], ContextManager]) -> torch.Tensor:
    """Gradient of the attack objective at x + delta, summed over `eot_samples` forward passes
    (one sample per pass; the sum points the same way as the EOT average). Untargeted attacks
    ascend the cross-entropy of the true labels; targeted ones descend that of the targets."""
    delta = delta.detach().requires_grad_(True)
    grad = torch.zeros_like(delta)
    for _ in range(eot_samples):
        with autocast():
            logits = model(x + delta)
        loss = F.cross_entropy(logits.float(), labels, reduction="sum")
        if targeted:
            loss = -loss
        grad += torch.autograd.grad(loss, delta)[0]
    return grad


def attack_succeeds(model: nn.Module, x_adv: torch.Tensor, labels: torch.Tensor, targeted: bool,
                    autocast: Callable[[], ContextManager]) -> torch.Tensor:
    with torch.no_grad(), autocast():
        predictions = model(x_adv).argmax(dim=1)
    return predictions == labels if targeted else predictions != labels


def pgd_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, step: float, steps: int,
               norm: Norm = Norm.LINF, random_start: bool = True, restarts: int = 1, targeted: bool = False,
               eot_samples: int = 1, generator: torch.Generator | None = None,
               autocast: Callable[[], ContextManager] = contextlib.nullcontext) -> torch.Tensor:
    """Projected gradient descent (Madry et al. 2018) on float images x in [0, 1]; returns
    x_adv with ||x_adv - x|| <= eps in `norm` and x_adv in [0, 1]. `y` holds the true labels,
    or the target labels when `targeted`. With `restarts` > 1 an example keeps the first
    restart that succeeds (else the last). The model runs in whatever mode it is in (callers
    choose: eval to evaluate, train for adversarial training). FGSM is steps=1, step=eps."""
    x = x.detach()
    best = x
    best_success = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    for restart in range(restarts):
        delta = torch.zeros_like(x)
        if random_start:
            delta = project(random_start_in_ball(x, eps, norm, generator), x, eps, norm)
        for _ in range(steps):
            grad = loss_gradient(model, x, delta, y, targeted=targeted, eot_samples=eot_samples, autocast=autocast)
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


PerturbFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (images, labels or targets) -> adversarial


def robust_accuracy(model: nn.Module, x_uint8: torch.Tensor, labels: torch.Tensor, *, attack: PerturbFn | None,
                    targets: torch.Tensor | None = None, passes: int = 1, batch_size: int = 1024,
                    autocast: Callable[[], ContextManager] = contextlib.nullcontext,
                    progress: Callable | None = None) -> PassCounts:
    """Attack uint8 images batch by batch with `attack(x, labels_or_targets) -> x_adv` (None:
    clean images), then count correct predictions over `passes` forward passes of each
    adversarial batch. No host sync: counts stay on the device."""
    correct = torch.zeros(len(labels), dtype=torch.long, device=labels.device)
    hits = torch.zeros_like(correct)
    starts = range(0, len(labels), batch_size)
    for start in (progress(starts) if progress else starts):
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


@dataclass(frozen=True)
class EvasionSettings:
    """The evasion protocol's settings, as the pgd and fgsm plugins' options give them."""

    norm: Norm
    eps: float
    step: float
    steps: int
    restarts: int
    random_start: bool
    targeted: bool
    target_class: int  # -1: (label + 1) mod classes
    subset: int  # 0: all images
    eot_samples: int
    passes: int
    masking_threshold: float
    check_subset: int
    check_steps_factor: int
    check_restarts: int


@dataclass(frozen=True)
class ProtocolOptions:
    """The options every evasion attack plugin shares; a plugin's `Options` extends this with
    its threat model and steps."""

    targeted: bool = option(False, "aim for a target class instead of any wrong class")
    target_class: int = option(-1, "target of targeted attacks; -1: (label + 1) mod classes", min=-1)
    subset: int = option(1000, "attack the first N evaluation images; 0: all of them", min=0)
    eot_samples: int = option(10, "stochastic models: gradient samples averaged per EOT step", min=1)
    passes: int = option(10, "stochastic models: forward passes each image is predicted in", min=1)
    masking_threshold: float = option(0.05, "flag 'unreliable' when this attack's robust accuracy exceeds a "
                                            "stronger attack's by more", min=0, max=1)
    check_subset: int = option(200, "deterministic models: images the stronger check attacks", min=1)
    check_restarts: int = option(3, "deterministic models: the check's random restarts", min=1)


class EvasionAttack(Attack):
    """A test-time attack evaluated with the shared protocol (`evaluate_evasion`): a subclass
    gives an `Options` extending `ProtocolOptions` and turns it into `EvasionSettings`."""

    stage = Stage.TEST_TIME
    metrics = EVASION_METRICS
    success_metric = "asr"

    def settings(self) -> "EvasionSettings":
        raise NotImplementedError

    def protocol_settings(self, *, step: float, steps: int, restarts: int, random_start: bool) -> "EvasionSettings":
        """EvasionSettings from the shared options plus `norm`, `eps`, `check_steps_factor` and
        the attack's own steps."""
        o = self.options
        return EvasionSettings(
            norm=o.norm, eps=o.eps, step=step, steps=steps, restarts=restarts, random_start=random_start,
            targeted=o.targeted, target_class=o.target_class, subset=o.subset, eot_samples=o.eot_samples,
            passes=o.passes, masking_threshold=o.masking_threshold, check_subset=o.check_subset,
            check_steps_factor=o.check_steps_factor, check_restarts=o.check_restarts)

    def check_dataset(self, splits):
        check_target_class(self.name, self.options.target_class, splits.num_classes)

    def evaluate(self, model, test, ctx, state):
        check_target_class(self.name, self.options.target_class, ctx.num_classes)
        return evaluate_evasion(model, test, ctx, self.settings(), stream=self.name)


def evaluate_evasion(model: nn.Module, test: ImageData, ctx: RunContext, settings: EvasionSettings,
                     stream: str) -> dict[str, float]:
    """The evasion protocol (see the pgd plugin's docstring); returns the metric values."""
    s = settings
    data = test if s.subset == 0 else ImageData(test.x[:s.subset], test.y[:s.subset])
    targets = None
    if s.targeted:
        if s.target_class >= 0:  # images already of the target class cannot be "moved" to it
            data = data.subset((data.y != s.target_class).nonzero().squeeze(1))
            targets = torch.full_like(data.y, s.target_class)
        else:
            targets = (data.y + 1) % ctx.num_classes
    stochastic = is_stochastic(model)
    passes = s.passes if stochastic else 1

    def attack_with(stream_name: str, **overrides) -> PerturbFn:
        kwargs = dict(eps=s.eps, step=s.step, steps=s.steps, norm=s.norm, random_start=s.random_start,
                      restarts=s.restarts, targeted=s.targeted, eot_samples=1, autocast=ctx.autocast)
        kwargs.update(overrides)
        generator = ctx.generator(f"{stream}:{stream_name}")
        return lambda x, y: pgd_attack(model, x, y, generator=generator, **kwargs)

    def counts(x, y, t, attack, desc) -> PassCounts:
        return robust_accuracy(model, x, y, attack=attack, targets=t, passes=passes,
                               batch_size=ctx.eval_batch_size, autocast=ctx.autocast,
                               progress=lambda it: ctx.progress(it, desc=f"{stream} {desc}"))

    with eval_mode(model):
        clean = counts(data.x, data.y, None, None, "clean")
        plain = counts(data.x, data.y, targets, attack_with("plain"), "attack")
        if stochastic:
            strongest = counts(data.x, data.y, targets, attack_with("eot", eot_samples=s.eot_samples), "eot")
            gap = plain.accuracy() - strongest.accuracy()
        else:
            strongest = plain
            size = s.check_subset
            check_steps = s.steps * s.check_steps_factor
            # Madry et al.'s rule: steps long enough to cross the ball 2.5 times.
            strong = counts(data.x[:size], data.y[:size], None if targets is None else targets[:size],
                            attack_with("check", steps=check_steps, step=2.5 * s.eps / check_steps,
                                        restarts=s.check_restarts, random_start=True), "check")
            plain_on_check = PassCounts(plain.correct[:size], plain.hits[:size], 1)
            # Worst case over both attacks per image, so the gap is never negative.
            worst = PassCounts(torch.minimum(plain_on_check.correct, strong.correct), strong.hits, 1)
            gap = plain_on_check.accuracy() - worst.accuracy()

    originally_correct = (clean.correct == passes).float()
    fooled = strongest.hits if s.targeted else passes - strongest.correct
    asr = (fooled.float() * originally_correct).sum() / (originally_correct.sum() * passes)
    values = {"robust_acc": plain.accuracy(), "asr": asr,
              "robust_acc_eot": strongest.accuracy(), "robust_acc_eot_all": strongest.accuracy_all_passes(),
              "clean_acc_all_passes": clean.accuracy_all_passes(), "masking_gap": gap,
              "unreliable": (gap > s.masking_threshold).float()}
    numbers = torch.stack([v.float() for v in values.values()]).tolist()  # the one host sync
    return dict(zip(values, numbers))
