"""`bench report`: leaderboard markdown rebuilt from the result store alone, deterministically
(the same store gives the same bytes): one table per (dataset, model, attack), one row per
defense and bonafide size, each metric as mean +/- std over seeds, the best value in bold."""

from __future__ import annotations

import json
import math
import re
import sqlite3
from pathlib import Path
from typing import Any

import pandas as pd

from bench.errors import BenchError
from bench.statistics import (
    Interval,
    clearly_best,
    holm,
    paired_difference,
    paired_p_value,
    t_interval,
    tied_ranks,
)

from bench.jobs import ATTACK_TRAINING_NOTE
from bench.store import ResultStore

SIGNIFICANCE = 0.05  # family-wise level of the paired comparisons under each table

TIME = "defense_time"


def render_report(
    store_path: str | Path,
    suite: str | None = None,
    plot_dir: Path | None = None,
    plot_link_base: Path | None = None,
    all_runs: bool = False,
) -> str:
    """The leaderboard markdown of one suite. With `plot_dir`, PNG figures (metrics along stored
    paths, success metric against bonafide size) are written there and linked relative to
    `plot_link_base` (the folder of the markdown file). Only the jobs of the suite's latest run
    are shown (rows from before its options changed stay in the store); `all_runs` shows every
    stored row of the suite. The store is opened read-only."""
    store_path = Path(store_path)
    rows, analysis_rows, planned = select_rows(store_path, suite, all_runs)
    everything = rows + analysis_rows
    ok = [r for r in rows if r["status"] == "ok"]
    ok_analyses = [r for r in analysis_rows if r["status"] == "ok"]
    failed = [r for r in everything if r["status"] != "ok"]
    lines = _header(everything, ok + ok_analyses, failed, store_path, jobs=bool(rows))
    lines += _missing_lines(ok + ok_analyses, planned)
    groups: dict[tuple, list[dict]] = {}
    for r in ok:
        groups.setdefault((r["dataset_label"], r["model_label"], r["attack_label"]), []).append(r)
    for (dataset, model, attack), members in sorted(groups.items()):
        lines += ["", f"## {md(dataset)} / {md(model)} / {md(attack)}", ""]
        lines += _before_line(members) + [""]
        protocols = sorted({str(r["notes"].get("attack_protocol", "")) for r in members} - {""})
        lines += [f"Attack protocol: {md(p)}" for p in protocols] + ([""] if protocols else [])
        lines.append(_table(members))
        lines += _method_links(members)
        if plot_dir is not None:
            lines += _figures(f"{dataset} / {model} / {attack}", members, plot_dir, plot_link_base or plot_dir)
    lines += _analysis_sections(ok_analyses, plot_dir, plot_link_base or plot_dir)
    if failed:
        lines += ["", "## Failed jobs", ""]
        for r in sorted(
            failed,
            key=lambda r: (
                r["dataset_label"],
                r["model_label"],
                r.get("attack_label", ""),
                r.get("defense_label", r.get("analysis_label", "")),
                r.get("bonafide_size", 0),
                r["seed"],
            ),
        ):
            first = (r["error"] or "").splitlines()[0] if r["error"] else ""
            if "analysis" in r:
                lines.append(
                    f"- analysis {md(r['analysis_label'])} on {md(r['dataset_label'])} / "
                    f"{md(r['model_label'])} seed={r['seed']}: {md(first)}"
                )
                continue
            lines.append(
                f"- {md(r['dataset_label'])} / {md(r['model_label'])} / {md(r['attack_label'])} / "
                f"{md(r['defense_label'])} bonafide={r['bonafide_size']} seed={r['seed']}: {md(first)}"
            )
    return "\n".join(lines) + "\n"


def failure_text(store_path: str | Path, suite: str | None = None, all_runs: bool = False) -> str:
    """Every failed job (and analysis) of the suite's latest run, each with its whole stored
    traceback (`bench report --failures`)."""
    rows, analysis_rows, _ = select_rows(Path(store_path), suite, all_runs)
    failed = [r for r in rows + analysis_rows if r["status"] != "ok"]
    if not failed:
        return "no failed jobs\n"
    parts = []
    for r in failed:
        what = (
            f"analysis {r['analysis_label']} on {r['dataset_label']} / {r['model_label']}"
            if "analysis" in r
            else f"{r['dataset_label']} / {r['model_label']} / {r['attack_label']} / {r['defense_label']} "
            f"bonafide={r['bonafide_size']}"
        )
        parts.append(f"=== {what} seed={r['seed']} (job {r['job_key'][:20]})\n{(r['error'] or '').rstrip()}\n")
    return "\n".join(parts)


def select_rows(store_path: Path, suite: str | None, all_runs: bool) -> tuple[list[dict], list[dict], dict]:
    """(job rows, analysis rows, planned jobs) of one suite, as the report shows them: the
    suite's latest run only, unless `all_runs`. Opens the store read-only."""
    try:
        with ResultStore(store_path, read_only=True) as store:
            rows = store.rows(suite)
            analysis_rows = store.analysis_rows(suite)
            planned = store.planned_jobs()
    except sqlite3.DatabaseError as exc:
        raise BenchError(f"{store_path}: cannot read the result store ({exc})") from None
    if not rows and not analysis_rows:
        which = f" for suite '{suite}'" if suite else ""
        raise BenchError(f"{store_path}: no results{which}")
    suites = sorted({r["suite"] for r in rows + analysis_rows})
    if len(suites) > 1:
        raise BenchError(
            f"{store_path}: holds results of several suites ({', '.join(suites)}); choose one with --suite NAME"
        )
    if not all_runs and suites[0] in planned:
        latest = set(planned[suites[0]][1])
        rows = [r for r in rows if r["job_key"] in latest]
        analysis_rows = [r for r in analysis_rows if r["job_key"] in latest]
        if not rows and not analysis_rows:
            raise BenchError(
                f"{store_path}: no results yet for the latest run of suite '{suites[0]}'; "
                "--all-runs shows the older ones"
            )
    return rows, analysis_rows, planned


def report_data(store_path: str | Path, suite: str | None = None, all_runs: bool = False) -> dict:
    """The report as plain data (`bench report --format json`, and what the HTML page renders):
    the provenance, per (dataset, model, attack) table its ranked rows with, per metric, its
    description, mean, interval and cell text, and the paired comparisons; per analysis its
    values and findings; the failed jobs; whether the suite's latest run is complete."""
    rows, analysis_rows, planned = select_rows(Path(store_path), suite, all_runs)
    everything = rows + analysis_rows
    ok = [r for r in everything if r["status"] == "ok"]
    suite_name = everything[0]["suite"]
    planned_keys = planned.get(suite_name, ("", []))[1]
    missing = [k for k in planned_keys if k not in {r["job_key"] for r in ok}]
    return {
        "suite": suite_name,
        "header": header_data(everything, ok, [r for r in everything if r["status"] != "ok"], Path(store_path)),
        "encoding": NON_FINITE_NOTE,
        "complete": not missing,
        "jobs_planned": len(planned_keys),
        "jobs_without_result": len(missing),
        "tables": [
            _table_data(key, members)
            for key, members in sorted(_grouped(ok, ("dataset_label", "model_label", "attack_label")).items())
            if "attack_label" in members[0]
        ],
        "analyses": [
            _analysis_data(key, members)
            for key, members in sorted(_grouped(ok, ("analysis_label", "dataset_label", "model_label")).items())
            if "analysis_label" in members[0]
        ],
        "failed": [_failure_data(r) for r in everything if r["status"] != "ok"],
    }


def _grouped(rows: list[dict], keys: tuple[str, ...]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if all(k in r for k in keys):
            groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    return groups


def _table_data(key: tuple, members: list[dict]) -> dict:
    dataset, model, attack = key
    board = leaderboard_rows(members)
    return {
        "dataset": dataset,
        "model": model,
        "attack": attack,
        "ranked_by": board["headline"],
        "glossary": {k: i["doc"] for k, i in board["columns"] if i.get("doc")},
        "methods": method_link_data(members),
        "rows": [_row_data(board, row) for row in board["order"]],
        "paired_comparisons": [
            {
                "first": {"defense": c["first"][0], "bonafide_size": c["first"][1]},
                "second": {"defense": c["second"][0], "bonafide_size": c["second"][1]},
                "metric": board["headline"],
                "p_holm": c["p_holm"],
                **_interval_data(c["difference"]),
            }
            for c in paired_comparisons(board)
        ],
    }


def _row_data(board: dict, row: tuple) -> dict:
    runs = board["runs"][row]
    metrics = {
        key: {
            **info,
            **_stats(_row_values(runs, key)),
            "clearly_best": board["best"].get(key) == row,
            "text": _format_interval(board["intervals"][row][key], info["kind"]),
        }
        for key, info in board["columns"]
    }
    metrics[TIME] = {
        **TIME_INFO,
        **_stats(_row_values(runs, TIME)),
        "text": _format_interval(board["intervals"][row][TIME], "seconds"),
    }
    return {
        "defense": row[0],
        "bonafide_size": row[1],
        "defender_data": defender_data(runs),
        "data_text": data_text(row[1], runs),
        "rank": board["ranks"][row],
        "flagged_unreliable": board["flagged"][row],
        "extra_models_trained": max(int(r["notes"].get(EXTRA_MODELS, 0)) for r in runs),
        "seeds": sorted(r["seed"] for r in runs),
        "metrics": metrics,
    }


def _analysis_data(key: tuple, members: list[dict]) -> dict:
    analysis, dataset, model = key

    def values_of(name: str) -> list[float]:
        return [r["metrics"][name] for r in members if name in r["metrics"]]

    return {
        "analysis": analysis,
        "dataset": dataset,
        "model": model,
        "seeds": sorted(r["seed"] for r in members),
        "values": {
            name: {**info, **_stats(values_of(name)), "text": _cell(values_of(name), info["kind"])}
            for name, info in _metric_columns(members)
        },
        "findings": _findings(members),
    }


_IDENTITY = ("dataset_label", "model_label", "attack_label", "defense_label", "analysis_label", "bonafide_size", "seed")


def _failure_data(r: dict) -> dict:
    first = (r["error"] or "").splitlines()[0] if r["error"] else ""
    return {"key": r["job_key"], "error": first, **{k: r.get(k) for k in _IDENTITY if k in r}}


NON_FINITE_NOTE = "non-finite numbers are written as the strings 'NaN', 'Infinity' and '-Infinity'"


def json_safe(value):
    """`value` with every non-finite float replaced by its string (RFC 8259 has no NaN or
    infinity); finite floats stay exact (json writes their shortest round-trip repr)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def json_text(data) -> str:
    """Valid JSON (no NaN or Infinity tokens), exact, indented, ending in a newline."""
    return json.dumps(json_safe(data), indent=2, allow_nan=False) + "\n"


def _stats(values: list[float]) -> dict:
    """Mean, sample std, count and the 95% t-interval of `values` (None where undefined)."""
    interval = t_interval(values)
    std = None
    if interval.n >= 2:
        std = math.sqrt(math.fsum((v - interval.mean) ** 2 for v in values) / (interval.n - 1))
    return {"mean": None if interval.n == 0 else interval.mean, "std": std, **_interval_data(interval)}


def _interval_data(interval: Interval) -> dict:
    return {
        "n": interval.n,
        "mean": None if interval.n == 0 else interval.mean,
        "ci_low": interval.low,
        "ci_high": interval.high,
        "ci_level": interval.level,
        "ci_method": "student_t_over_seeds",
    }


_MARKDOWN_ESCAPES = {
    "\\": "\\\\",
    "|": "\\|",
    "*": "\\*",
    "`": "\\`",
    "[": "\\[",
    "]": "\\]",
    "<": "&lt;",
    ">": "&gt;",
    "#": "\\#",
    "~": "\\~",
    "@": "&#64;",  # no e-mail autolinks, no @-mentions
}
# An underscore emphasises only at a word's edge (GitHub ignores snake_case): escape those.
_EDGE_UNDERSCORE = re.compile(r"(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])")
# Bidirectional controls (U+202E turns text around) are shown as their code point.
_BIDI = {chr(c) for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x200E, 0x200F, 0x061C)}
# GitHub links bare URLs and www. names on its own: break the pattern with an HTML entity.
_AUTOLINK = re.compile(r"(?i)(https?|ftp|mailto)(:)|\b(www)(\.)")


def md(text) -> str:
    """A string from a suite, a plugin or the store, made inert in markdown: one line, no table
    breaks, no HTML, no links (bracketed or bare), no emphasis or strike-through, no
    bidirectional controls."""
    text = " ".join(str(text).split())
    escaped = "".join(f"U+{ord(ch):04X}" if ch in _BIDI else _MARKDOWN_ESCAPES.get(ch, ch) for ch in text)
    escaped = _EDGE_UNDERSCORE.sub(r"\\_", escaped)
    return _AUTOLINK.sub(lambda m: f"{m[1]}&#58;" if m[1] else f"{m[3]}&#46;", escaped)


def draw_table_figures(group: str, members: list[dict], plot_dir: Path) -> list[Path]:
    """The PNG figures of one table, written into `plot_dir`: metrics along every stored point
    series, and each lower-is-better success metric against the bonafide size."""
    from bench.plots import bonafide_plot, point_series, series_plot

    written = []
    by_defense: dict[tuple, list[dict]] = {}
    for r in members:
        by_defense.setdefault((r["defense_label"], r["bonafide_size"]), []).append(r)
    for (defense, bonafide), rows in sorted(by_defense.items()):
        for series, coordinate in sorted(point_series(rows).items()):
            written.append(series_plot(group, defense, bonafide, series, coordinate, rows, plot_dir))
    success = {
        k
        for r in members
        for k, info in r["metric_info"].items()
        if k not in ("clean_acc", "der")
        and info.get("kind", "percent") == "percent"
        and not info.get("diagnostic", False)
    }
    for key in sorted(success):
        if all(r["metric_info"][key]["higher_is_better"] is False for r in members if key in r["metric_info"]):
            written.append(bonafide_plot(group, key, members, plot_dir))
    return [p for p in written if p is not None]


def table_figures(store_path: str | Path, suite: str | None, plot_dir: Path, all_runs: bool = False) -> dict:
    """Every table's figures (title 'dataset / model / attack' -> paths), drawn into `plot_dir`."""
    rows, _, _ = select_rows(Path(store_path), suite, all_runs)
    groups: dict[tuple, list[dict]] = {}
    for r in (r for r in rows if r["status"] == "ok"):
        groups.setdefault((r["dataset_label"], r["model_label"], r["attack_label"]), []).append(r)
    return {
        f"{d} / {m} / {a}": draw_table_figures(f"{d} / {m} / {a}", members, plot_dir)
        for (d, m, a), members in sorted(groups.items())
    }


def _figures(group: str, members: list[dict], plot_dir: Path, link_base: Path) -> list[str]:
    written = draw_table_figures(group, members, plot_dir)
    links = [
        f"![{p.stem}]({p.relative_to(link_base).as_posix() if p.is_relative_to(link_base) else p.as_posix()})"
        for p in written
    ]
    return ["", *links] if links else []


def _analysis_sections(rows: list[dict], plot_dir: Path | None, link_base: Path | None) -> list[str]:
    """Per analysis and dataset / model: its values (mean ± 95% t-interval over seeds, by kind) and the
    figures it asked for, drawn from the stored series."""
    from bench.plots import analysis_plot

    lines = []
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["analysis_label"], r["dataset_label"], r["model_label"]), []).append(r)
    for (analysis, dataset, model), members in sorted(groups.items()):
        seeds = sorted({r["seed"] for r in members})
        lines += [
            "",
            f"## Analysis: {md(analysis)} on {md(dataset)} / {md(model)}",
            "",
            f"{len(seeds)} seed{'s' if len(seeds) != 1 else ''} ({', '.join(map(str, seeds))}); "
            f"time per seed {_cell([sum(r['timings'].values()) for r in members], 'seconds')} s",
            "",
        ]
        columns = _metric_columns(members)
        if columns:
            cells = [
                {
                    "Value": md(info["label"]),
                    "Mean ± 95% CI": _cell([r["metrics"][key] for r in members if key in r["metrics"]], info["kind"]),
                }
                for key, info in columns
            ]
            lines.append(pd.DataFrame(cells).to_markdown(index=False, disable_numparse=True))
        lines += _finding_lines(members)
        lines += _method_links(members)
        if plot_dir is not None:
            link_base = link_base or plot_dir
            figures = {json_key(f): f for r in members for f in r["figures"]}
            written = [
                analysis_plot(f"{analysis} / {dataset} / {model}", spec, members, plot_dir)
                for _, spec in sorted(figures.items())
            ]
            links = [
                f"![{p.stem}]({p.relative_to(link_base).as_posix() if p.is_relative_to(link_base) else p.as_posix()})"
                for p in written
                if p is not None
            ]
            lines += ["", *links] if links else []
    return lines


def _findings(members: list[dict]) -> list[dict]:
    """Per claim an analysis checked: the seeds that show it and each seed's evidence."""
    claims: dict[str, list[dict]] = {}
    for r in sorted(members, key=lambda r: r["seed"]):
        for finding in r["notes"].get("findings", []):
            claims.setdefault(finding["claim"], []).append(
                {"seed": r["seed"], "shown": bool(finding["shown"]), "evidence": finding["evidence"]}
            )
    return [
        {"claim": claim, "shown_in": sum(s["shown"] for s in seeds), "seeds": seeds} for claim, seeds in claims.items()
    ]


def _finding_lines(members: list[dict]) -> list[str]:
    findings = _findings(members)
    if not findings:
        return []
    lines = ["", "The paper's findings, and whether this run shows them:", ""]
    for finding in findings:
        seeds = finding["seeds"]
        verdict = (
            "shown"
            if finding["shown_in"] == len(seeds)
            else "not shown"
            if finding["shown_in"] == 0
            else "partly shown"
        )
        evidence = "; ".join(f"seed {s['seed']}: {s['evidence']}" for s in seeds)
        count = f"{finding['shown_in']}/{len(seeds)} seeds"
        lines.append(f"- {md(finding['claim'])} **This run: {verdict}** ({count}; {md(evidence)}).")
    return lines


def json_key(figure: dict) -> str:
    return f"{figure['series']}|{figure['title']}"


def header_data(rows: list[dict], ok: list[dict], failed: list[dict], store_path: Path) -> dict:
    """The provenance of a leaderboard: suite, job counts, store, devices and machines, versions,
    data sources, run dates and plugin providers (the markdown header and the HTML page)."""
    versions: dict[str, set] = {}
    for r in ok:
        for key in ("robustness-bench", "torch", "python"):
            versions.setdefault(key, set()).add(r["versions"].get(key, "?"))
    return {
        "suites": sorted({r["suite"] for r in rows}),
        "jobs": len(rows),
        "succeeded": len(ok),
        "failed": len(failed),
        "store": store_path.name,
        "devices": sorted({r["device"] for r in ok}),
        "machines": sorted({str(r["notes"]["machine"]) for r in ok if r["notes"].get("machine")}),
        "versions": {k: "/".join(sorted(v)) for k, v in versions.items()},
        "data": sorted({r["notes"].get("data_source", "?") for r in ok}),
        "run_from": min(r["started_at"] for r in rows)[:10],
        "run_to": max(r["finished_at"] for r in rows)[:10],
        "plugins": sorted({value for r in ok for key, value in r["versions"].items() if ":" in key and value}),
    }


CELLS_NOTE = (
    "mean ± half-width of the 95% confidence interval over seeds (Student's t, n − 1 degrees of freedom; "
    "the mean alone for one seed), percentages in percent; defense time in seconds, the defense's whole cost "
    "(training the attacked model is shared by all defenses and not counted, further models a defense needs "
    "are); a value in bold only where its interval excludes the next best row's; each table's columns are "
    "explained under it."
)
ANALYSES_NOTE = (
    "values are mean ± half-width of the 95% t-interval over seeds (the mean alone for one seed; percentages "
    "in percent); figures show the mean over seeds with its 95% t-interval shaded."
)


def _header(rows, ok, failed, store_path, jobs: bool = True) -> list[str]:
    h = header_data(rows, ok, failed, store_path)
    suites = [md(name) for name in h["suites"]]
    lines = [
        f"# Leaderboard: {', '.join(suites)}",
        "",
        f"- Suite: {', '.join(suites)}; {h['jobs']} jobs, {h['succeeded']} succeeded, {h['failed']} failed "
        f"(store: {md(h['store'])})",
        f"- Device: {md('; '.join(h['devices'])) or 'n/a'}",
        *([f"- Machine: {md('; '.join(h['machines']))}"] if h["machines"] else []),
        "- Versions: " + ", ".join(f"{k} {md(v)}" for k, v in h["versions"].items()),
        f"- Data: {md('; '.join(h['data']))}",
        f"- Run: {h['run_from']} to {h['run_to']} (UTC)",
    ]
    if h["plugins"]:
        lines.append(f"- Plugins: {md(', '.join(h['plugins']))}")
    lines.append(f"- Cells: {CELLS_NOTE}" if jobs else f"- Analyses: {ANALYSES_NOTE}")
    return lines


def _missing_lines(ok: list[dict], planned: dict[str, tuple[str, list[str]]]) -> list[str]:
    """A warning per suite whose latest run left jobs without a result (a time limit, Ctrl-C,
    failures): such a leaderboard is incomplete."""
    finished = {r["job_key"] for r in ok}
    lines = []
    for suite in sorted({r["suite"] for r in ok}):
        if suite not in planned:
            continue  # a store written before suites were recorded
        suite_file, keys = planned[suite]
        missing = [k for k in keys if k not in finished]
        if missing:
            lines.append(
                f"- ⚠ Incomplete: {len(missing)} of the {len(keys)} jobs of suite {suite} have no result "
                f"yet; `bench run {suite_file}` runs them"
            )
    return lines


def _metric_columns(members: list[dict]) -> list[tuple[str, dict]]:
    """(key, info) of every metric these results report, in first-seen order over the rows taken
    `none` first, then by defense label, bonafide size and seed (never by job key, a hash: the
    columns must not move when an option is added); info gains the defaults of results stored
    before metrics had a kind."""
    columns: dict[str, dict] = {}
    order = sorted(
        members,
        key=lambda r: (
            r.get("defense", "") != "none",
            r.get("defense_label", ""),
            r.get("bonafide_size", 0),
            r["seed"],
        ),
    )
    for r in order:
        for key, info in r["metric_info"].items():
            columns.setdefault(key, {"kind": "percent", "diagnostic": False, **info})
    return list(columns.items())


def _before_line(members: list[dict]) -> list[str]:
    columns = [(k, i) for k, i in _metric_columns(members) if not i["diagnostic"]]
    parts = []
    by_seed = {r["seed"]: r for r in members}
    for key, info in columns:
        values = [r["metrics"].get(f"{key}_before") for r in by_seed.values()]
        values = [v for v in values if v is not None]
        if values and info["kind"] == "flag":
            flagged = sum(v > 0 for v in values)
            parts.append(f"{'⚠ ' if flagged else ''}{md(info['label'].lower())} in {flagged}/{len(values)} seeds")
        elif values:
            parts.append(f"{md(info['label'])} {_cell(values, info['kind'])}")
    seeds = f"{len(by_seed)} seed{'s' if len(by_seed) != 1 else ''}"
    lines = [f"Attacked model, before any defense ({seeds}): " + ", ".join(parts)] if parts else []
    trained = [r["notes"][ATTACK_TRAINING_NOTE] for r in by_seed.values() if ATTACK_TRAINING_NOTE in r["notes"]]
    if trained:
        lines += [
            "",
            f"Attacked model training: {_cell(trained, 'seconds')} s per model, the attack's own networks "
            "included (wall-clock, when the model was built; not counted as defense time)",
        ]
    return lines


_SAFE_LINK = re.compile(r"https://[A-Za-z0-9./?=_%&#:+~-]+")


def method_link_data(members: list[dict]) -> list[dict]:
    """Each method's paper and code links, as stored with the results (the plugins' `paper` and
    `code` fields when the job ran; `bench migrate` adds them to older rows; anything but a plain
    https link is ignored): [{"kind", "name", "links": [(label, url), ...]}]. Imports no plugin."""
    found: dict[tuple[str, str], dict] = {}
    for r in members:
        for kind, method in (r["notes"].get("methods") or {}).items():
            found.setdefault((kind, method.get("name", "")), method)
    out = []
    for (kind, name), method in sorted(found.items(), key=lambda item: (item[0][0] != "attack", item[0][1])):
        links = [
            (label, method.get(label) or "")
            for label in ("paper", "code")
            if method.get(label) and _SAFE_LINK.fullmatch(method[label])
        ]
        if links and name:
            out.append({"kind": kind, "name": name, "links": links})
    return out


def _method_links(members: list[dict]) -> list[str]:
    parts = [
        f"{md(m['name'])} ({', '.join(f'[{label}]({url})' for label, url in m['links'])})"
        for m in method_link_data(members)
    ]
    return ["", "Methods: " + "; ".join(parts) + "."] if parts else []


def headline_metric(columns: list[tuple[str, dict]]) -> str:
    """The metric a table is ranked by: the one its metric descriptions mark as the headline.
    Results stored before metrics said so (no `headline` key; `bench migrate` adds it) fall back
    to the core's own: DER when the attack has a success metric, else the first non-diagnostic
    metric after clean accuracy that is better when higher, else clean accuracy."""
    marked = [k for k, info in columns if info.get("headline") and not info["diagnostic"]]
    if marked:
        return marked[0]
    keys = [k for k, info in columns if not info["diagnostic"]]
    if "der" in keys:
        return "der"
    rising = [k for k, info in columns if not info["diagnostic"] and info["higher_is_better"] and k != "clean_acc"]
    return rising[0] if rising else (keys[0] if keys else "clean_acc")


TIME_INFO = {"label": "Defense time (s)", "higher_is_better": None, "kind": "seconds", "diagnostic": False}
EXTRA_MODELS = "extra_models_trained"


def _row_values(runs: list[dict], key: str) -> list[float]:
    if key == TIME:
        return [r["timings"].get("defense", 0.0) for r in runs]
    return [r["metrics"][key] for r in runs if r["metrics"].get(key) is not None]


def leaderboard_rows(members: list[dict]) -> dict:
    """One table's rows, ranked: per (defense, bonafide size) its runs, per metric the mean and
    95% t-interval over seeds, whether a gradient-masking check flagged it, and its rank. `none`
    is the reference and unranked; rows whose intervals overlap share a rank; a flagged row is
    ranked below every unflagged one. Also the headline metric and, per column, the one row
    whose value is clearly best (its interval excludes the runner-up's), if any."""
    columns = _metric_columns(members)
    runs_by_row: dict[tuple, list[dict]] = {}
    for r in members:
        runs_by_row.setdefault((r["defense_label"], r["bonafide_size"]), []).append(r)
    keys = [k for k, _ in columns] + [TIME]
    intervals = {row: {k: t_interval(_row_values(runs, k)) for k in keys} for row, runs in runs_by_row.items()}
    flags = [k for k, info in columns if info["kind"] == "flag"]
    flagged = {
        row: any((r["metrics"].get(k) or 0) > 0 for r in runs for k in flags) for row, runs in runs_by_row.items()
    }
    headline = headline_metric(columns)
    higher = dict(columns).get(headline, {}).get("higher_is_better", True) is not False
    ranks: dict[tuple, int | None] = {row: None for row in runs_by_row if row[0] == "none"}
    ranked = [row for row in runs_by_row if row[0] != "none"]
    clean_rows = [row for row in ranked if not flagged[row]]
    for group, offset in ((clean_rows, 0), ([row for row in ranked if flagged[row]], len(clean_rows))):
        for row, rank in tied_ranks({row: intervals[row][headline] for row in group}, higher).items():
            ranks[row] = rank + offset
    sign = -1 if higher else 1

    def order(row):
        mean = intervals[row][headline].mean
        return (row[0] != "none", ranks[row] or 0, 0 if math.isnan(mean) else sign * mean, row[0], -row[1])

    best = {}
    for key, info in columns:
        if info["higher_is_better"] is None or info["diagnostic"] or info["kind"] not in ("percent", "number"):
            continue
        winner = clearly_best(
            {row: intervals[row][key] for row in runs_by_row if not flagged[row] and intervals[row][key].n},
            info["higher_is_better"],
        )
        if winner is not None:
            best[key] = winner
    return {
        "columns": columns,
        "headline": headline,
        "higher_is_better": higher,
        "order": sorted(runs_by_row, key=order),
        "runs": runs_by_row,
        "intervals": intervals,
        "flagged": flagged,
        "ranks": ranks,
        "best": best,
    }


def paired_comparisons(board: dict) -> list[dict]:
    """Per bonafide size, every pair of ranked, unflagged rows compared on the headline metric,
    paired by seed (one seed's rows share the attacked model and the evaluation images): the
    mean difference (first - second, in rank order), its 95% t-interval, and the two-sided
    p-value of a paired t-test adjusted by Holm's method over all the table's comparisons."""
    headline = board["headline"]
    out = []
    sizes = sorted({row[1] for row in board["order"]}, reverse=True)
    for size in sizes:
        rows = [row for row in board["order"] if row[1] == size and board["ranks"][row] and not board["flagged"][row]]
        for i, first in enumerate(rows):
            for second in rows[i + 1 :]:
                a = {
                    r["seed"]: r["metrics"][headline]
                    for r in board["runs"][first]
                    if r["metrics"].get(headline) is not None
                }
                b = {
                    r["seed"]: r["metrics"][headline]
                    for r in board["runs"][second]
                    if r["metrics"].get(headline) is not None
                }
                difference = paired_difference(a, b)
                if difference.n:
                    out.append({"first": first, "second": second, "difference": difference})
    adjusted = holm([paired_p_value(c["difference"]) for c in out])
    for comparison, p_holm in zip(out, adjusted):
        comparison["p_holm"] = p_holm
    return out


def _table(members: list[dict]) -> str:
    """The headline table (one row per defense and bonafide size, `none` first as the reference,
    the rest ranked by the headline metric with ties where intervals overlap) and, when the
    attack reports diagnostics, a second table of them under it; then a glossary of the columns
    it has and the paired comparisons."""
    board = leaderboard_rows(members)
    columns = board["columns"]
    shown_columns = [(k, i) for k, i in columns if not i["diagnostic"]] + [(TIME, TIME_INFO)]
    diagnostics = [(k, i) for k, i in columns if i["diagnostic"]]
    text = _render(board, shown_columns, ranks=True)
    if diagnostics:
        text += "\n\nDiagnostics (per attack; not ranked):\n\n" + _render(board, diagnostics)
    labels = [(i["label"], i["doc"]) for k, i in columns if i.get("doc")]
    headline = board["headline"]
    text += (
        f"\n\nRanked by {md(dict(columns).get(headline, {}).get('label', headline))} (`none` is the reference); "
        "rows whose 95% intervals overlap share a rank"
        + (
            "; a row a gradient-masking check flagged is ranked below every unflagged one"
            if any(board["flagged"].values())
            else ""
        )
        + ". "
        + "; ".join(f"{md(label)}: {meaning}" for label, meaning in labels)
        + "."
    )
    if any(r["notes"].get(EXTRA_MODELS) for r in members):
        text += (
            " Extra models: further attacked models a defense needs (MCR's second endpoint); "
            "training them is included in its defense time."
        )
    text += _paired_lines(board)
    return text


def _paired_lines(board: dict) -> str:
    comparisons = paired_comparisons(board)
    if not comparisons:
        return ""
    info = dict(board["columns"]).get(board["headline"], {"kind": "percent", "label": board["headline"]})
    scale, unit = (100, " points") if info.get("kind") == "percent" else (1, "")
    lines = [
        "",
        "",
        f"Paired comparisons of {md(info['label'])} (same seed, same attacked model and evaluation images; "
        "difference first − second, 95% t-interval over the paired seeds; a difference is called only where "
        f"the paired t-test's p-value, Holm-adjusted over the table's comparisons, is below {SIGNIFICANCE:g}):",
        "",
    ]
    for c in comparisons:
        d: Interval = c["difference"]
        (first, size), (second, _) = c["first"], c["second"]
        if d.low is None or d.high is None:
            verdict, interval = "one seed: no interval", ""
        else:
            interval = f" [{d.low * scale:+.1f}, {d.high * scale:+.1f}]"
            verdict = (
                f"{md(first)} {'higher' if d.mean > 0 else 'lower'}"
                if c["p_holm"] < SIGNIFICANCE
                else "no difference shown"
            )
            verdict += f" (Holm-adjusted p = {c['p_holm']:.2g})"
        where = f" (bonafide {size})" if size else ""
        lines.append(
            f"- {md(first)} − {md(second)}{where}: {d.mean * scale:+.1f}{unit}{interval}, "
            f"{d.n} seed{'s' if d.n != 1 else ''}: {verdict}"
        )
    return "\n".join(lines)


def defender_data(runs: list[dict]) -> str:
    """What the row's defense used (`bench.DefenderData`'s value, stored with each result;
    rows stored before it existed used bonafide images or, with size 0, none)."""
    kinds = {r["notes"].get("defender_data") for r in runs} - {None}
    if kinds:
        return sorted(kinds)[0]
    return "bonafide" if any(r["bonafide_size"] for r in runs) else "none"


def data_text(bonafide: int, runs: list[dict]) -> str:
    """The Bonafide column's cell: the bonafide size, "training set" for a defense that trains on
    the poisoned training set, "-" for a data-free one."""
    kind = defender_data(runs)
    if kind == "poisoned_training_set":
        return "training set"
    return str(bonafide) if bonafide else "-"


def _render(board: dict, specs: list[tuple[str, dict]], ranks: bool = False) -> str:
    extra = any(r["notes"].get(EXTRA_MODELS) for runs in board["runs"].values() for r in runs)
    table = []
    for row in board["order"]:
        defense, bonafide = row
        runs = board["runs"][row]
        cells: dict[str, Any] = {}
        if ranks:
            rank = board["ranks"][row]
            cells["Rank"] = "ref" if rank is None else str(rank)
        cells.update({"Defense": md(defense), "Bonafide": data_text(bonafide, runs), "Seeds": len(runs)})
        for key, info in specs:
            interval: Interval = board["intervals"][row][key]
            if info["kind"] == "flag":
                flagged = sum((r["metrics"].get(key) or 0) > 0 for r in runs)
                count = interval.n
                cells[md(info["label"])] = f"⚠ {md(info['label'].lower())} ({flagged}/{count} seeds)" if flagged else ""
                continue
            if interval.n == 0:
                cells[md(info["label"])] = ""  # e.g. a value only another defense reports
                continue
            text = _format_interval(interval, info["kind"])
            if board["best"].get(key) == row:
                text = f"**{text}**"
            cells[md(info["label"])] = text
        if ranks and extra:
            cells["Extra models"] = str(max(int(r["notes"].get(EXTRA_MODELS, 0)) for r in runs))
        table.append(cells)
    return pd.DataFrame(table).to_markdown(index=False, disable_numparse=True)


def _cell(values: list[float], kind: str) -> str:
    return _format_interval(t_interval(values), kind)


def _format_interval(interval: Interval, kind: str) -> str:
    """mean ± half-width of the 95% t-interval: in percent with one decimal for `percent`, with
    two decimals otherwise; the mean alone for one seed."""
    if interval.n == 0 or math.isnan(interval.mean):
        return "n/a"
    scale, digits = (100, 1) if kind == "percent" else (1, 2)
    text = f"{interval.mean * scale:.{digits}f}"
    if interval.half_width is not None and not math.isnan(interval.half_width):
        text += f" ± {interval.half_width * scale:.{digits}f}"
    return text
