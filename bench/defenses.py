"""The defense plugin kind. A defense receives what it declares it may use (`defender_data`),
never the attack, its trigger, the poisoned images' indices or any test label, and returns a
model (or a wrapped, possibly stochastic, predictor) that maps images in [0, 1] to logits, or a
`Defended` when it has more to report than the model."""

from __future__ import annotations

import enum
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


class DefenderData(enum.Enum):
    """What a defense may use besides the model; the core hands it that and nothing more.

    - `BONAFIDE`: the attacked model and a small clean set of `bonafide_size` images (fine-tuning,
      pruning, trigger reverse engineering, unlearning);
    - `NONE`: data-free, the attacked model alone (its `bonafide` argument is empty);
    - `POISONED_TRAINING_SET`: the defender trains the model itself from the (poisoned) training
      set, as in anti-backdoor learning or filtering defenses: `apply` gets a freshly initialised
      model of the architecture and the training set as the attack left it (labels included,
      which images were poisoned not). It needs an attack that poisons training data.
    """

    BONAFIDE = "bonafide"
    NONE = "none"
    POISONED_TRAINING_SET = "poisoned_training_set"


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
    # A filtering defense (POISONED_TRAINING_SET): the indices, into the training set it was
    # given, of the images it removed as poisoned; the core scores them against the attack's
    # poisoned images (detection TPR, FPR and precision), which the defense never sees.
    removed_training_indices: torch.Tensor | None = None


class Defense(Plugin):
    """Declare `defender_data` (`DefenderData`; default `BONAFIDE`): what the defense may use.
    A defense that uses no bonafide images is not repeated for each swept `bonafide_size`.
    (`uses_bonafide = False`, the older spelling, still means `DefenderData.NONE`.) Set
    `returns_model_unchanged = True` for one that returns the very model it was given, untouched
    (the `none` baseline): its after-defense metrics are then the before-defense ones, not a
    second attack on the same model.

    `apply(model, data, ctx)` receives a copy of the attacked model and the bonafide images
    (`BONAFIDE`), an empty set (`NONE`), or a freshly initialised model and the poisoned
    training set (`POISONED_TRAINING_SET`); it may change the model in place and return it.
    `metrics` lists the values (see `Defended.values`) the defense reports about itself."""

    kind: ClassVar[str] = "defense"
    defender_data: ClassVar[DefenderData] = DefenderData.BONAFIDE
    uses_bonafide: ClassVar[bool] = True  # derived from defender_data
    returns_model_unchanged: ClassVar[bool] = False
    metrics: ClassVar[tuple[Metric, ...]] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "uses_bonafide" in cls.__dict__ and "defender_data" not in cls.__dict__:
            cls.defender_data = DefenderData.BONAFIDE if cls.uses_bonafide else DefenderData.NONE
        cls.uses_bonafide = cls.defender_data is DefenderData.BONAFIDE

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
