"""The all-to-one poisoning backdoor, shared by trigger-based attacks (BadNets, Blended, and a
third party's): a subclass only says how its trigger is applied.

`poison_rate` of the training images, drawn from the classes other than the target, get the
trigger and the target label. At test time every test image of another class gets the trigger:
ASR is the share classified as the target, RA the share still classified as their true class.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from bench import Attack, BenchError, ImageData, Metric, Stage
from bench.toolkit import backdoor_robust_accuracy, backdoor_success_rate, check_target_class, predict


class AllToOneBackdoor(Attack):
    """Subclasses define `apply_trigger(x)` for uint8 [N, C, H, W] images on any device, and an
    `Options` dataclass with at least `poison_rate` and `target_class`."""

    stage: ClassVar[Stage] = Stage.TRAINING
    metrics: ClassVar[tuple[Metric, ...]] = (
        Metric("asr", "ASR", higher_is_better=False, doc="attack success rate"),
        Metric("ra", "RA", higher_is_better=True, doc="robust accuracy on triggered inputs"),
    )
    success_metric: ClassVar[str] = "asr"

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        """A triggered copy of uint8 images [N, C, H, W]."""
        raise NotImplementedError

    def _check_target(self, num_classes: int) -> None:
        check_target_class(self.name, self.options.target_class, num_classes)

    def _poison_count(self, train: ImageData) -> int:
        count = int(round(self.options.poison_rate * len(train)))
        outside = int((train.y != self.options.target_class).sum())
        if count > outside:
            raise BenchError(
                f"{self.name}: poison_rate {self.options.poison_rate} asks for {count} poisoned "
                f"images, but only {outside} training images are outside the target class"
            )
        return count

    def check_dataset(self, splits):
        self._check_target(splits.num_classes)
        self._poison_count(splits.train)
        self.apply_trigger(splits.test.x[:1])  # raises if the trigger does not fit the images

    def withheld_training_images(self, splits):
        return int(round(self.options.poison_rate * len(splits.train)))

    def poison(self, train, ctx):
        self._check_target(ctx.num_classes)
        target = self.options.target_class
        count = self._poison_count(train)
        candidates = (train.y != target).nonzero().squeeze(1)
        order = torch.randperm(len(candidates), device=candidates.device, generator=ctx.generator(self.name))
        poisoned = candidates[order[:count]].sort().values
        x, y = train.x.clone(), train.y.clone()
        x[poisoned] = self.apply_trigger(x[poisoned])
        y[poisoned] = target
        return ImageData(x, y), {"poisoned_indices": poisoned}

    def evaluate(self, model, test, ctx, state):
        self._check_target(ctx.num_classes)
        target = self.options.target_class
        others = test.y != target
        predictions = predict(model, self.apply_trigger(test.x[others]), ctx)
        labels = test.y[others]
        return {
            "asr": backdoor_success_rate(predictions, labels, target),
            "ra": backdoor_robust_accuracy(predictions, labels, target),
        }
