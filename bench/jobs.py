"""What the core passes around: a configured plugin (`PluginSpec`), a job (one dataset,
model, attack, defense, seed and bonafide size, every plugin resolved) and its `Outcome`.
Plain data only: the stages that run a job, the store that keeps outcomes and the expansion
that makes jobs all import from here, never the other way round."""

from __future__ import annotations

import enum
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: the store and the report read jobs without loading torch
    from bench.models import TrainRecipe

ATTACK_TRAINING_NOTE = "attacked_model_train_seconds"  # a job note: what building its attacked model took (s)


class BonafideSource(enum.Enum):
    """Where the defender's clean images come from."""

    TEST_HALF = "test_half"  # half of the test set; results on the other half (MCR reference code)
    TRAIN = "train"  # unpoisoned training images; results on the whole test set (BackdoorBench)


@dataclass(frozen=True)
class PluginSpec:
    """One configured plugin of a suite, resolved: its kind, name, validated options, label,
    class and provider (the package and version that registered it). Only kind, name,
    options and label define it; the rest follows from the installed plugins."""

    kind: str
    name: str
    options: dict
    label: str
    cls: Any = field(compare=False, repr=False)  # the plugin class
    parsed: Any = field(compare=False, repr=False, default=None)  # the Options instance
    provider: str = field(compare=False, default="")  # e.g. "robustness-bench 0.4.0"

    def instantiate(self):
        """A fresh plugin instance with these options."""
        return self.cls(self.parsed)

    def config(self) -> dict:
        return {"name": self.name, "options": self.options}


@dataclass(frozen=True)
class Job:
    """One leaderboard cell's run: a defense against an attack on a model, for one seed and
    bonafide size. Both job kinds share a small protocol: `table` (where the store keeps their
    results), `plugin_kinds` (their plugin specs' attribute names), `key`, `config()` and
    `describe()`; the runner, the store and the executors dispatch on it, not on the class."""

    table: ClassVar[str] = "results"
    plugin_kinds: ClassVar[tuple[str, ...]] = ("dataset", "model", "attack", "defense")

    suite: str
    dataset: PluginSpec
    model: PluginSpec
    attack: PluginSpec | None  # None: a model no attack touched (what analyses ask for)
    defense: PluginSpec
    seed: int
    bonafide_size: int  # 0 for a defense that uses no bonafide data
    bonafide_source: BonafideSource
    training: dict  # the resolved training recipe, as plain values
    eval_batch_size: int

    @property
    def recipe(self) -> TrainRecipe:
        from bench.models import TrainRecipe

        return TrainRecipe(**self.training)

    def config(self) -> dict:
        """Everything the job's result depends on, as plain JSON values."""
        return {
            "suite": self.suite,
            "dataset": self.dataset.config(),
            "model": self.model.config(),
            "attack": self.attack.config() if self.attack is not None else None,
            "defense": self.defense.config(),
            "seed": self.seed,
            "bonafide_size": self.bonafide_size,
            "bonafide_source": self.bonafide_source.value,
            "training": self.training,
        }

    @property
    def key(self) -> str:
        return content_hash(self.config())

    def model_config(self) -> dict:
        """What the attacked model depends on: a test-time attack does not change it, so all
        test-time attacks (and every defense) share one trained model."""
        attack = self.attack.config() if self.attack is not None and self.changes_model else None
        return {
            "dataset": self.dataset.config(),
            "model": self.model.config(),
            "attack": attack,
            "training": self.training,
            "seed": self.seed,
        }

    @property
    def changes_model(self) -> bool:
        """Whether the attack touches the model (training-time or post-training)."""
        from bench.attacks import Stage

        return self.attack is not None and self.attack.cls.stage is not Stage.TEST_TIME

    def describe(self) -> str:
        bonafide = f" bonafide={self.bonafide_size}" if self.bonafide_size else ""
        attack = self.attack.label if self.attack else "no attack"
        return f"{self.dataset.label} / {self.model.label} / {attack} / {self.defense.label}{bonafide} seed={self.seed}"


@dataclass(frozen=True)
class ModelNeed:
    """A model an analysis asked for (a `bench.ModelRecipe`), resolved: the defense that makes
    it (`none`: the trained model as it is), the seed offset and the defender's bonafide data."""

    defense: PluginSpec
    seed_offset: int
    bonafide_size: int
    bonafide_source: BonafideSource
    attack: PluginSpec | None = None  # the attack the model is trained (or tampered) with, if any
    suite_attack: bool = False  # the recipe said SUITE_ATTACKS: `attack` is filled in per suite attack

    def config(self) -> dict:
        out = {
            "defense": self.defense.config(),
            "seed_offset": self.seed_offset,
            "bonafide_size": self.bonafide_size,
            "bonafide_source": self.bonafide_source.value,
        }
        if self.attack is not None:  # absent otherwise: keys of models without an attack stay as they were
            out["attack"] = self.attack.config()
        return out


# A `ModelRecipe.attack` meaning "each attack of the suite": the analysis runs once per attack.
SUITE_ATTACKS = "*"


@dataclass(frozen=True)
class AnalysisJob:
    """One analysis on one dataset, model family and seed, with the models it needs."""

    table: ClassVar[str] = "analyses"
    plugin_kinds: ClassVar[tuple[str, ...]] = ("analysis", "dataset", "model")

    suite: str
    analysis: PluginSpec
    dataset: PluginSpec
    model: PluginSpec
    seed: int
    training: dict
    eval_batch_size: int
    needs: tuple[tuple[str, ModelNeed], ...]

    def config(self) -> dict:
        return {
            "suite": self.suite,
            "analysis": self.analysis.config(),
            "dataset": self.dataset.config(),
            "model": self.model.config(),
            "seed": self.seed,
            "training": self.training,
            "models": {name: need.config() for name, need in self.needs},
        }

    @property
    def key(self) -> str:
        return content_hash(self.config())

    def model_job(self, need: ModelNeed) -> Job:
        """The job-shaped spec that builds (and caches) one needed model, exactly as a suite
        job with that attack (or none) and that defense would: the same cache keys, so an
        analysis gets the leaderboard's own attacked and defended models."""
        return Job(
            self.suite,
            self.dataset,
            self.model,
            need.attack,
            need.defense,
            self.seed + need.seed_offset,
            need.bonafide_size if need.defense.cls.uses_bonafide else 0,
            need.bonafide_source,
            self.training,
            self.eval_batch_size,
        )

    def describe(self) -> str:
        return f"analysis {self.analysis.label} on {self.dataset.label} / {self.model.label} seed={self.seed}"


def content_hash(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:20]


@dataclass
class Outcome:
    """What running one job produced (or how it failed)."""

    status: str
    metrics: dict[str, float] = field(default_factory=dict)
    metric_info: dict[str, dict] = field(default_factory=dict)  # key -> {label, higher_is_better}
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    series: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # e.g. metrics along a path
    notes: dict[str, Any] = field(default_factory=dict)  # cache hits, data source, ...
    device: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    started_at: str = ""
    finished_at: str = ""
