"""The defense plugin kind. A defense receives the (possibly tampered) model and a small clean
"bonafide" set, never the attack or its trigger, and returns a model (or a wrapped, possibly
stochastic, predictor) that maps images in [0, 1] to logits, or a `Defended` when it has more
to report than the model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable

import torch
from torch import nn

from bench.attacks import Metric
from bench.context import DefenseContext
from bench.data import ImageData
from bench.plugin import Plugin

# (series name, coordinates, model): a model the pipeline measures the attack on, e.g. a point
# of a mode-connectivity path at {"t": 0.3}.
PointToEvaluate = tuple[str, dict[str, float], nn.Module]


@dataclass
class Defended:
    """What a defense returns when it has more to say than the model:

    - `series`: per-step records it measured itself on bonafide data (name -> list of dicts of
      plain numbers), stored with the result (e.g. fine-pruning's accuracy per pruning step);
    - `values`: numbers it chose or measured, one per key of the defense's `metrics` (e.g. the
      t MCR picked), stored as metrics and shown in the leaderboard row;
    - `points`: a function yielding further models on which the pipeline measures clean
      accuracy and the attack, stored as series (e.g. along a path); the defense never sees
      the attack itself.
    """

    model: nn.Module
    series: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    values: dict[str, float] = field(default_factory=dict)
    points: Callable[[], Iterable[PointToEvaluate]] | None = None


class Defense(Plugin):
    """Set `uses_bonafide = False` for a defense that ignores the bonafide set, so that a
    swept `bonafide_size` does not repeat it, and `returns_model_unchanged = True` for one that
    returns the very model it was given, untouched (the `none` baseline): its after-defense
    metrics are then the before-defense ones, not a second attack on the same model.

    `apply` receives a copy of the attacked model, which it may change in place and return.
    `metrics` lists the values (see `Defended.values`) the defense reports about itself."""

    kind: ClassVar[str] = "defense"
    uses_bonafide: ClassVar[bool] = True
    returns_model_unchanged: ClassVar[bool] = False
    metrics: ClassVar[tuple[Metric, ...]] = ()

    def apply(self, model: nn.Module, bonafide: ImageData, ctx: DefenseContext) -> nn.Module | Defended:
        raise NotImplementedError

    def other_attacked_seeds(self, seed: int) -> tuple[int, ...]:
        """The seeds of further attacked models `apply` will ask for with
        `ctx.attacked_model_with_seed` (MCR's second endpoint), declared up front so that a
        cluster scheduler trains them before the job instead of inside it."""
        return ()

    def check_model(self, model: nn.Module, sample: torch.Tensor) -> None:
        """Called before a suite runs, once per model, with the untrained model (the `Classifier`
        around the plugin's network) and two blank images in [0, 1]: raise `BenchError` if an
        option cannot work with this model (a layer it lacks)."""
