"""Plugin discovery and the registry of plugin classes.

`load_plugins()` runs once per process: it loads every module in the `robustness_bench`
entry-point group (the built-ins are listed there too, exactly like a third-party package),
registers it with pluggy, checks its hook names, then calls each registration hook once per
plugin so that every class is attributed to the package that provided it. A plugin that fails
to import, misspells a hook or reuses a taken name is recorded as a problem and skipped; the
others load normally.

Environment switches:
    BENCH_LOAD_PLUGINS=a,b   load only these entry points (none when empty)
    BENCH_TRACE_PLUGINS=1    print every hook call and registration to stderr
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
from dataclasses import dataclass
from typing import Any, Iterable

import pluggy

from bench import hookspecs
from bench.analyses import Analysis
from bench.attacks import Attack
from bench.data import Dataset
from bench.defenses import Defense
from bench.errors import BenchError, PluginLoadError, UnknownPluginError, did_you_mean
from bench.models import Model
from bench.options import check_options_class

ENTRY_POINT_GROUP = hookspecs.PROJECT  # the entry-point group plugins register in
KINDS: dict[str, type] = {
    "dataset": Dataset,
    "model": Model,
    "attack": Attack,
    "defense": Defense,
    "analysis": Analysis,
}
HOOKS = {
    "dataset": "register_datasets",
    "model": "register_models",
    "attack": "register_attacks",
    "defense": "register_defenses",
    "analysis": "register_analyses",
}
BUILTIN_PACKAGE = "robustness-bench"
PLURALS = {"analysis": "analyses"}


@dataclass(frozen=True)
class PluginInfo:
    kind: str
    name: str
    cls: Any  # the plugin class
    plugin: str  # the pluggy plugin (entry point) that registered it
    package: str
    version: str

    @property
    def description(self) -> str:
        return self.cls.description


@dataclass(frozen=True)
class LoadProblem:
    plugin: str
    package: str
    message: str


class Registry:
    """Plugin classes by kind and name. Names are unique per kind: a second class under a
    taken name is refused with an error naming both providers."""

    def __init__(self):
        self._by_kind: dict[str, dict[str, PluginInfo]] = {kind: {} for kind in KINDS}
        self.problems: list[LoadProblem] = []
        self.clashes: dict[tuple[str, str], str] = {}  # (kind, name) -> who provides it twice

    def register(self, cls: Any, *, plugin: str = "<direct>", package: str = "<direct>", version: str = "") -> type:
        kind = next((k for k, base in KINDS.items() if isinstance(cls, type) and issubclass(cls, base)), None)
        if kind is None:
            raise PluginLoadError(
                f"plugin '{plugin}' registered {cls!r}, which is not a subclass of "
                "bench.Dataset, bench.Model, bench.Attack, bench.Defense or bench.Analysis"
            )
        if not cls.name or not cls.name.replace("_", "").isalnum() or cls.name != cls.name.lower():
            raise PluginLoadError(
                f"plugin '{plugin}' registered {cls.__qualname__} with name {cls.name!r}; "
                "a name must be lowercase letters, digits and underscores"
            )
        taken = self._by_kind[kind].get(cls.name)
        if taken is not None:
            message = (
                f"{kind} '{cls.name}' from {package} (plugin '{plugin}') duplicates the one from "
                f"{taken.package} (plugin '{taken.plugin}')"
            )
            self.clashes[(kind, cls.name)] = message
            raise PluginLoadError(f"{message}; a suite naming it is refused until one is uninstalled")
        try:
            check_options_class(cls.Options, f"{kind} '{cls.name}' ({cls.__qualname__})")
        except BenchError as exc:
            raise PluginLoadError(str(exc)) from None
        self._by_kind[kind][cls.name] = PluginInfo(kind, cls.name, cls, plugin, package, version)
        return cls

    def get(self, kind: str, name: str, where: str = "") -> PluginInfo:
        known = self._by_kind[kind]
        prefix = f"{where}: " if where else ""
        if (kind, name) in self.clashes:
            raise UnknownPluginError(
                f"{prefix}{self.clashes[kind, name]}: which one to use is ambiguous; uninstall one of the two packages"
            )
        if name not in known:
            valid = ", ".join(sorted(known)) or "none installed"
            failed = "; ".join(f"{p.plugin} ({p.package}): {p.message}" for p in self.problems)
            hint = f"; plugins that failed to load: {failed}" if failed else ""
            raise UnknownPluginError(
                f"{prefix}unknown {kind} '{name}'{did_you_mean(name, list(known))}; "
                f"installed {PLURALS.get(kind, kind + 's')}: {valid}{hint}"
            )
        return known[name]

    def names(self, kind: str) -> list[str]:
        return sorted(self._by_kind[kind])

    def all(self) -> list[PluginInfo]:
        return [info for kind in KINDS for _, info in sorted(self._by_kind[kind].items())]


def unmarked_hooks(module) -> list[str]:
    """Warnings for functions of a plugin module that look like hooks but will never be called:
    a hook name without @bench.hookimpl, or a near-miss of a hook name."""
    hook_names = [name for name in dir(hookspecs) if name.startswith("register_")]
    warnings = []
    for name, value in vars(module).items():
        if not callable(value) or isinstance(value, type) or getattr(value, "__module__", None) != module.__name__:
            continue
        marked = hasattr(value, hookspecs.PROJECT + "_impl")
        if name in hook_names and not marked:
            warnings.append(f"{name}() is not decorated with @bench.hookimpl, so it is never called")
        elif name not in hook_names and name.startswith("register") and did_you_mean(name, hook_names):
            warnings.append(f"{name}() is not a hook{did_you_mean(name, hook_names)}; it is never called")
    return warnings


_registry: Registry | None = None


def load_plugins() -> Registry:
    """Discover and register all plugins, once per process."""
    global _registry
    if _registry is None:
        _registry = build_registry(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
    return _registry


def _loaded(ep, pm: pluggy.PluginManager, registry: Registry, package: str) -> bool:
    """Load one entry point's module and register it with pluggy; a module that fails to load,
    has an invalid hook, or registers nothing is a `LoadProblem` (and False when it is left out)."""
    try:
        module = ep.load()
        pm.register(module, name=ep.name)
    except (Exception, SystemExit) as exc:  # a broken plugin (even one calling sys.exit) spares the others
        registry.problems.append(LoadProblem(ep.name, package, f"failed to load: {type(exc).__name__}: {exc}"))
        return False
    for warning in unmarked_hooks(module):
        registry.problems.append(LoadProblem(ep.name, package, warning))
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        pm.unregister(name=ep.name)
        hook_names = [name for name in dir(hookspecs) if name.startswith("register_")]
        hints = "".join(
            did_you_mean(name, hook_names)
            for name, value in vars(module).items()
            if hasattr(value, hookspecs.PROJECT + "_impl") and name not in hook_names
        )
        registry.problems.append(LoadProblem(ep.name, package, f"invalid hook: {exc}{hints}"))
        return False
    if not pm.get_hookcallers(module):
        hooks = ", ".join(name for name in dir(hookspecs) if name.startswith("register_"))
        registry.problems.append(
            LoadProblem(ep.name, package, f"implements none of the hooks ({hooks}): it registers nothing")
        )
    return True


def _call_register_hooks(pm: pluggy.PluginManager, registry: Registry, origin: dict, trace: bool) -> None:
    """Call every plugin's register_* hooks, each class attributed to its package; one bad
    class or hook is a `LoadProblem` and spares the rest."""
    for kind, hook_name in HOOKS.items():
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            package, version = origin.get(impl.plugin_name, ("<unknown package>", ""))

            def register(cls, _plugin=impl.plugin_name, _package=package, _version=version):
                try:
                    registry.register(cls, plugin=_plugin, package=_package, version=_version)
                except PluginLoadError as exc:
                    registry.problems.append(LoadProblem(_plugin, _package, str(exc)))
                except (Exception, SystemExit) as exc:  # one bad class must not hide the ones after it
                    registry.problems.append(
                        LoadProblem(_plugin, _package, f"registering {cls!r} failed: {type(exc).__name__}: {exc}")
                    )
                if trace:
                    print(f"bench: {hook_name} -> {kind} '{getattr(cls, 'name', cls)}' ({_plugin})", file=sys.stderr)
                return cls

            try:
                impl.function(**({"register": register} if "register" in impl.argnames else {}))
            except (Exception, SystemExit) as exc:
                registry.problems.append(
                    LoadProblem(impl.plugin_name, package, f"{hook_name} failed: {type(exc).__name__}: {exc}")
                )


def build_registry(entry_points: Iterable[importlib.metadata.EntryPoint]) -> Registry:
    registry = Registry()
    trace = os.environ.get("BENCH_TRACE_PLUGINS", "") not in ("", "0")
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    only = os.environ.get("BENCH_LOAD_PLUGINS")
    allowed = None if only is None else {n.strip() for n in only.split(",") if n.strip()}
    origin: dict[str, tuple[str, str]] = {}

    # Built-ins first, then third parties by name: the order decides which duplicate is kept.
    def order(ep):
        package = ep.dist.name if ep.dist else ""
        return (package != BUILTIN_PACKAGE, package, ep.name)

    for ep in sorted(entry_points, key=order):
        if allowed is not None and ep.name not in allowed:
            continue
        package = ep.dist.name if ep.dist else "<unknown package>"
        version = ep.dist.version if ep.dist else ""
        if ep.name in origin:
            registry.problems.append(
                LoadProblem(
                    ep.name,
                    package,
                    f"entry point name '{ep.name}' is also used by {origin[ep.name][0]}; this one is skipped",
                )
            )
            continue
        if not _loaded(ep, pm, registry, package):
            continue
        origin[ep.name] = (package, version)
        if trace:
            print(f"bench: loaded plugin '{ep.name}' from {package} {version}", file=sys.stderr)

    _call_register_hooks(pm, registry, origin, trace)
    return registry
