"""`bench export`: the store as one table, for pandas, spreadsheets and websites. One row per job
(or, with `analyses=True`, per analysis), with stable column names:

- identity: `suite`, `job_key`, `status`, `dataset`, `model`, `attack`, `defense` (plugin names),
  `dataset_label` ... `defense_label`, `dataset_options` ... `defense_options` (JSON), `seed`,
  `bonafide_size`;
- `metric.<key>` after the defense and `metric.<key>_before` before it, `der`;
- `time.<stage>` in seconds (data, train, evaluate_before, defense, evaluate, ...), `wall_time`;
- `device`, `version.<name>` (python, torch, robustness-bench, and each plugin's provider),
  `error` (first line), `started_at`, `finished_at`.

Analysis rows have `analysis`, `analysis_label`, `analysis_options` instead of attack, defense
and bonafide size, and `value.<key>` for their values.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from bench.errors import BenchError
from bench.report import select_rows

FORMATS = ("csv", "json", "parquet")


def export_frame(
    store_path: Path, suite: str | None = None, analyses: bool = False, all_runs: bool = False
) -> pd.DataFrame:
    rows, analysis_rows, _ = select_rows(Path(store_path), suite, all_runs)
    records = [_analysis_record(r) for r in analysis_rows] if analyses else [_job_record(r) for r in rows]
    if not records:
        raise BenchError(
            f"{store_path}: no {'analysis' if analyses else 'job'} results to export"
            + ("" if analyses else "; --analyses exports the analyses")
        )
    return pd.DataFrame(records)


def _common(r: dict) -> dict:
    return {"suite": r["suite"], "job_key": r["job_key"], "status": r["status"]}


def _tail(r: dict) -> dict:
    out = {f"time.{stage}": seconds for stage, seconds in r["timings"].items()}
    out["wall_time"] = r["wall_time"]
    out["device"] = r["device"]
    out.update({f"version.{name}": value for name, value in sorted(r["versions"].items())})
    out["error"] = (r["error"] or "").splitlines()[0] if r["error"] else ""
    out["started_at"], out["finished_at"] = r["started_at"], r["finished_at"]
    return out


def _job_record(r: dict) -> dict:
    out = _common(r)
    for kind in ("dataset", "model", "attack", "defense"):
        out[kind] = r[kind]
    for kind in ("dataset", "model", "attack", "defense"):
        out[f"{kind}_label"] = r[f"{kind}_label"]
    for kind in ("dataset", "model", "attack", "defense"):
        out[f"{kind}_options"] = _options(r["config"].get(kind))
    out["seed"], out["bonafide_size"] = r["seed"], r["bonafide_size"]
    out.update({f"metric.{key}": value for key, value in sorted(r["metrics"].items())})
    return {**out, **_tail(r)}


def _analysis_record(r: dict) -> dict:
    out = _common(r)
    for kind in ("analysis", "dataset", "model"):
        out[kind] = r[kind]
    for kind in ("analysis", "dataset", "model"):
        out[f"{kind}_label"] = r[f"{kind}_label"]
    for kind in ("analysis", "dataset", "model"):
        out[f"{kind}_options"] = _options(r["config"].get(kind))
    out["seed"] = r["seed"]
    out.update({f"value.{key}": value for key, value in sorted(r["metrics"].items())})
    return {**out, **_tail(r)}


def _options(spec) -> str:
    return json.dumps(spec.get("options", {}) if isinstance(spec, dict) else {}, sort_keys=True)


def write_export(frame: pd.DataFrame, output_format: str, output: Path | None) -> str | None:
    """Write `frame` to `output` in `output_format`, or return it as text (csv, json)."""
    if output_format == "parquet":
        if output is None:
            raise BenchError("--format parquet needs --output FILE.parquet (it is binary)")
        try:
            frame.to_parquet(output, index=False)
        except ImportError:
            raise BenchError("--format parquet needs pyarrow: pip install pyarrow") from None
        return None
    text = frame.to_csv(index=False) if output_format == "csv" else frame.to_json(orient="records", indent=2) + "\n"
    if output is None:
        return text
    output.write_text(text, encoding="utf-8")
    return None
