"""`bench report`: leaderboard markdown rebuilt from the result store alone, deterministically
(the same store gives the same bytes): one table per (dataset, model, attack), one row per
defense and bonafide size, each metric as mean +/- std over seeds, the best value in bold."""

from __future__ import annotations

import math
import re
import sqlite3
from pathlib import Path
from typing import Any

import pandas as pd

from bench.errors import BenchError
from bench.store import ResultStore

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
    """The report's tables as plain data (`bench report --format json`): per (dataset, model,
    attack) table, one row per defense and bonafide size with the seeds and, per metric, its
    info and mean, std and count over seeds; per analysis, its values likewise; failed jobs."""
    rows, analysis_rows, _ = select_rows(Path(store_path), suite, all_runs)
    ok = [r for r in rows if r["status"] == "ok"]
    tables = []
    groups: dict[tuple, list[dict]] = {}
    for r in ok:
        groups.setdefault((r["dataset_label"], r["model_label"], r["attack_label"]), []).append(r)
    for (dataset, model, attack), members in sorted(groups.items()):
        columns = _metric_columns(members)
        by_row: dict[tuple, list[dict]] = {}
        for r in members:
            by_row.setdefault((r["defense_label"], r["bonafide_size"]), []).append(r)
        table_rows = []
        for (defense, bonafide), runs in sorted(by_row.items(), key=lambda i: (i[0][0] != "none", i[0][0], -i[0][1])):
            metrics = {
                key: {**info, **_stats([r["metrics"][key] for r in runs if key in r["metrics"]])}
                for key, info in columns
            }
            metrics[TIME] = {
                "label": "Defense time (s)",
                "kind": "seconds",
                "higher_is_better": None,
                "diagnostic": False,
                **_stats([r["timings"].get("defense", 0.0) for r in runs]),
            }
            table_rows.append(
                {
                    "defense": defense,
                    "bonafide_size": bonafide,
                    "seeds": sorted(r["seed"] for r in runs),
                    "metrics": metrics,
                }
            )
        tables.append({"dataset": dataset, "model": model, "attack": attack, "rows": table_rows})
    analyses = []
    agroups: dict[tuple, list[dict]] = {}
    for r in (r for r in analysis_rows if r["status"] == "ok"):
        agroups.setdefault((r["analysis_label"], r["dataset_label"], r["model_label"]), []).append(r)
    for (analysis, dataset, model), members in sorted(agroups.items()):
        values = {
            key: {**info, **_stats([r["metrics"][key] for r in members if key in r["metrics"]])}
            for key, info in _metric_columns(members)
        }
        analyses.append(
            {
                "analysis": analysis,
                "dataset": dataset,
                "model": model,
                "seeds": sorted(r["seed"] for r in members),
                "values": values,
                "findings": _findings(members),
            }
        )
    failed = [
        {
            "key": r["job_key"],
            "error": (r["error"] or "").splitlines()[0] if r["error"] else "",
            **{
                k: r.get(k)
                for k in (
                    "dataset_label",
                    "model_label",
                    "attack_label",
                    "defense_label",
                    "analysis_label",
                    "bonafide_size",
                    "seed",
                )
                if k in r
            },
        }
        for r in rows + analysis_rows
        if r["status"] != "ok"
    ]
    suite_name = (rows + analysis_rows)[0]["suite"]
    return {"suite": suite_name, "tables": tables, "analyses": analyses, "failed": failed}


def _stats(values: list[float]) -> dict:
    series = pd.Series(values, dtype=float)
    std = series.std()
    return {
        "mean": None if series.empty else float(series.mean()),
        "std": None if len(series) < 2 or math.isnan(std) else float(std),
        "n": int(len(series)),
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
}


def md(text) -> str:
    """A string from a suite, a plugin or the store, made inert in markdown: one line, no table
    breaks, no HTML, no links or emphasis."""
    text = " ".join(str(text).split())
    return "".join(_MARKDOWN_ESCAPES.get(ch, ch) for ch in text)


def _figures(group: str, members: list[dict], plot_dir: Path, link_base: Path) -> list[str]:
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
    links = [
        f"![{p.stem}]({p.relative_to(link_base).as_posix() if p.is_relative_to(link_base) else p.as_posix()})"
        for p in written
        if p is not None
    ]
    return ["", *links] if links else []


def _analysis_sections(rows: list[dict], plot_dir: Path | None, link_base: Path | None) -> list[str]:
    """Per analysis and dataset / model: its values (mean ± std over seeds, by kind) and the
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
                    "Mean ± std": _cell([r["metrics"][key] for r in members if key in r["metrics"]], info["kind"]),
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


def _header(rows, ok, failed, store_path, jobs: bool = True) -> list[str]:
    suites = sorted({r["suite"] for r in rows})
    devices = sorted({r["device"] for r in ok})
    versions: dict[str, set] = {}
    for r in ok:
        for key in ("robustness-bench", "torch", "python"):
            versions.setdefault(key, set()).add(r["versions"].get(key, "?"))
    sources = sorted({r["notes"].get("data_source", "?") for r in ok})
    started = min(r["started_at"] for r in rows)
    finished = max(r["finished_at"] for r in rows)
    suites = [md(name) for name in suites]
    lines = [
        f"# Leaderboard: {', '.join(suites)}",
        "",
        f"- Suite: {', '.join(suites)}; {len(rows)} jobs, {len(ok)} succeeded, {len(failed)} failed "
        f"(store: {md(store_path.name)})",
        f"- Device: {md('; '.join(devices)) or 'n/a'}",
        "- Versions: " + ", ".join(f"{k} {md('/'.join(sorted(v)))}" for k, v in versions.items()),
        f"- Data: {md('; '.join(sources))}",
        f"- Run: {started[:10]} to {finished[:10]} (UTC)",
    ]
    plugins = sorted({value for r in ok for key, value in r["versions"].items() if ":" in key and value})
    if plugins:
        lines.append(f"- Plugins: {md(', '.join(plugins))}")
    if jobs:
        lines.append(
            "- Cells: mean ± std over seeds, percentages in percent; defense time in seconds (training the "
            "attacked model is shared by all defenses and not counted); the best ranked value in bold; "
            "each table's columns are explained under it."
        )
    else:
        lines.append(
            "- Analyses: values are mean ± std over seeds (percentages in percent); figures show the "
            "mean over seeds with ± std shaded."
        )
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
    """(key, info) of every metric these results report, in first-seen order; info gains the
    defaults of results stored before metrics had a kind."""
    columns: dict[str, dict] = {}
    for r in members:
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
    return [f"Attacked model, before any defense ({seeds}): " + ", ".join(parts)] if parts else []


GLOSSARY = {
    "clean_acc": "clean accuracy",
    "asr": "attack success rate",
    "ra": "robust accuracy on triggered inputs",
    "der": "defense effectiveness rating (BackdoorBench: (max(0, ASR drop) − max(0, C-Acc drop) + 1) / 2)",
    "robust_acc": "robust accuracy, the per-image worst case over every attack run (as AutoAttack counts)",
    "injection_success": "share of sneaked faults still active",
    "faults_active": "sneaked faults still active, counted (of the attack's sneak_images; 4 by default, so "
    "Inj. success moves in steps of 25 points)",
    "t_agreement": "kept images still agreeing",
    "unreliable": "a gradient-masking check beat the attack",
    "mcr_t": "the point of the path MCR returned",
    "pruned_channels": "channels fine-pruning removed",
}


_SAFE_LINK = re.compile(r"https://[A-Za-z0-9./?=_%&#:+~-]+")


def _method_links(members: list[dict]) -> list[str]:
    """Links to each method's paper and code, from the installed plugins' metadata (the `paper`
    and `code` fields; a plugin not installed is left out; anything but a plain https link is
    ignored)."""
    try:
        from bench.registry import load_plugins

        registry = load_plugins()
    except Exception:  # the report works without the plugins
        return []
    names = (
        {("attack", r["attack"]) for r in members if "attack" in r}
        | {("defense", r["defense"]) for r in members if "defense" in r}
        | {("analysis", r["analysis"]) for r in members if "analysis" in r}
    )
    parts = []
    for kind, name in sorted(names, key=lambda item: (item[0] != "attack", item[1])):
        try:
            cls = registry.get(kind, name).cls
        except Exception:
            continue
        links = [
            f"[{label}]({url})"
            for label, url in (("paper", cls.paper), ("code", cls.code))
            if url and _SAFE_LINK.fullmatch(url)
        ]
        if links:
            parts.append(f"{md(name)} ({', '.join(links)})")
    return ["", "Methods: " + "; ".join(parts) + "."] if parts else []


def headline_metric(columns: list[tuple[str, dict]]) -> str:
    """The metric a table is ranked by: robust accuracy for evasion tables, DER for backdoor
    and fault tables, else clean accuracy."""
    keys = [k for k, info in columns if not info["diagnostic"]]
    return next((k for k in ("robust_acc", "der", "clean_acc") if k in keys), keys[0] if keys else "clean_acc")


def _table(members: list[dict]) -> str:
    """The headline table (one row per defense and bonafide size, `none` first as the reference,
    the rest ranked by the headline metric) and, when the attack reports diagnostics, a second
    table of them under it; then a glossary of the columns it has."""
    columns = _metric_columns(members)
    time_info = {"label": "Defense time (s)", "higher_is_better": None, "kind": "seconds", "diagnostic": False}
    frame = pd.DataFrame(
        [
            {
                "defense": r["defense_label"],
                "bonafide": r["bonafide_size"],
                "seed": r["seed"],
                **{k: r["metrics"].get(k) for k, _ in columns},
                TIME: r["timings"].get("defense", 0.0),
            }
            for r in members
        ]
    )
    stats = frame.groupby(["defense", "bonafide"], sort=False).agg(["mean", "std", "count"])
    headline = headline_metric(columns)
    info = dict(columns).get(headline, {"higher_is_better": True})
    sign = -1 if info.get("higher_is_better", True) else 1

    def rank_key(index):
        mean = stats.loc[index][(headline, "mean")] if (headline, "mean") in stats.columns else float("nan")
        return (index[0] != "none", 0 if math.isnan(mean) else sign * mean, index[0], -index[1])

    order = sorted(stats.index, key=rank_key)
    stats = stats.loc[order]
    ranks: dict[tuple, str] = {}
    position, previous, shown = 0, None, 0
    for index in order:
        if index[0] == "none":
            ranks[index] = "ref"
            continue
        value = round(float(stats.loc[index][(headline, "mean")]), 9) if (headline, "mean") in stats.columns else None
        position += 1
        if value != previous:
            shown = position
        ranks[index], previous = str(shown), value
    shown_columns = [(k, i) for k, i in columns if not i["diagnostic"]] + [(TIME, time_info)]
    diagnostics = [(k, i) for k, i in columns if i["diagnostic"]]
    text = _render(frame, stats, shown_columns, ranks)
    if diagnostics:
        text += "\n\nDiagnostics (per attack; not ranked):\n\n" + _render(frame, stats, diagnostics)
    labels = [(i["label"], GLOSSARY.get(k)) for k, i in columns if GLOSSARY.get(k)]
    text += (
        f"\n\nRanked by {md(dict(columns).get(headline, {}).get('label', headline))} (`none` is the reference). "
        + "; ".join(f"{md(label)}: {meaning}" for label, meaning in labels)
        + "."
    )
    return text


def _render(frame: pd.DataFrame, stats: pd.DataFrame, specs: list[tuple[str, dict]], ranks: dict | None = None) -> str:
    best = {}
    for key, info in specs:
        means = stats[(key, "mean")].dropna()
        # Bold marks a best value only where "best" means something: ranked, headline numbers.
        if (
            len(means) > 1
            and info["higher_is_better"] is not None
            and not info["diagnostic"]
            and info["kind"] in ("percent", "number")
        ):
            best[key] = means.max() if info["higher_is_better"] else means.min()
    table = []
    for (defense, bonafide), row in stats.iterrows():
        cells: dict[str, Any] = {"Rank": str(ranks[(defense, bonafide)])} if ranks is not None else {}
        cells.update(
            {"Defense": md(defense), "Bonafide": bonafide if bonafide else "-", "Seeds": int(row[(TIME, "count")])}
        )
        for key, info in specs:
            mean, std, count = row[(key, "mean")], row[(key, "std")], int(row[(key, "count")])
            if info["kind"] == "flag":
                flagged = int((frame[(frame.defense == defense) & (frame.bonafide == bonafide)][key] > 0).sum())
                cells[md(info["label"])] = f"⚠ {md(info['label'].lower())} ({flagged}/{count} seeds)" if flagged else ""
                continue
            if count == 0:
                cells[md(info["label"])] = ""  # e.g. a value only another defense reports
                continue
            text = _format(mean, std, info["kind"])
            if key in best and not math.isnan(mean) and math.isclose(mean, best[key], rel_tol=0, abs_tol=1e-12):
                text = f"**{text}**"
            cells[md(info["label"])] = text
        table.append(cells)
    return pd.DataFrame(table).to_markdown(index=False, disable_numparse=True)


def _cell(values: list[float], kind: str) -> str:
    series = pd.Series(values, dtype=float)
    return _format(series.mean(), series.std(), kind)


def _format(mean: float, std: float, kind: str) -> str:
    """mean ± std: in percent with one decimal for `percent`, with two decimals otherwise."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "n/a"
    scale, digits = (100, 1) if kind == "percent" else (1, 2)
    text = f"{mean * scale:.{digits}f}"
    if std is not None and not math.isnan(std):
        text += f" ± {std * scale:.{digits}f}"
    return text
