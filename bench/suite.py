"""Reading and validating a suite file.

A suite is a TOML file:

    [suite]
    name = "quickstart"
    seeds = [0, 1, 2]
    bonafide_size = [100, 50]        # swept
    store = "results/quickstart.db"

    [training]                       # overrides of each model's training recipe
    epochs = 8

    [[datasets]]
    name = "<a dataset plugin>"

    [[attacks]]
    name = "<an attack plugin>"
    poison_rate = [0.05, 0.1]        # a list for a single-valued option is a sweep

    [[exclude]]                      # drop jobs matching every key given
    defense = "<a defense plugin>"
    bonafide_size = 50

Everything is checked before anything runs; each error names the file, the key, the value and
what is valid.
"""

from __future__ import annotations

import dataclasses
import math
import enum
import os
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from bench.errors import SuiteError, did_you_mean
from bench.expansion import plugin_specs, resolve_model_needs
from bench.jobs import SUITE_ATTACKS, BonafideSource, PluginSpec
from bench.models import TrainRecipe
from bench.options import check_value, option, parse_options
from bench.registry import Registry

PLUGIN_TABLES = {
    "datasets": "dataset",
    "models": "model",
    "attacks": "attack",
    "defenses": "defense",
    "analyses": "analysis",
}
TOP_LEVEL_KEYS = ("suite", "training", *PLUGIN_TABLES, "exclude")
# Tables a suite may leave out: analyses always; attacks and defenses when it has analyses.
OPTIONAL_TABLES = ("analyses",)
EXCLUDE_KEYS = ("dataset", "model", "attack", "defense", "seed", "bonafide_size")
PLUGIN_KINDS = {kind: table for table, kind in PLUGIN_TABLES.items()}


class DeviceChoice(enum.Enum):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


@dataclass(frozen=True)
class SuiteSettings:
    """The `[suite]` table."""

    name: str = option(
        "", "suite name, recorded with every result (default: the file name); letters, digits, '.', '_' and '-'"
    )
    seeds: list[int] = option([0], "random seeds; every job runs once per seed", min=0, max=2**63 - 1)
    bonafide_size: list[int] = option([100], "clean images granted to each defense (a list is swept)", min=1)
    bonafide_source: BonafideSource = option(BonafideSource.TEST_HALF, "where bonafide images come from")
    store: str = option(
        "",
        "SQLite file for results; a relative path is relative to the suite file's folder "
        "(default: results/<name>.db under the working directory)",
    )
    device: DeviceChoice = option(DeviceChoice.AUTO, "auto (CUDA when available), cpu or cuda")
    eval_batch_size: int = option(1024, "images per evaluation batch", min=1)
    deterministic: bool = option(
        True,
        "deterministic CUDA kernels, so a rerun job reproduces its numbers "
        "(torch warns about ops without one; false: maybe faster, not reproducible)",
    )
    max_jobs: int = option(
        10_000,
        "refuse a suite whose cross product has more jobs than this (raise it for a deliberate big study)",
        min=1,
    )


@dataclass(frozen=True)
class Suite:
    path: Path
    settings: SuiteSettings
    training: dict  # validated overrides of TrainRecipe fields
    plugins: dict  # table name -> list of PluginSpec (sweeps already expanded)
    exclude: list
    analysis_models: dict = field(default_factory=dict)  # analysis label -> ((name, ModelNeed), ...)

    @property
    def name(self) -> str:
        return self.settings.name or self.path.stem

    @property
    def store_path(self) -> Path:
        """`[suite].store`, a relative path meaning relative to the suite file's folder (as tox
        and pyproject do); without it, results/<name>.db under the working directory."""
        if not self.settings.store:
            return Path(f"results/{self.name}.db")
        store = Path(self.settings.store).expanduser()
        return store if store.is_absolute() else Path(os.path.normpath(self.path.parent / store))


SUITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def load_suite(path: str | Path, registry: Registry) -> Suite:
    path = Path(path)
    if path.is_dir():
        raise SuiteError(f"{path}: is a folder, not a suite file; name a .toml file in it")
    if not path.is_file():
        raise SuiteError(f"{path}: no such suite file")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise SuiteError(f"{path}: malformed TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise SuiteError(f"{path}: not UTF-8 text: {exc}") from None
    except RecursionError:
        raise SuiteError(f"{path}: malformed TOML: nested too deeply for a suite") from None
    except OSError as exc:
        raise SuiteError(f"{path}: cannot read the suite file ({exc.strerror or exc})") from None
    return parse_suite(data, path, registry)


def parse_suite(data: dict, path: Path, registry: Registry) -> Suite:
    """A checked `Suite` from a suite file's parsed TOML, one table at a time; every problem is a
    `SuiteError` naming the file and key."""
    for key in data:
        if key not in TOP_LEVEL_KEYS:
            raise SuiteError(
                f"{path}: unknown table '{key}'{did_you_mean(key, TOP_LEVEL_KEYS)}; valid: {', '.join(TOP_LEVEL_KEYS)}"
            )
    settings = _parse_settings(_table(data, "suite", path), path)
    training = _parse_training(_table(data, "training", path), path)
    plugins = {
        table: _parse_plugin_table(data, table, kind, path, registry, settings) for table, kind in PLUGIN_TABLES.items()
    }
    exclude = _parse_exclude(data.get("exclude", []), path, settings, plugins)
    if bool(plugins["attacks"]) != bool(plugins["defenses"]):
        missing = "defenses" if plugins["attacks"] else "attacks"
        raise SuiteError(
            f"{path}: missing '{missing}': jobs need both [[attacks]] and [[defenses]] tables "
            "(a suite of analyses only has neither)"
        )
    _check_size(plugins, settings, path)
    if (
        plugins["defenses"]
        and len(settings.bonafide_size) > 1
        and not any(d.cls.uses_bonafide for d in plugins["defenses"])
    ):
        kinds = ", ".join(f"{d.label}: {d.cls.defender_data.value}" for d in plugins["defenses"])
        raise SuiteError(
            f"{path}: [suite].bonafide_size sweeps {settings.bonafide_size}, but no defense of this suite uses "
            f"bonafide images ({kinds}); give one value"
        )
    analysis_models = {
        spec.label: resolve_model_needs(spec, f"{path}: analyses ('{spec.label}')", registry)
        for spec in plugins["analyses"]
    }
    for label, needs in analysis_models.items():
        if any(need.suite_attack for _, need in needs) and not plugins["attacks"]:
            raise SuiteError(
                f"{path}: analyses ('{label}') asks for the suite's attacks (ModelRecipe attack "
                f"'{SUITE_ATTACKS}'), but the suite has no [[attacks]] table"
            )
    return Suite(path, settings, training, plugins, exclude, analysis_models)


def _parse_settings(table: dict, path: Path) -> SuiteSettings:
    for key in ("seeds", "bonafide_size"):
        if isinstance(table.get(key), int) and not isinstance(table.get(key), bool):
            table[key] = [table[key]]
    settings = parse_options(SuiteSettings, table, f"{path}: [suite]")
    name = settings.name or path.stem
    if not SUITE_NAME.fullmatch(name) or len(name) > 100:
        where = "[suite].name" if settings.name else "the file name (set [suite].name)"
        raise SuiteError(
            f"{path}: {where}: {name!r} is not a valid suite name; use letters, digits, '.', '_' "
            "and '-', starting with a letter or digit (it names files, so no paths)"
        )
    if settings.store.startswith("~"):
        settings = dataclasses.replace(settings, store=str(Path(settings.store).expanduser()))
    for key in ("seeds", "bonafide_size"):
        values = getattr(settings, key)
        if not values:
            raise SuiteError(f"{path}: [suite].{key}: expected at least one value, got an empty list")
        if len(set(values)) != len(values):
            raise SuiteError(f"{path}: [suite].{key}: {values} repeats a value")
    return settings


def _parse_training(training: dict, path: Path) -> dict:
    recipe_fields = {f.name: f for f in dataclasses.fields(TrainRecipe)}
    hints = typing.get_type_hints(TrainRecipe)
    for key, value in training.items():
        if key not in recipe_fields:
            raise SuiteError(
                f"{path}: [training]: unknown key '{key}'{did_you_mean(key, list(recipe_fields))}; "
                f"valid keys: {', '.join(recipe_fields)}"
            )
        training[key] = check_value(value, hints[key], recipe_fields[key].metadata, f"{path}: [training].{key}")
    return training


def _parse_plugin_table(
    data: dict, table: str, kind: str, path: Path, registry: Registry, settings: SuiteSettings
) -> list[PluginSpec]:
    entries = data.get(table)
    has_analyses = data.get("analyses") is not None
    if entries is None and (table in OPTIONAL_TABLES or (has_analyses and table in ("attacks", "defenses"))):
        return []
    if entries is None:
        raise SuiteError(
            f"{path}: missing '{table}'; add at least one [[{table}]] table with a name, "
            f'e.g. name = "{registry.names(kind)[0] if registry.names(kind) else "..."}"'
        )
    if not isinstance(entries, list) or not entries:
        raise SuiteError(f"{path}: '{table}' must be a non-empty array of tables ([[{table}]])")
    specs = []
    for index, entry in enumerate(entries):
        where = f"{path}: {table}[{index}]"
        specs.extend(plugin_specs(entry, kind, where, registry, base=path.parent, limit=settings.max_jobs))
    seen: dict[str, PluginSpec] = {}
    for spec in specs:
        other = seen.setdefault(spec.label, spec)
        if other is spec:
            continue
        if other.config() == spec.config():
            raise SuiteError(f"{path}: {table}: '{spec.label}' is configured twice with the same options; remove one")
        raise SuiteError(
            f"{path}: {table}: the label '{spec.label}' names two configurations with different "
            "options; give each its own label"
        )
    return specs


def _parse_exclude(exclude, path: Path, settings: SuiteSettings, plugins: dict) -> list:
    if not isinstance(exclude, list) or not all(isinstance(e, dict) for e in exclude):
        raise SuiteError(f"{path}: 'exclude' must be an array of tables ([[exclude]])")
    for index, entry in enumerate(exclude):
        if not entry:
            raise SuiteError(
                f"{path}: exclude[{index}] is empty and would drop every job; give at least one of "
                + ", ".join(EXCLUDE_KEYS)
            )
        for key, value in entry.items():
            _check_exclude_key(key, value, f"{path}: exclude[{index}].{key}", settings, plugins)
        if "bonafide_size" in entry and "defense" in entry:
            matching = [s for s in plugins["defenses"] if entry["defense"] in (s.name, s.label)]
            if matching and not any(s.cls.uses_bonafide for s in matching):
                raise SuiteError(
                    f"{path}: exclude[{index}]: defense '{entry['defense']}' uses no bonafide data, so "
                    "its jobs have no bonafide_size; drop bonafide_size from this rule"
                )
    return exclude


def _check_exclude_key(key: str, value, where: str, settings: SuiteSettings, plugins: dict) -> None:
    if key not in EXCLUDE_KEYS:
        raise SuiteError(
            f"{where}: unknown key{did_you_mean(key, EXCLUDE_KEYS)}; valid keys: " + ", ".join(EXCLUDE_KEYS)
        )
    expected = int if key in ("seed", "bonafide_size") else str
    check_value(value, expected, {}, where)
    if key in PLUGIN_KINDS:
        known = {n for spec in plugins[PLUGIN_KINDS[key]] for n in (spec.name, spec.label)}
        if value not in known:
            raise SuiteError(
                f"{where}: '{value}' matches no configured {key}"
                f"{did_you_mean(value, sorted(known))}; configured: {', '.join(sorted(known))}"
            )
        return
    configured = settings.seeds if key == "seed" else settings.bonafide_size
    if value not in configured:
        raise SuiteError(f"{where}: {value} is not among the suite's {key} values {configured}")


def _check_size(plugins: dict, settings: SuiteSettings, path: Path) -> None:
    """Count the cross product before anything is built: a short file can describe millions."""
    product = math.prod(len(plugins[t]) for t in ("datasets", "models", "attacks", "defenses"))
    product *= len(settings.seeds) * len(settings.bonafide_size)
    product += math.prod(len(plugins[t]) for t in ("analyses", "datasets", "models")) * len(settings.seeds)
    if product > settings.max_jobs:
        raise SuiteError(
            f"{path}: the suite expands to {product:,} jobs (datasets x models x attacks x defenses x seeds x "
            f"bonafide sizes, and analyses), more than [suite].max_jobs = {settings.max_jobs:,}; shorten a sweep "
            "or raise max_jobs"
        )


def _table(data: dict, key: str, path: Path) -> dict:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise SuiteError(f"{path}: '{key}' must be a table ([{key}]), got {type(value).__name__}")
    return dict(value)
