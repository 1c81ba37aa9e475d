"""The plugin catalog: what `bench plugins` shows, as plain data, and its cache.

Listing the plugins means loading them, which imports their modules and with them torch: seconds
for a question that should take a fraction of one. So the catalog (per plugin: kind, name,
package, version, description, paper and code links, options; and the plugins that failed to
load) is kept in the cache root as `plugins.json`, under a fingerprint of everything that could
change it without a reload:

- every entry point of the group: its name and target, its package and the package's version;
- the size and modification time of each entry point's module file, and of the core's own files
  (an editable install changes code without changing versions);
- `BENCH_LOAD_PLUGINS` and the Python version.

`catalog()` answers from the cache when its fingerprint matches and otherwise loads the plugins
and rewrites the cache. Computing the fingerprint imports no plugin module (only the parent
packages of dotted module names, to locate their files).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

from bench.hookspecs import PROJECT as ENTRY_POINT_GROUP  # bench.registry.ENTRY_POINT_GROUP
from bench.locations import cache_root, write_atomically

CATALOG_FILE = "plugins.json"


def catalog(root: Path | None = None, reload: bool = False) -> dict[str, Any]:
    """{"plugins": [...], "problems": [...]}, from `root`/plugins.json when it is current (and
    `reload` is false), else from loading the plugins (and then written there)."""
    path = (root or cache_root()) / CATALOG_FILE
    stamp = fingerprint()
    if not reload:
        try:
            cached = json.loads(path.read_text())
            if cached.get("fingerprint") == stamp:
                return {"plugins": cached["plugins"], "problems": cached["problems"]}
        except (OSError, ValueError, KeyError, AttributeError):
            pass  # missing, unreadable or of another layout: rebuild it
    from bench.registry import load_plugins

    fresh = describe_registry(load_plugins())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, lambda handle: handle.write(json.dumps({"fingerprint": stamp, **fresh}).encode()))
    except OSError:
        pass  # a read-only cache folder costs speed, not correctness
    return fresh


def describe_registry(registry) -> dict[str, Any]:
    """The catalog of loaded plugins: JSON-plain values (enum defaults by value)."""
    from bench.options import describe

    return {
        "plugins": [
            {
                "kind": p.kind,
                "name": p.name,
                "package": p.package,
                "version": p.version,
                "description": p.description,
                "paper": p.cls.paper,
                "code": p.cls.code,
                # what a defense may use (bench.DefenderData); None for other kinds
                "defender_data": p.cls.defender_data.value if p.kind == "defense" else None,
                # through JSON and back, so that a fresh catalog prints exactly as a cached one
                "options": [
                    json.loads(json.dumps({**o, "default": _plain(o["default"]), "choices": _choices(o["choices"])}))
                    for o in describe(p.cls.Options)
                ],
            }
            for p in registry.all()
        ],
        "problems": [
            {"plugin": problem.plugin, "package": problem.package, "message": problem.message}
            for problem in registry.problems
        ],
    }


def fingerprint() -> str:
    parts: list[Any] = [sys.version, os.environ.get("BENCH_LOAD_PLUGINS")]
    entry_points = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    for ep in sorted(entry_points, key=lambda e: (e.name, e.value)):
        package = (ep.dist.name, ep.dist.version) if ep.dist else None
        parts.append([ep.name, ep.value, package, _file_stamp(ep.value.split(":")[0].strip())])
    core = Path(__file__).parent
    parts += [[path.name, *_stat(path)] for path in sorted(core.glob("*.py"))]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()


def _file_stamp(module: str) -> list | None:
    """Size and mtime of the entry point's module and of every Python file of its top-level
    package: the plugin's classes may live in a submodule it imports (an editable install)."""
    try:
        spec = importlib.util.find_spec(module)
        top = importlib.util.find_spec(module.split(".")[0])
    except Exception:  # a broken parent package: the load will report it
        return None
    if spec is None or not spec.origin or not os.path.isfile(spec.origin):
        return None
    files = {Path(spec.origin)}
    for folder in (top.submodule_search_locations or []) if top is not None else []:
        files.update(Path(folder).rglob("*.py"))
    return [[str(path), *_stat(path)] for path in sorted(files)]


def _stat(path: Path) -> tuple[int, int]:
    info = path.stat()
    return info.st_mtime_ns, info.st_size


def _plain(value):
    return getattr(value, "value", value)


def _choices(choices) -> list:
    return [_plain(c) for c in choices or []]
