"""Leaderboard figures (PNG, matplotlib's Agg backend), drawn from stored rows only:
- for every series of measured points a defense stored (e.g. MCR's `path`: records holding one
  coordinate such as t and the job's metrics), clean accuracy and the attack's metrics against
  that coordinate (mean over seeds, its 95% t-interval shaded, as the tables' cells);
- for every group swept over bonafide sizes, the attack's success metric against bonafide size,
  one line per defense."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np

from bench.statistics import t_interval


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


READABLE_PREFIX = 60  # characters of a figure's file name that come from its labels


def figure_file(folder: Path, kind: str, *parts) -> Path:
    """A figure's path: a readable prefix from its labels (cut short) and a digest of the exact
    parts, so labels differing only in case or punctuation ("BadNets 2x2", "badnets-2x2") get
    different files and a long label never makes a name too long for the file system."""
    readable = _slug("-".join(str(p) for p in parts))[:READABLE_PREFIX].strip("-")
    digest = hashlib.sha256("\x1f".join([kind, *map(str, parts)]).encode()).hexdigest()[:10]
    return folder / f"{kind}-{readable}-{digest}.png"


def band(samples) -> tuple[np.ndarray, np.ndarray]:
    """Per x, the mean over seeds and the half-width of its 95% t-interval (0 for one seed): the
    same statistics as the tables' cells."""
    intervals = [t_interval(list(np.asarray(v, dtype=float))) for v in samples]
    return (
        np.array([i.mean for i in intervals]),
        np.array([i.half_width if i.half_width is not None else 0.0 for i in intervals]),
    )


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight", metadata={"Software": None})
    _pyplot().close(fig)


def point_series(rows: list[dict]) -> dict[str, str]:
    """The series of these rows that hold measured points: series name -> its coordinate. A
    record of such a series has the job's metrics (clean accuracy at least, as the core measures
    every point a defense yields) and exactly one other number, the coordinate. No series name
    is special."""
    found: dict[str, str] = {}
    for r in rows:
        metrics = set(r["metric_info"]) | {"clean_acc"}
        for name, records in r["series"].items():
            if not records or not all(isinstance(p, dict) and "clean_acc" in p for p in records):
                continue
            others = {k for p in records for k in p if k not in metrics}
            if len(others) == 1:
                (coordinate,) = others
                if all(isinstance(p.get(coordinate), (int, float)) for p in records):
                    found.setdefault(name, coordinate)
    return found


def series_plot(
    group: str, defense: str, bonafide: int, series: str, coordinate: str, rows: list[dict], folder: Path
) -> Path | None:
    """Metrics against `coordinate` along the stored point series `series` of these rows (one
    row per seed)."""
    paths = [r["series"][series] for r in rows if r["series"].get(series)]
    if not paths:
        return None
    info = rows[0]["metric_info"]
    # headline percentages only: the axis is in percent, diagnostics and numbers would leave it
    keys = [
        k
        for k in info
        if k != "der"
        and info[k].get("kind", "percent") == "percent"
        and not info[k].get("diagnostic", False)
        and all(k in point for path in paths for point in path)
    ]
    t = np.array([p[coordinate] for p in paths[0]])
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for key in keys:
        values = np.array([[p[key] for p in path] for path in paths if len(path) == len(t)]) * 100
        mean, half = band([values[:, i] for i in range(values.shape[1])])
        ax.plot(t, mean, marker="o", markersize=3, label=info[key]["label"])
        if len(values) > 1:
            ax.fill_between(t, mean - half, mean + half, alpha=0.2)
    ax.set_xlabel(f"{coordinate} along the {series}")
    ax.set_ylabel("%")
    ax.set_ylim(-2, 102)
    ax.set_title(f"{group}\n{defense}, bonafide {bonafide}, {len(paths)} seed(s)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path = figure_file(folder, _slug(series)[:20] or "series", group, defense, bonafide)
    _save(fig, path)
    return path


def bonafide_plot(group: str, metric_key: str, rows: list[dict], folder: Path) -> Path | None:
    """The success metric against bonafide size, a line per defense (mean over seeds)."""
    by_defense: dict[str, dict[int, list[float]]] = {}
    for r in rows:
        if r["bonafide_size"] and metric_key in r["metrics"]:
            by_defense.setdefault(r["defense_label"], {}).setdefault(r["bonafide_size"], []).append(
                r["metrics"][metric_key]
            )
    if not any(len(sizes) > 1 for sizes in by_defense.values()):
        return None
    label = rows[0]["metric_info"].get(metric_key, {}).get("label", metric_key)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for defense, sizes in sorted(by_defense.items()):
        xs = sorted(sizes)
        mean, half = band([np.array(sizes[x]) * 100 for x in xs])
        ax.errorbar(
            xs,
            mean,
            yerr=half,
            marker="o",
            markersize=3,
            capsize=2,
            label=defense,
        )
    ax.set_xscale("log")
    ax.set_xlabel("bonafide images")
    ax.set_ylabel(f"{label} (%)")
    ax.set_ylim(-2, 102)
    ax.set_title(group, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path = figure_file(folder, "bonafide", group, metric_key)
    _save(fig, path)
    return path


def analysis_plot(group: str, figure: dict, rows: list[dict], folder: Path) -> Path | None:
    """One figure an analysis asked for (`bench.Figure.info()`): each y key against x, one line
    per y key and value of the figure's group key, mean over the rows (seeds), its 95% t-interval shaded."""
    x_key, y_keys, group_key = figure["x"], figure["y"], figure.get("group", "")
    lines: dict[tuple[str, str], dict[float, list[float]]] = {}
    for r in rows:
        for record in r["series"].get(figure["series"], []):
            if x_key not in record:
                continue
            for y in y_keys:
                if isinstance(record.get(y), (int, float)):
                    name = (str(record.get(group_key, "")) if group_key else "", y)
                    lines.setdefault(name, {}).setdefault(float(record[x_key]), []).append(float(record[y]))
    if not lines:
        return None
    scale = 100 if figure.get("percent", True) else 1
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for (group_value, y), points in sorted(lines.items()):
        xs = sorted(points)
        mean, half = band([np.array(points[x]) * scale for x in xs])
        label = f"{group_value}: {y}" if group_value and len(y_keys) > 1 else (group_value or y)
        ax.plot(xs, mean, marker="o", markersize=3, label=label)
        if any(len(points[x]) > 1 for x in xs):
            ax.fill_between(xs, mean - half, mean + half, alpha=0.2)
    ax.set_xlabel(figure.get("xlabel") or x_key)
    ax.set_ylabel(figure.get("ylabel") or ("%" if scale == 100 else ""))
    if scale == 100:
        ax.set_ylim(-2, 102)
    ax.set_title(f"{group}\n{figure['title']}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    path = figure_file(folder, "analysis", figure["title"], group)
    _save(fig, path)
    return path
