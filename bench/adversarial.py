"""Test-time (evasion) attacks in native PyTorch: PGD and its one-step case FGSM, with random
restarts, a cross-entropy or DLR (margin) objective and expectation over transformation (EOT)
for stochastic models, and the evaluation protocol the evasion attack plugins share
(`evaluate_evasion`; the pgd plugin's docstring gives it in full).

Everything runs batched on the images' device. The loss is computed in float32 even when the
forward pass runs under bf16 autocast; per-example results are accumulated as device tensors
and read back once per evaluation.

A model is *stochastic* when it declares `stochastic = True` or when two forward passes on the
same images differ (`bench.evaluation.is_stochastic`), so a third-party randomized defense gets
EOT without declaring anything. Such a model is attacked with one-sample gradients and with EOT
gradients averaged over `eot_samples` draws, and its predictions are counted over `passes`
repeated forward passes (Athalye, Carlini & Wagner 2018).

The gradient-free check attack, Square (Andriushchenko et al. 2020), comes from the optional
`torchattacks` package (`TORCHATTACKS_SUPPORTED`); without it (or with a version outside that
range) the protocol runs without Square and its protocol line says so.
"""

from __future__ import annotations

import contextlib
import enum
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, ContextManager

import torch
import torch.nn.functional as F
from torch import nn

from bench.attacks import Attack, Metric, MetricKind, Stage, check_target_class
from bench.context import RunContext, derived_seed
from bench.data import ImageData
from bench.errors import BenchError

# eval_mode and is_stochastic live in bench.evaluation (clean accuracy needs them too); they are
# imported from here by the evasion plugins.
from bench.evaluation import STOCHASTIC_PROBE_IMAGES, eval_mode, is_stochastic, to_model_input
from bench.options import option

# What every evasion attack plugin reports (see evaluate_evasion and the pgd plugin). The
# headline is the per-image worst case on the images every attack ran on (the check subset):
# one protocol per number; the per-attack numbers are diagnostics.
EVASION_METRICS = (
    Metric(
        "robust_acc",
        "Robust acc (worst case)",
        higher_is_better=True,
        doc="robust accuracy, the per-image worst case over every attack (as AutoAttack counts), on the images "
        "every attack ran on (the check subset; see the protocol line)",
        headline=True,
    ),
    Metric("asr", "ASR (worst case)", higher_is_better=False, doc="attack success rate of the worst case"),
    Metric(
        "unreliable",
        "Unreliable",
        higher_is_better=False,
        kind=MetricKind.FLAG,
        doc="a gradient-masking check beat the attack",
    ),
    Metric("robust_acc_attack", "Attack", higher_is_better=True, diagnostic=True),
    Metric("robust_acc_eot", "EOT", higher_is_better=True, diagnostic=True),
    Metric("robust_acc_eot_all", "EOT, all passes", higher_is_better=True, diagnostic=True),
    Metric("robust_acc_check_ce", "Check CE-PGD", higher_is_better=True, diagnostic=True),
    Metric("robust_acc_check_dlr", "Check DLR-PGD", higher_is_better=True, diagnostic=True),
    Metric("robust_acc_check_square", "Check Square", higher_is_better=True, diagnostic=True),
    Metric("masking_gap", "Masking gap", higher_is_better=False, diagnostic=True),
    Metric("clean_acc_one_pass", "C-Acc (one pass)", higher_is_better=True, diagnostic=True),
    Metric("clean_acc_all_passes", "C-Acc (all passes)", higher_is_better=True, diagnostic=True),
    Metric("stochastic", "Stochastic", higher_is_better=None, kind=MetricKind.NUMBER, diagnostic=True),
    Metric("headline_images", "Headline images", higher_is_better=None, kind=MetricKind.NUMBER, diagnostic=True),
)

# torchattacks releases whose internals this project reaches into (the autoattack plugin's
# member attacks and their attribute names): at least the first, below the second.
TORCHATTACKS_SUPPORTED = ((3, 5), (3, 6))
TORCHATTACKS_REQUIREMENT = "torchattacks>=3.5,<3.6"


class Norm(enum.Enum):
    LINF = "linf"
    L2 = "l2"


class Loss(enum.Enum):
    """The objective PGD ascends: cross-entropy, or the DLR margin (Croce & Hein 2020), which is
    invariant to scaling and shifting the logits."""

    CE = "ce"
    DLR = "dlr"


def torchattacks_problem() -> str | None:
    """Why torchattacks cannot be used (not installed, or a version outside
    `TORCHATTACKS_SUPPORTED`), or None when it can."""
    try:
        import torchattacks
    except ImportError:
        return "torchattacks is not installed"
    version = getattr(torchattacks, "__version__", "unknown")
    try:
        major_minor = tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        major_minor = None
    low, high = TORCHATTACKS_SUPPORTED
    if major_minor is None or not low <= major_minor < high:
        return f"torchattacks {version} is installed, outside the supported {TORCHATTACKS_REQUIREMENT}"
    return None


def import_torchattacks(needed_by: str) -> ModuleType:
    """The torchattacks module, or a `BenchError` naming `needed_by` and the pip command when it
    is missing or its version is outside `TORCHATTACKS_SUPPORTED`."""
    problem = torchattacks_problem()
    if problem is not None:
        raise BenchError(
            f"{needed_by} needs {TORCHATTACKS_REQUIREMENT}, but {problem}: "
            f"pip install 'robustness-bench[autoattack]' (or pip install '{TORCHATTACKS_REQUIREMENT}')"
        )
    import torchattacks

    return torchattacks


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


def square_attack(model: nn.Module, *, eps: float, norm: Norm, queries: int, targeted: bool, seed: int) -> "PerturbFn":
    """The Square attack (Andriushchenko et al. 2020; gradient-free random search on the margin)
    from torchattacks, as RobustBench's AutoAttack runs it: margin loss, p_init 0.8, one
    restart, no rescaling of the square-size schedule to the query budget
    (`resc_schedule=False`). Returns `(images, labels or targets) -> adversarial images`.
    torchattacks reseeds torch's global generator on every call; the call runs inside
    `torch.random.fork_rng`, so the caller's random state is left as it was."""
    torchattacks = import_torchattacks("the Square check")
    attack = torchattacks.Square(
        model,
        norm="Linf" if norm is Norm.LINF else "L2",
        eps=eps,
        n_queries=queries,
        n_restarts=1,
        p_init=0.8,
        loss="margin",
        resc_schedule=False,
        seed=seed,
    )
    if targeted:
        attack.set_mode_targeted_by_label(quiet=True)

    def perturb(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        attack.set_device(x.device)
        with torch.no_grad(), torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
            # contiguous: torchattacks reshapes with .view(), which channels_last tensors refuse
            return attack(x.contiguous(), y).detach()

    return perturb


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
    check_square_queries: int  # 0: no Square check

    @property
    def check_steps(self) -> int:
        return self.steps * self.check_steps_factor


@dataclass(frozen=True)
class ProtocolOptions:
    """The options every evasion attack plugin shares; a plugin's `Options` extends this with
    its threat model and steps."""

    targeted: bool = option(False, "aim for a target class instead of any wrong class")
    target_class: int = option(-1, "target of targeted attacks; -1: (label + 1) mod classes", min=-1)
    subset: int = option(1000, "attack the first N evaluation images; 0: all of them", min=0)
    eot_samples: int = option(10, "stochastic models: gradient samples averaged per EOT step", min=1)
    passes: int = option(10, "stochastic models: forward passes each image is predicted in", min=1)
    masking_threshold: float = option(
        0.05,
        "flag 'unreliable' when a check attack's success rate exceeds the configured attack's by more",
        min=0,
        max=1,
    )
    check_subset: int = option(200, "masking check: attack the first N images of the subset", min=1)
    check_restarts: int = option(3, "masking check: random restarts of its CE-PGD and DLR-PGD", min=1)
    check_square_queries: int = option(
        1000,
        "masking check: queries of the gradient-free Square attack (needs torchattacks); 0: no Square check",
        min=0,
    )


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
            norm=o.norm,
            eps=o.eps,
            step=step,
            steps=steps,
            restarts=restarts,
            random_start=random_start,
            targeted=o.targeted,
            target_class=o.target_class,
            subset=o.subset,
            eot_samples=o.eot_samples,
            passes=o.passes,
            masking_threshold=o.masking_threshold,
            check_subset=o.check_subset,
            check_steps_factor=o.check_steps_factor,
            check_restarts=o.check_restarts,
            check_square_queries=o.check_square_queries,
        )

    def check_dataset(self, splits):
        check_target_class(self.name, self.options.target_class, splits.num_classes)

    def describe_protocol(self) -> str:
        return describe_evasion_protocol(self.name, self.settings())

    def evaluate(self, model, test, ctx, state):
        check_target_class(self.name, self.options.target_class, ctx.num_classes)
        return evaluate_evasion(model, test, ctx, self.settings(), stream=self.name)


def square_check_problem(settings: EvasionSettings) -> str | None:
    """Why the Square check will not run (turned off, or torchattacks unusable), or None."""
    if settings.check_square_queries == 0:
        return "turned off (check_square_queries = 0)"
    return torchattacks_problem()


def describe_evasion_protocol(name: str, settings: EvasionSettings) -> str:
    """The protocol line under the leaderboard table: the attack, the EOT rule, the worst case
    and the masking check, including whether Square could run (judged when the job runs)."""
    s = settings
    images = f"the first {s.subset}" if s.subset else "all"
    start = ", random start" if s.random_start else ""
    goal = "targeted" if s.targeted else "untargeted"
    square = square_check_problem(s)
    if square is None:
        import torchattacks

        square_text = (
            f"Square with {s.check_square_queries} queries (torchattacks {torchattacks.__version__}, resc_schedule off)"
        )
    else:
        square_text = f"NO Square check: {square}, so masking that hides every gradient goes undetected"
    return (
        f"{name}: {goal} {s.norm.value} eps {s.eps:.4g}, {s.steps} step(s) of {s.step:.4g}, {s.restarts} "
        f"restart(s){start}, on {images} evaluation images; stochastic models (declared, or two forward passes "
        f"differ) are also attacked with EOT-{s.eot_samples} and predicted {s.passes} times per image. "
        f"Robust acc and ASR: per image, the worst case over every attack, on the first {s.check_subset} images "
        f"(every attack ran on them; the configured attack alone on the rest, in its diagnostic column). "
        f"Masking check on the first {s.check_subset} images: CE-PGD and DLR-PGD with {s.check_steps} steps x "
        f"{s.check_restarts} restarts "
        f"(EOT for stochastic models), {square_text}; 'unreliable' when a check beats the attack by more than "
        f"{s.masking_threshold:.0%}"
    )


def evaluate_evasion(
    model: nn.Module, test: ImageData, ctx: RunContext, settings: EvasionSettings, stream: str
) -> dict[str, float]:
    """The evasion protocol (the pgd plugin's docstring gives it in full); returns the metric
    values. On the first `subset` images (targeted with a fixed class: those not of it):

    - the configured attack, with one-sample gradients (`robust_acc_attack`); for a stochastic
      model (`is_stochastic`) also its EOT variant (`robust_acc_eot`, `robust_acc_eot_all`);
    - on the first `check_subset` of those images only, the masking checks: CE-PGD and DLR-PGD
      with `check_steps_factor` times the steps (step 2.5 eps / steps), random start and
      `check_restarts` restarts, with EOT for stochastic models, and Square with
      `check_square_queries` queries when torchattacks is usable (`robust_acc_check_*`,
      accuracies on the check images).

    `robust_acc` and `asr` are per image the worst case over every attack, on the images every
    attack ran on: the first `check_subset` (`headline_images` says how many). Mixing in the rest,
    seen by the configured attack alone, would put two protocols into one number (a defense that
    fools only the configured attack would gain on the unchecked images). Every adversarial image
    is predicted `passes` times for a stochastic model, once otherwise. `masking_gap` is the
    largest amount by which a check's success rate exceeds that of the configured attack (per
    image, the worse of its variants) on the check images, 0 when
    none does; `unreliable` is 1 when it exceeds `masking_threshold`."""
    s = settings
    data = test if s.subset == 0 else ImageData(test.x[: s.subset], test.y[: s.subset])
    targets = None
    if s.targeted:
        if s.target_class >= 0:  # images already of the target class cannot be "moved" to it
            data = data.subset((data.y != s.target_class).nonzero().squeeze(1))
            targets = torch.full_like(data.y, s.target_class)
        else:
            targets = (data.y + 1) % ctx.num_classes
    stochastic = is_stochastic(model, to_model_input(data.x[:STOCHASTIC_PROBE_IMAGES]))
    passes = s.passes if stochastic else 1
    eot_samples = s.eot_samples if stochastic else 1
    size = min(s.check_subset, len(data))

    def pgd(stream_name: str, **overrides) -> PerturbFn:
        kwargs: dict[str, Any] = dict(
            eps=s.eps,
            step=s.step,
            steps=s.steps,
            norm=s.norm,
            random_start=s.random_start,
            restarts=s.restarts,
            targeted=s.targeted,
            eot_samples=1,
            autocast=ctx.autocast,
        )
        kwargs.update(overrides)
        generator = ctx.generator(f"{stream}:{stream_name}")
        return lambda x, y: pgd_attack(model, x, y, generator=generator, **kwargs)

    def counts(attack: PerturbFn | None, desc: str, count: int = len(data)) -> PassCounts:
        return robust_accuracy(
            model,
            data.x[:count],
            data.y[:count],
            attack=attack,
            targets=None if targets is None else targets[:count],
            passes=passes,
            batch_size=ctx.eval_batch_size,
            autocast=ctx.autocast,
            progress=lambda it: ctx.progress(it, desc=f"{stream} {desc}"),
        )

    check = dict(
        steps=s.check_steps,
        step=2.5 * s.eps / s.check_steps,  # Madry et al.: cross the ball 2.5 times
        restarts=s.check_restarts,
        random_start=True,
        eot_samples=eot_samples,
    )
    with eval_mode(model):
        clean = counts(None, "clean")
        attack = counts(pgd("attack"), "attack")
        # For a deterministic model the EOT variant is the same attack (a sum of identical gradients).
        eot = counts(pgd("eot", eot_samples=s.eot_samples), "eot") if stochastic else attack
        checks = {
            "check_ce": counts(pgd("check_ce", **check), "check CE-PGD", size),
            "check_dlr": counts(pgd("check_dlr", loss=Loss.DLR, **check), "check DLR-PGD", size),
        }
        if square_check_problem(s) is None:
            seed = derived_seed(ctx.seed, f"{stream}:check_square") % 2**31
            square = square_attack(
                model, eps=s.eps, norm=s.norm, queries=s.check_square_queries, targeted=s.targeted, seed=seed
            )
            checks["check_square"] = counts(square, "check Square", size)

    configured = worst_case([attack, eot]).head(size)
    gaps = [run.success(s.targeted) - configured.success(s.targeted) for run in checks.values()]
    gap = torch.stack(gaps).max().clamp_min(0)
    worst = worst_case([attack.head(size), eot.head(size), *checks.values()])
    values = {
        "robust_acc": worst.accuracy(),
        "asr": attack_success_rate(clean.head(size), worst, s.targeted),
        "unreliable": (gap > s.masking_threshold).float(),
        "robust_acc_attack": attack.accuracy(),
        "robust_acc_eot": eot.accuracy(),
        "robust_acc_eot_all": eot.accuracy_all_passes(),
        **{f"robust_acc_{key}": run.accuracy() for key, run in checks.items()},
        "masking_gap": gap,
        "clean_acc_one_pass": clean.accuracy(),
        "clean_acc_all_passes": clean.accuracy_all_passes(),
        "stochastic": torch.tensor(float(stochastic), device=gap.device),
        "headline_images": torch.tensor(float(size), device=gap.device),
    }
    numbers = torch.stack([v.float() for v in values.values()]).tolist()  # the counts are read back once
    return dict(zip(values, numbers))
