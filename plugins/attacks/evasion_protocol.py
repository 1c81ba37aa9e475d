"""The evaluation protocol the built-in evasion attacks share (pgd, fgsm; a third-party
evasion attack may subclass `EvasionAttack` too): the configured attack, its EOT variant for
stochastic models, the masking checks (CE-PGD, DLR-PGD and the gradient-free Square), the per-image
worst case over all of them, and the metrics it reports. The pgd plugin's docstring gives the
protocol in full.

Square (Andriushchenko et al. 2020) comes from the optional `torchattacks` package
(`TORCHATTACKS_SUPPORTED`); without it (or with a version outside that range) the protocol runs
without Square and its protocol line says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import nn

from bench import Attack, BenchError, ImageData, Metric, MetricKind, RunContext, Stage, option
from bench.toolkit import (
    STOCHASTIC_PROBE_IMAGES,
    Loss,
    Norm,
    PassCounts,
    PerturbFn,
    attack_success_rate,
    check_target_class,
    derived_seed,
    eval_mode,
    is_stochastic,
    pgd_attack,
    robust_accuracy,
    to_model_input,
    worst_case,
)

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
    data, targets = _attacked_images(test, settings, ctx.num_classes)
    stochastic = is_stochastic(model, to_model_input(data.x[:STOCHASTIC_PROBE_IMAGES]))
    runs = _ProtocolRuns(model, data, targets, ctx, settings, stream, stochastic)
    s, size = settings, min(settings.check_subset, len(data))
    check = dict(
        steps=s.check_steps,
        step=2.5 * s.eps / s.check_steps,  # Madry et al.: cross the ball 2.5 times
        restarts=s.check_restarts,
        random_start=True,
        eot_samples=s.eot_samples if stochastic else 1,
    )
    with eval_mode(model):
        clean = runs.counts(None, "clean")
        attack = runs.counts(runs.pgd("attack"), "attack")
        # For a deterministic model the EOT variant is the same attack (a sum of identical gradients).
        eot = runs.counts(runs.pgd("eot", eot_samples=s.eot_samples), "eot") if stochastic else attack
        checks = {
            "check_ce": runs.counts(runs.pgd("check_ce", **check), "check CE-PGD", size),
            "check_dlr": runs.counts(runs.pgd("check_dlr", loss=Loss.DLR, **check), "check DLR-PGD", size),
        }
        if square_check_problem(s) is None:
            seed = derived_seed(ctx.seed, f"{stream}:check_square") % 2**31
            square = square_attack(
                model, eps=s.eps, norm=s.norm, queries=s.check_square_queries, targeted=s.targeted, seed=seed
            )
            checks["check_square"] = runs.counts(square, "check Square", size)
    return _protocol_values(s, clean, attack, eot, checks, size, stochastic)


def _attacked_images(test: ImageData, s: EvasionSettings, num_classes: int) -> tuple[ImageData, torch.Tensor | None]:
    """The first `subset` test images and, for a targeted attack, their targets (a fixed target
    class drops the images already of it: they cannot be "moved" to it)."""
    data = test if s.subset == 0 else ImageData(test.x[: s.subset], test.y[: s.subset])
    if not s.targeted:
        return data, None
    if s.target_class >= 0:
        data = data.subset((data.y != s.target_class).nonzero().squeeze(1))
        return data, torch.full_like(data.y, s.target_class)
    return data, (data.y + 1) % num_classes


@dataclass
class _ProtocolRuns:
    """One evaluation's attacks: PGD variants with the configured threat model, each with its
    own random stream, and their per-image pass counts on the first `count` images."""

    model: nn.Module
    data: ImageData
    targets: torch.Tensor | None
    ctx: RunContext
    settings: EvasionSettings
    stream: str
    stochastic: bool

    def pgd(self, stream_name: str, **overrides) -> PerturbFn:
        s = self.settings
        kwargs: dict[str, Any] = dict(
            eps=s.eps,
            step=s.step,
            steps=s.steps,
            norm=s.norm,
            random_start=s.random_start,
            restarts=s.restarts,
            targeted=s.targeted,
            eot_samples=1,
            autocast=self.ctx.autocast,
        )
        kwargs.update(overrides)
        generator = self.ctx.generator(f"{self.stream}:{stream_name}")
        return lambda x, y: pgd_attack(self.model, x, y, generator=generator, **kwargs)

    def counts(self, attack: PerturbFn | None, desc: str, count: int | None = None) -> PassCounts:
        count = len(self.data) if count is None else count
        return robust_accuracy(
            self.model,
            self.data.x[:count],
            self.data.y[:count],
            attack=attack,
            targets=None if self.targets is None else self.targets[:count],
            passes=self.settings.passes if self.stochastic else 1,
            batch_size=self.ctx.eval_batch_size,
            autocast=self.ctx.autocast,
            progress=lambda it: self.ctx.progress(it, desc=f"{self.stream} {desc}"),
        )


def _protocol_values(
    s: EvasionSettings,
    clean: PassCounts,
    attack: PassCounts,
    eot: PassCounts,
    checks: dict[str, PassCounts],
    size: int,
    stochastic: bool,
) -> dict[str, float]:
    """The metric values: the worst case on the `size` check images, the masking gap, and the
    per-attack diagnostics; the device counts are read back once."""
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
