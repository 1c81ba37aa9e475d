"""The cross product: a suite expands into jobs, one per (dataset, model, attack, defense,
seed, bonafide size). `expand` is a pure function of the suite."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from dataclasses import dataclass

from bench.attacks import Stage
from bench.models import TrainRecipe
from bench.suite import PluginSpec, Suite


@dataclass(frozen=True)
class Job:
    suite: str
    dataset: PluginSpec
    model: PluginSpec
    attack: PluginSpec
    defense: PluginSpec
    seed: int
    bonafide_size: int  # 0 for a defense that uses no bonafide data
    bonafide_source: str
    training: dict  # the resolved training recipe, as plain values
    eval_batch_size: int

    @property
    def recipe(self) -> TrainRecipe:
        return TrainRecipe(**self.training)

    def config(self) -> dict:
        """Everything the job's result depends on, as plain JSON values."""
        return {
            "suite": self.suite,
            "dataset": self.dataset.config(),
            "model": self.model.config(),
            "attack": self.attack.config(),
            "defense": self.defense.config(),
            "seed": self.seed,
            "bonafide_size": self.bonafide_size,
            "bonafide_source": self.bonafide_source,
            "training": self.training,
        }

    @property
    def key(self) -> str:
        return content_hash(self.config())

    def model_config(self) -> dict:
        """What the attacked model depends on: a test-time attack does not change it, so all
        test-time attacks (and every defense) share one trained model."""
        attack = None if self.attack.cls.stage is Stage.TEST_TIME else self.attack.config()
        return {"dataset": self.dataset.config(), "model": self.model.config(), "attack": attack,
                "training": self.training, "seed": self.seed}

    def describe(self) -> str:
        bonafide = f" bonafide={self.bonafide_size}" if self.bonafide_size else ""
        return (f"{self.dataset.label} / {self.model.label} / {self.attack.label} / "
                f"{self.defense.label}{bonafide} seed={self.seed}")


def content_hash(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:20]


def expand(suite: Suite) -> list[Job]:
    """All jobs of the suite, in a stable order, without excluded or repeated ones."""
    settings = suite.settings
    jobs, seen = [], set()
    for dataset, model, attack, defense, seed, size in itertools.product(
            suite.plugins["datasets"], suite.plugins["models"], suite.plugins["attacks"],
            suite.plugins["defenses"], settings.seeds, settings.bonafide_size):
        size = size if defense.cls.uses_bonafide else 0
        recipe = dataclasses.replace(model.cls.recipe, **suite.training)
        job = Job(suite.name, dataset, model, attack, defense, seed, size,
                  settings.bonafide_source.value, dataclasses.asdict(recipe), settings.eval_batch_size)
        if job.key in seen or _excluded(job, suite.exclude):
            continue
        seen.add(job.key)
        jobs.append(job)
    return jobs


def _excluded(job: Job, exclude: list[dict]) -> bool:
    def matches(key, value):
        if key in ("seed", "bonafide_size"):
            return getattr(job, key) == value
        spec = getattr(job, key)
        return value in (spec.name, spec.label)
    return any(all(matches(k, v) for k, v in rule.items()) for rule in exclude)
