"""`bench migrate STORE`: bring the metric descriptions of results stored by an older version
up to date, from the installed plugins: each metric's `doc` line and `headline` flag, which the
report reads from the store alone (it imports no plugin), and the methods' paper and code links.
Values and everything else stay as
they were; a metric whose plugin is not installed keeps its description."""

from __future__ import annotations

from pathlib import Path

from bench.store import ResultStore


def migrate(store_path: Path) -> int:
    """Add the missing metric descriptions to every row of the store; returns the rows changed."""
    from bench.registry import load_plugins
    from bench.stages import CLEAN_ACCURACY, DER

    registry = load_plugins()
    core = {m.key: m for m in (CLEAN_ACCURACY, DER)}

    def declared(kind: str, name: str | None) -> dict:
        if not name:
            return {}
        try:
            return {m.key: m for m in registry.get(kind, name).cls.metrics}
        except Exception:  # not installed (or no longer): leave its metrics as stored
            return {}

    cache: dict[tuple, dict] = {}

    def describe(row: dict, key: str) -> dict | None:
        names = tuple((kind, row.get(kind)) for kind in ("attack", "defense", "analysis"))
        if names not in cache:
            cache[names] = {**core}
            for kind, name in names:
                cache[names].update(declared(kind, name))
        metric = cache[names].get(key)
        if metric is None:
            return None
        info = metric.info()
        return {"doc": info["doc"], "headline": info["headline"]}

    def methods(row: dict) -> dict:
        out = {}
        for kind in ("attack", "defense", "analysis"):
            name = row.get(kind)
            try:
                cls = registry.get(kind, name).cls if name else None
            except Exception:
                cls = None
            if cls is not None:
                out[kind] = {"name": name, "paper": cls.paper or "", "code": cls.code or ""}
        return out

    with ResultStore(store_path) as store:
        return store.add_metric_descriptions(describe, methods)
