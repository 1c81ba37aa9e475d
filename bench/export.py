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

CSV cells that a spreadsheet would run as a formula (text starting with =, +, -, @, a tab or a
carriage return, e.g. a suite label `=HYPERLINK(...)`) get a leading apostrophe, as OWASP
advises against CSV injection; numbers are written as they are. JSON is valid RFC 8259 and
exact (shortest round-trip floats); a value a row lacks (a metric another job reports) is
null, and a non-finite number would be the string 'NaN', 'Infinity' or '-Infinity'. Every output file is written
through a temporary file and a rename, and an output that is the store (or any SQLite file) is
refused.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from bench.errors import BenchError
from bench.locations import write_text_atomically
from bench.report import json_text, select_rows

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
    if output_format == "csv":
        text = neutralise_formulas(frame).to_csv(index=False)
    else:
        records = [{k: _plain(v) for k, v in record.items()} for record in frame.to_dict(orient="records")]
        text = json_text(records)
    if output is None:
        return text
    write_text_atomically(output, text)
    return None


# OWASP's advice against CSV injection: a cell a spreadsheet would read as a formula (or a
# command, a DDE call) starts with one of these; a leading apostrophe makes it text.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def neutralise_formulas(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy of `frame` whose text cells starting with =, +, -, @, a tab or a carriage return
    get a leading apostrophe (numbers are left alone, negative ones included)."""
    out = frame.copy()
    for column in out.columns:
        if not pd.api.types.is_numeric_dtype(out[column]):
            out[column] = out[column].map(
                lambda v: "'" + v if isinstance(v, str) and v.startswith(FORMULA_STARTS) else v
            )
    return out


def _plain(value):
    """A pandas/numpy scalar as a plain Python value; NaN, which pandas puts where a row lacks a
    column (stored metrics are finite), as None."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value
