"""The poisoning backdoors shared by trigger-based attacks (BadNets, Blended, SIG, and a third
party's): a subclass only says how its trigger is applied (`apply_trigger`).

`TriggerBackdoor` (dirty-label) poisons `poison_rate` of all training images:
- all-to-one (`target_mode = "all_to_one"`, default): the images are drawn from the classes other
  than `target_class`, get the trigger and the target label. At test time every test image of
  another class gets the trigger: ASR is the share classified as the target, RA the share still
  classified as its true class;
- all-to-all (`target_mode = "all_to_all"`, if the subclass's `Options` has that field): the
  images are drawn from every class and relabelled y -> (y + 1) mod K (BackdoorBench's mapping).
  At test time every test image gets the trigger: ASR is the share classified as (y + 1) mod K,
  RA the share still classified as y. `target_class` is not used.

`CleanLabelBackdoor` poisons only images of the target class and keeps their labels (SIG,
label-consistent): `poison_rate` is the share of the *target class's* training images that get
the trigger, not a share of the whole set (BackdoorBench measures it against the whole set, so
10% poisons every target image on CIFAR-10: its issues #13 and #36). A rate that rounds to no
image is refused. At test time the trigger is put on images of the other classes, as all-to-one.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from bench import Attack, BenchError, ImageData, Metric, Stage
from bench.toolkit import accuracy, backdoor_robust_accuracy, backdoor_success_rate, check_target_class, predict


class TargetMode(enum.Enum):
    ALL_TO_ONE = "all_to_one"
    ALL_TO_ALL = "all_to_all"


class TargetModes:
    """The targets of a backdoor whose `Options` have `target_class` (and `target_mode`, a
    `TargetMode`, to offer all-to-all): relabelling, the target check, and ASR/RA scoring."""

    name: ClassVar[str]
    options: Any

    @property
    def all_to_all(self) -> bool:
        return getattr(self.options, "target_mode", TargetMode.ALL_TO_ONE) is TargetMode.ALL_TO_ALL

    def poisoned_labels(self, y: torch.Tensor, num_classes: int) -> torch.Tensor:
        """The labels triggered images get: the target, or all-to-all the next class (y + 1) mod K."""
        if self.all_to_all:
            return (y + 1) % num_classes
        return torch.full_like(y, self.options.target_class)

    def _check_target(self, num_classes: int) -> None:
        if not self.all_to_all:
            check_target_class(self.name, self.options.target_class, num_classes)

    def scored(
        self, predict_triggered: Callable[[torch.Tensor], torch.Tensor], test: ImageData, num_classes: int
    ) -> dict[str, float]:
        """ASR and RA from `predict_triggered(images)` (the classes predicted for the triggered
        versions of uint8 test images): all-to-one over the non-target images (ASR: classified as
        the target, RA: still as their class); all-to-all over every image, against (y + 1) mod K."""
        if self.all_to_all:
            predictions = predict_triggered(test.x)
            return {"asr": accuracy(predictions, (test.y + 1) % num_classes), "ra": accuracy(predictions, test.y)}
        target = self.options.target_class
        others = test.y != target
        predictions, labels = predict_triggered(test.x[others]), test.y[others]
        return {
            "asr": backdoor_success_rate(predictions, labels, target),
            "ra": backdoor_robust_accuracy(predictions, labels, target),
        }


def batch_shares(poison_rate: float, cross_ratio: float, batch_size: int) -> tuple[int, int, bool]:
    """(triggered, cross, gated) images of a batch for an attack that controls training: the
    references' int(poison_rate * B) and int(that * cross_ratio); `gated` when poison_rate * B
    < 1 (then one image, triggered by chance with probability poison_rate * B: BackdoorBench's
    `generalize_to_lower_pratio`)."""
    expected = poison_rate * batch_size
    gated = 0 < expected < 1
    triggered = 1 if gated else int(expected)
    return triggered, min(int(triggered * cross_ratio), batch_size - triggered), gated


def check_batch_shares(poison_rate: float, cross_ratio: float) -> None:
    """Raise `ValueError` (from an `Options.__post_init__`: a one-line suite error) when the
    triggered and cross shares of a batch add up to more than the batch."""
    if poison_rate * (1 + cross_ratio) > 1:
        raise ValueError(
            f"poison_rate {poison_rate} with cross_ratio {cross_ratio} asks for "
            f"{poison_rate * (1 + cross_ratio):.3g} of every batch; at most 1"
        )


class TriggerBackdoor(TargetModes, Attack):
    """Subclasses define `apply_trigger(x)` for uint8 [N, C, H, W] images on any device, and an
    `Options` dataclass with at least `poison_rate` and `target_class` (and `target_mode`, a
    `TargetMode`, to offer all-to-all)."""

    stage: ClassVar[Stage] = Stage.TRAINING
    metrics: ClassVar[tuple[Metric, ...]] = (
        Metric("asr", "ASR", higher_is_better=False, doc="attack success rate"),
        Metric("ra", "RA", higher_is_better=True, doc="robust accuracy on triggered inputs"),
    )
    success_metric: ClassVar[str] = "asr"

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        """A triggered copy of uint8 images [N, C, H, W]."""
        raise NotImplementedError

    def trigger_state(self, train: ImageData, ctx) -> dict:
        """What the trigger depends on beyond the options, made once before poisoning (e.g. a
        perturbation searched against a surrogate); kept in the attack state, so cached."""
        return {}

    def triggered(self, x: torch.Tensor, state: dict) -> torch.Tensor:
        """A triggered copy of uint8 images, given the attack state (default: `apply_trigger`)."""
        return self.apply_trigger(x)

    def candidates(self, train: ImageData) -> torch.Tensor:
        """Indices of the training images the attack may poison."""
        if self.all_to_all:
            return torch.arange(len(train), device=train.y.device)
        return (train.y != self.options.target_class).nonzero().squeeze(1)

    def _poison_count(self, train: ImageData) -> int:
        count = int(round(self.options.poison_rate * len(train)))
        available = len(self.candidates(train))
        if count > available:
            raise BenchError(
                f"{self.name}: poison_rate {self.options.poison_rate} asks for {count} poisoned "
                f"images, but only {available} training images are outside the target class"
            )
        return count

    def check_dataset(self, splits):
        self._check_target(splits.num_classes)
        self._poison_count(splits.train)
        self.apply_trigger(splits.test.x[:1])  # raises if the trigger does not fit the images

    def withheld_training_images(self, splits):
        return self._poison_count(splits.train)

    def poison(self, train, ctx):
        self._check_target(ctx.num_classes)
        count = self._poison_count(train)
        state = self.trigger_state(train, ctx)
        candidates = self.candidates(train)
        order = torch.randperm(len(candidates), device=candidates.device, generator=ctx.generator(self.name))
        poisoned = candidates[order[:count]].sort().values
        x, y = train.x.clone(), train.y.clone()
        if count:
            x[poisoned] = self.triggered(self.prepare(x[poisoned], ctx), state)
            y[poisoned] = self.poisoned_labels(y[poisoned], ctx.num_classes)
        return ImageData(x, y), {"poisoned_indices": poisoned, **state}

    def prepare(self, x: torch.Tensor, ctx) -> torch.Tensor:
        """The chosen training images before the trigger is added (as they are by default;
        label-consistent's adversarial perturbation changes them)."""
        return x

    def evaluate(self, model, test, ctx, state):
        self._check_target(ctx.num_classes)
        return self.scored(lambda x: predict(model, self.triggered(x, state), ctx), test, ctx.num_classes)


AllToOneBackdoor = TriggerBackdoor  # the earlier name (all-to-one was its only mode)


class CleanLabelBackdoor(TriggerBackdoor):
    """Poisons `poison_rate` of the target class's training images (labels kept); subclasses
    define `apply_trigger`, and may override `prepare(x, ctx)` (see `TriggerBackdoor`)."""

    def candidates(self, train: ImageData) -> torch.Tensor:
        return (train.y == self.options.target_class).nonzero().squeeze(1)

    def _poison_count(self, train: ImageData) -> int:
        available = len(self.candidates(train))
        count = int(round(self.options.poison_rate * available))
        if self.options.poison_rate > 0 and count == 0:
            raise BenchError(
                f"{self.name}: poison_rate {self.options.poison_rate} of the target class's {available} training "
                "images rounds to no image; a clean-label rate is a share of the target class"
            )
        return count

    def poisoned_labels(self, y: torch.Tensor, num_classes: int) -> torch.Tensor:
        return y  # clean-label: the labels stay true
