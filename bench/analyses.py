"""The analysis plugin kind: a study of how models relate (a path between two models, stitching
one model's front to another's back, accuracy against an attack budget) rather than one row per
defense. An analysis runs once per dataset x model x seed of its suite.

An analysis declares the models it needs by recipe (`models()`: name -> `ModelRecipe`), such as
"the regular model" and "the model a named defense makes of it"; the core builds them
through the same content-hash cache as the jobs (`bench.artifacts`), so a model trained for a
leaderboard is reused by an analysis and the other way round. `run(models, data, ctx)` returns
an `AnalysisResult`: scalars (declared in `metrics`, shown in the report's table), series
(lists of records, stored), `Figure`s, drawn by `bench report` from the stored series alone,
and `Finding`s: what the analysis's paper found and whether this run shows it, which the report
prints under the analysis's table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from bench.attacks import Metric
from bench.context import RunContext
from bench.data import DatasetSplits
from bench.jobs import SUITE_ATTACKS  # noqa: F401  (re-exported: `ModelRecipe(attack=SUITE_ATTACKS)`)
from bench.plugin import Plugin


@dataclass(frozen=True)
class ModelRecipe:
    """A model an analysis needs, for the job's dataset, model family and training recipe:
    trained with seed (job seed + `seed_offset`), then, unless `defense` is "none", given to
    that defense (with `options`, as a suite table would give them) with `bonafide_size` images
    (0: all the pool has) from `bonafide_source` ("train": training images; "test_half": half of
    the test set; `AnalysisData.evaluation` leaves out what any defender was given). With
    `attack` (a plugin name, and `attack_options` as a suite table would give them) the model is
    the attacked one a leaderboard job with that attack and seed trains, from the same cache;
    the attack's own draws (poisoned images, faults) use the model's seed. `attack="*"`
    (`bench.SUITE_ATTACKS`) means each of the suite's `[[attacks]]`: the analysis then runs once
    per attack, labelled "<analysis> / <attack>", on the very models that attack's jobs use."""

    attack: str = ""
    attack_options: dict[str, Any] = field(default_factory=dict)
    defense: str = "none"
    options: dict[str, Any] = field(default_factory=dict)
    seed_offset: int = 0
    bonafide_size: int = 0
    bonafide_source: str = "test_half"


@dataclass(frozen=True)
class Figure:
    """A figure `bench report` draws from a stored series: `y` (keys of its records, shown in
    percent when `percent`) against `x`, one line per value of `group` (a record key, or "" for
    one line per y key), mean over seeds with its 95% t-interval shaded."""

    series: str
    x: str
    y: tuple[str, ...]
    title: str
    group: str = ""
    percent: bool = True
    xlabel: str = ""
    ylabel: str = ""

    def info(self) -> dict:
        return {
            "series": self.series,
            "x": self.x,
            "y": list(self.y),
            "title": self.title,
            "group": self.group,
            "percent": self.percent,
            "xlabel": self.xlabel or self.x,
            "ylabel": self.ylabel,
        }


@dataclass(frozen=True)
class Finding:
    """A published finding checked on this run: `claim` (what the paper found, one sentence,
    the same for every seed), `shown` (whether this run's numbers show it, by a rule the
    analysis documents) and `evidence` (the numbers that decided, a short phrase)."""

    claim: str
    shown: bool
    evidence: str

    def info(self) -> dict:
        return {"claim": self.claim, "shown": bool(self.shown), "evidence": self.evidence}


@dataclass
class AnalysisResult:
    """What an analysis returns: `values` (one per key of its `metrics`), `series` (name -> list
    of dicts of plain numbers and strings), the `figures` to draw from them and the `findings`
    it checked."""

    values: dict[str, float] = field(default_factory=dict)
    series: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    figures: list[Figure] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)


@dataclass(frozen=True)
class AnalysisData:
    """The job's data on the device: `splits` (train and test), and `evaluation`, the test
    images that no model recipe's defender was given (all of them unless a recipe draws its
    bonafide set from `test_half`)."""

    splits: DatasetSplits
    evaluation: Any  # ImageData


class Analysis(Plugin):
    """An analysis plugin. Implement `models()` and `run()`; list the scalars it reports in
    `metrics`. `check_model(model, sample)` may refuse a model family before anything runs."""

    kind: ClassVar[str] = "analysis"
    metrics: ClassVar[tuple[Metric, ...]] = ()

    def models(self) -> dict[str, ModelRecipe]:
        """The models `run` needs, by name."""
        raise NotImplementedError

    def run(self, models: dict[str, nn.Module], data: AnalysisData, ctx: RunContext) -> AnalysisResult:
        raise NotImplementedError

    def check_model(self, model: nn.Module, sample: torch.Tensor) -> None:
        """Called before a suite runs, once per model family, with the untrained model and two
        blank images in [0, 1]: raise `BenchError` if the options cannot work with it."""
