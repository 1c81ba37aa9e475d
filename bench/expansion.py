"""Expansion, in one place and pure: a suite's plugin tables become specs (one per point of
each option sweep), and the specs, seeds and bonafide sizes become jobs (the cross product,
less the `[[exclude]]` rules and repeats). Nothing here reads files or runs anything."""

from __future__ import annotations

import dataclasses
import itertools
import json
from typing import Any

from bench.errors import SuiteError
from bench.jobs import Job, PluginSpec
from bench.options import is_scalar_option, parse_options, to_plain
from bench.registry import Registry


def plugin_specs(entry: Any, kind: str, where: str, registry: Registry) -> list[PluginSpec]:
    """The specs of one `[[datasets]]`/`[[models]]`/... table: one per point of its option
    sweeps (a list given for a single-valued option), each validated, labelled and resolved
    to the class and provider that registered the name."""
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
    info = registry.get(kind, name, where)
    where = f"{where} ('{name}')"
    options_cls = info.cls.Options
    fields = {f.name for f in dataclasses.fields(options_cls)}
    sweeps = {k: v for k, v in entry.items()
              if k in fields and isinstance(v, list) and is_scalar_option(options_cls, k)}
    for key, values in sweeps.items():
        if not values:
            raise SuiteError(f"{where}.{key}: an empty list sweeps nothing; give at least one value")
    specs = []
    for combo in itertools.product(*sweeps.values()) if sweeps else [()]:
        table = {**entry, **dict(zip(sweeps, combo))}
        parsed = parse_options(options_cls, table, where)
        options = to_plain(parsed)
        defaults = to_plain(options_cls())
        changed = {k: v for k, v in options.items() if v != defaults[k]}
        spec_label = label or name
        if label is None and changed:  # a swept value equal to the default is not repeated
            spec_label += "(" + ", ".join(f"{k}={json.dumps(v)}" for k, v in changed.items()) + ")"
        elif label is not None and sweeps:  # a label names the sweep; each point still needs its own
            spec_label += "(" + ", ".join(f"{k}={json.dumps(options[k])}" for k in sweeps) + ")"
        specs.append(PluginSpec(kind, name, options, spec_label, info.cls, parsed,
                                provider=f"{info.package} {info.version}".strip()))
    return specs


def expand(suite) -> list[Job]:
    """All jobs of `suite` (a checked `bench.suite.Suite`, not imported here: the suite module
    builds on this one), in a stable order, without excluded or repeated ones."""
    settings = suite.settings
    jobs, seen = [], set()
    for dataset, model, attack, defense, seed, size in itertools.product(
            suite.plugins["datasets"], suite.plugins["models"], suite.plugins["attacks"],
            suite.plugins["defenses"], settings.seeds, settings.bonafide_size):
        size = size if defense.cls.uses_bonafide else 0
        recipe = dataclasses.replace(model.cls.recipe, **suite.training)
        job = Job(suite.name, dataset, model, attack, defense, seed, size,
                  settings.bonafide_source, dataclasses.asdict(recipe), settings.eval_batch_size)
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
