"""The defense plugin kind. A defense receives the (possibly tampered) model and a small clean
"bonafide" set, never the attack or its trigger, and returns a model (or a wrapped, possibly
stochastic, predictor) that maps images in [0, 1] to logits."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from bench.context import DefenseContext
from bench.data import ImageData
from bench.plugin import Plugin


class Defense(Plugin):
    """Set `uses_bonafide = False` for a defense that ignores the bonafide set, so that a
    swept `bonafide_size` does not repeat it, and `returns_model_unchanged = True` for one that
    returns the very model it was given, untouched (the `none` baseline): its after-defense
    metrics are then the before-defense ones, not a second attack on the same model."""

    kind: ClassVar[str] = "defense"
    uses_bonafide: ClassVar[bool] = True
    returns_model_unchanged: ClassVar[bool] = False

    def apply(self, model: nn.Module, bonafide: ImageData, ctx: DefenseContext) -> nn.Module:
        raise NotImplementedError

    def check_model(self, model: nn.Module, sample: torch.Tensor) -> None:
        """Called before a suite runs, once per model, with the untrained model (the `Classifier`
        around the plugin's network) and two blank images in [0, 1]: raise `BenchError` if an
        option cannot work with this model (a layer it lacks)."""
