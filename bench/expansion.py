"""Expansion, in one place and pure: a suite's plugin tables become specs (one per point of
each option sweep), and the specs, seeds and bonafide sizes become jobs (the cross product,
less the `[[exclude]]` rules and repeats). Nothing here reads files or runs anything."""

from __future__ import annotations

import dataclasses
import itertools
import math
import json
import os
from pathlib import Path
from typing import Any

from bench.analyses import ModelRecipe
from bench.attacks import Stage
from bench.defenses import DefenderData
from bench.errors import SuiteError
from bench.jobs import SUITE_ATTACKS, AnalysisJob, BonafideSource, Job, ModelNeed, PluginSpec
from bench.options import is_scalar_option, parse_options, to_plain
from bench.registry import Registry


MAX_LABEL = 300  # characters: a label is a table cell and a figure caption (file names use a digest)


def plugin_specs(
    entry: Any, kind: str, where: str, registry: Registry, base: Path | None = None, limit: int = 10_000
) -> list[PluginSpec]:
    """The specs of one `[[datasets]]`/`[[models]]`/... table: one per point of its option
    sweeps (a list given for a single-valued option), each validated, labelled and resolved
    to the class and provider that registered the name."""
    entry, name, label = _entry_name_and_label(entry, kind, where)
    info = registry.get(kind, name, where)
    where = f"{where} ('{name}')"
    options_cls = info.cls.Options
    fields = {f.name for f in dataclasses.fields(options_cls)}
    if base is not None:  # path options written relative to the suite mean relative to its folder
        for f in dataclasses.fields(options_cls):
            value = entry.get(f.name)
            if f.metadata.get("path") and isinstance(value, str) and value:
                value = os.path.expanduser(value)
                entry[f.name] = value if os.path.isabs(value) else os.path.normpath(base.resolve() / value)
    sweeps = {
        k: v for k, v in entry.items() if k in fields and isinstance(v, list) and is_scalar_option(options_cls, k)
    }
    for key, values in sweeps.items():
        if not values:
            raise SuiteError(f"{where}.{key}: an empty list sweeps nothing; give at least one value")
    points = math.prod(len(v) for v in sweeps.values())
    if points > limit:  # counted before any is built: a short file can describe millions
        raise SuiteError(
            f"{where}: its sweeps ({', '.join(f'{k}: {len(v)}' for k, v in sweeps.items())}) make {points:,} "
            f"configurations, more than [suite].max_jobs = {limit:,}"
        )
    specs = []
    for combo in itertools.product(*sweeps.values()) if sweeps else [()]:
        table = {**entry, **dict(zip(sweeps, combo))}
        parsed = parse_options(options_cls, table, where)
        options = to_plain(parsed)
        spec_label = _spec_label(name, label, options, to_plain(options_cls()), list(sweeps), where)
        provider = f"{info.package} {info.version}".strip()
        specs.append(PluginSpec(kind, name, options, spec_label, info.cls, parsed, provider=provider))
    return specs


def _entry_name_and_label(entry: Any, kind: str, where: str) -> tuple[dict, str, str | None]:
    """A plugin table (or a bare name) split into its options, its `name` and its `label`."""
    if isinstance(entry, str):
        entry = {"name": entry}
    if not isinstance(entry, dict):
        raise SuiteError(f"{where}: expected a table with a 'name', got {entry!r}")
    entry = dict(entry)
    if "name" not in entry:
        raise SuiteError(f"{where}: missing 'name' (a string naming the {kind} plugin)")
    name = entry.pop("name")
    if not isinstance(name, str):
        raise SuiteError(f"{where}.name: expected a string naming the {kind} plugin, got {name!r}")
    label = entry.pop("label", None)
    if label is not None and not isinstance(label, str):
        raise SuiteError(f"{where}.label: expected a string, got {label!r}")
    return entry, name, label


def _spec_label(name: str, label: str | None, options: dict, defaults: dict, sweeps: list[str], where: str) -> str:
    """The name with the options that differ from the defaults, or the given label with the
    swept values (each point of a sweep needs its own label)."""
    changed = {k: v for k, v in options.items() if v != defaults[k]}
    spec_label = label or name
    if label is None and changed:  # a swept value equal to the default is not repeated
        spec_label += "(" + ", ".join(f"{k}={json.dumps(v)}" for k, v in changed.items()) + ")"
    elif label is not None and sweeps:
        spec_label += "(" + ", ".join(f"{k}={json.dumps(options[k])}" for k in sweeps) + ")"
    if len(spec_label) > MAX_LABEL:
        raise SuiteError(
            f"{where}: the label '{spec_label[:40]}...' is {len(spec_label)} characters long (at most "
            f"{MAX_LABEL}); give this entry a short `label`"
        )
    return spec_label


def resolve_model_needs(spec: PluginSpec, where: str, registry: Registry) -> tuple[tuple[str, ModelNeed], ...]:
    """The models an analysis asks for (`models()`), each recipe's defense resolved and its
    options validated like a suite table's, so a bad recipe fails before anything runs."""
    try:
        recipes = spec.instantiate().models()
    except Exception as exc:
        raise SuiteError(f"{where}: models() failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(recipes, dict) or not all(isinstance(r, ModelRecipe) for r in recipes.values()):
        raise SuiteError(f"{where}: models() must return a dict of name -> bench.ModelRecipe")
    needs = []
    for name, recipe in recipes.items():
        place = f"{where}: model '{name}'"
        (defense,) = plugin_specs({"name": recipe.defense, **recipe.options}, "defense", place, registry)
        try:
            source = BonafideSource(recipe.bonafide_source)
        except ValueError:
            raise SuiteError(
                f"{place}: bonafide_source {recipe.bonafide_source!r} is not one of "
                f"{', '.join(s.value for s in BonafideSource)}"
            ) from None
        if recipe.bonafide_size < 0 or recipe.seed_offset < 0:
            raise SuiteError(f"{place}: bonafide_size and seed_offset must be 0 or more")
        attack, suite_attack = None, recipe.attack == SUITE_ATTACKS
        if suite_attack and recipe.attack_options:
            raise SuiteError(
                f"{place}: attack '{SUITE_ATTACKS}' takes the suite's attacks as they are; drop attack_options"
            )
        if recipe.attack and not suite_attack:
            (attack,) = plugin_specs({"name": recipe.attack, **recipe.attack_options}, "attack", place, registry)
        need = ModelNeed(defense, recipe.seed_offset, recipe.bonafide_size, source, attack, suite_attack)
        needs.append((name, need))
    return tuple(needs)


def expand_analyses(suite) -> list[AnalysisJob]:
    """One analysis job per analysis spec (per suite attack, for one asking for the suite's
    attacks) x dataset x model x seed of `suite`, in a stable order."""
    settings = suite.settings
    jobs = []
    for analysis, needs in _analyses_per_attack(suite):
        for dataset, model, seed in itertools.product(
            suite.plugins["datasets"], suite.plugins["models"], settings.seeds
        ):
            recipe = dataclasses.replace(model.cls.recipe, **suite.training)
            jobs.append(
                AnalysisJob(
                    suite.name,
                    analysis,
                    dataset,
                    model,
                    seed,
                    dataclasses.asdict(recipe),
                    settings.eval_batch_size,
                    needs,
                )
            )
    return jobs


def _analyses_per_attack(suite) -> list[tuple[PluginSpec, tuple[tuple[str, ModelNeed], ...]]]:
    """Each analysis with its model needs; one asking for the suite's attacks once per attack,
    labelled "<analysis> / <attack>", its needs given that attack."""
    out = []
    for analysis in suite.plugins.get("analyses", []):
        needs = suite.analysis_models[analysis.label]
        if not any(need.suite_attack for _, need in needs):
            out.append((analysis, needs))
            continue
        for attack in suite.plugins["attacks"]:
            filled = tuple(
                (name, dataclasses.replace(need, attack=attack, suite_attack=False) if need.suite_attack else need)
                for name, need in needs
            )
            out.append((dataclasses.replace(analysis, label=f"{analysis.label} / {attack.label}"), filled))
    return out


def expand(suite) -> list[Job]:
    """All jobs of `suite` (a checked `bench.suite.Suite`, not imported here: the suite module
    builds on this one), in a stable order, without excluded or repeated ones."""
    settings = suite.settings
    jobs, seen = [], set()
    for dataset, model, attack, defense, seed, size in itertools.product(
        suite.plugins["datasets"],
        suite.plugins["models"],
        suite.plugins["attacks"],
        suite.plugins["defenses"],
        settings.seeds,
        settings.bonafide_size,
    ):
        size = size if defense.cls.uses_bonafide else 0
        recipe = dataclasses.replace(model.cls.recipe, **suite.training)
        job = Job(
            suite.name,
            dataset,
            model,
            attack,
            defense,
            seed,
            size,
            settings.bonafide_source,
            dataclasses.asdict(recipe),
            settings.eval_batch_size,
        )
        if job.key in seen or _excluded(job, suite.exclude):
            continue
        trains = defense.cls.defender_data is DefenderData.POISONED_TRAINING_SET
        if trains and attack.cls.stage is Stage.TRAINING and attack.cls.controls_training:
            raise SuiteError(
                f"{suite.path}: defense '{defense.label}' trains its own model, but attack '{attack.label}' "
                "controls training (the attacker is the trainer), so there is no poisoned training set to give "
                f'it; drop the pair with [[exclude]] attack = "{attack.name}", defense = "{defense.name}"'
            )
        if trains and attack.cls.stage is not Stage.TRAINING:
            raise SuiteError(
                f"{suite.path}: defense '{defense.label}' trains its own model on the poisoned training set, but "
                f"attack '{attack.label}' ({attack.cls.stage.value}) poisons no training data; drop the pair with "
                f'[[exclude]] attack = "{attack.name}", defense = "{defense.name}"'
            )
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
