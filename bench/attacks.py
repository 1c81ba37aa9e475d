"""The attack plugin kind. An attack acts at one of three stages:

- `Stage.TRAINING`: `poison()` changes the training set before the model is trained (BadNets);
  an attack that controls training (`controls_training = True`: WaNet's noise mode) also
  changes every training batch, through `training_batch()`, inside the core's training loop;
- `Stage.POST_TRAINING`: `tamper()` changes the trained model's weights (error injection);
- `Stage.TEST_TIME`: only `evaluate()` acts, perturbing test inputs (PGD).

Every attack implements `evaluate()`, which measures its own success on a (possibly defended)
model, and lists the metrics it reports in `metrics`. `success_metric` names the one that the
defense effectiveness rating (DER) is computed from.
"""

from __future__ import annotations

import enum
from typing import Any, ClassVar

import torch
from torch import nn

from bench.context import RunContext
from bench.data import DatasetSplits, ImageData
from bench.errors import BenchError
from bench.metrics import Metric, MetricKind
from bench.plugin import Plugin

__all__ = ["Attack", "Metric", "MetricKind", "Stage", "check_target_class"]


def check_target_class(attack_name: str, target_class: int, num_classes: int) -> None:
    """Raise a `BenchError` naming the attack when `target_class` is not a class of the data."""
    if target_class >= num_classes:
        raise BenchError(
            f"{attack_name}: target_class {target_class} does not exist; the dataset has classes 0..{num_classes - 1}"
        )


class Stage(enum.Enum):
    TRAINING = "training"
    POST_TRAINING = "post_training"
    TEST_TIME = "test_time"


class Attack(Plugin):
    kind: ClassVar[str] = "attack"
    stage: ClassVar[Stage] = Stage.TEST_TIME
    metrics: ClassVar[tuple[Metric, ...]] = ()
    success_metric: ClassVar[str | None] = None

    def describe_protocol(self) -> str:
        """One line saying how the attack is evaluated (which attacks ran, budget, images), shown
        under the leaderboard table; empty when the options say it all."""
        return ""

    def check_dataset(self, splits: DatasetSplits) -> None:
        """Called before a suite runs, once per dataset: raise `BenchError` if the options cannot
        work with this dataset (a target class it lacks, a trigger larger than its images)."""

    def check_model(self, model: nn.Module, sample: torch.Tensor) -> None:
        """Called before a suite runs, once per model, with the untrained model (the `Classifier`
        around the plugin's network) and two blank images in [0, 1]: raise `BenchError` if an
        option cannot work with this model (a layer it lacks)."""

    def withheld_training_images(self, splits: DatasetSplits) -> int:
        """How many training images the attack alters or measures itself on (at most), which a
        bonafide set drawn from training data must leave out; checked before a suite runs."""
        return 0

    def poison(self, train: ImageData, ctx: RunContext) -> tuple[ImageData, dict[str, Any]]:
        """TRAINING stage: return the poisoned training set and the attack's state (tensors and
        plain values, cached with the model). Put the indices of altered training images under
        "poisoned_indices", and those of any other training images the attack's metrics use under
        "reserved_indices": a bonafide set drawn from training data leaves both out."""
        return train, {}

    controls_training: ClassVar[bool] = False

    def training_batch(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        generator: torch.Generator,
        ctx: RunContext,
        state: dict[str, Any],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """TRAINING stage, with `controls_training = True`: the attacker is the trainer. Called
        on every batch of the attacked model's training, after the recipe's augmentation, with
        the model being trained (in train mode: an attack with networks of its own, such as
        Input-aware's trigger generator, may train them against it here), float images in
        [0, 1] on the device, their labels, the training loop's generator (for the batch's
        random draws) and the state `poison` returned; returns the batch to train on (same
        size). The core keeps the recipe (schedule, budget, augmentation, the cache);
        the attack only decides what each batch holds."""
        return x, y

    def tamper(self, model: nn.Module, data: DatasetSplits, ctx: RunContext, state: dict[str, Any]) -> dict[str, Any]:
        """POST_TRAINING stage: modify `model` in place; return the (updated) state. For a second
        model of the same job (an MCR endpoint), `state` arrives holding the job's own model's
        state, so that the same tampering (the same images, the same labels) can be repeated."""
        return state

    def evaluate(self, model: nn.Module, test: ImageData, ctx: RunContext, state: dict[str, Any]) -> dict[str, float]:
        """Measure the attack on `model` over `test` (on the device); return {metric key: value}."""
        raise NotImplementedError
