"""The result store: one SQLite file. A job's row and its metrics are written in a single
transaction once the job has ended, so an interrupted run (Ctrl-C, kill -9, power loss) leaves
only whole results behind and resumes from them."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    job_key TEXT PRIMARY KEY,
    suite TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('ok', 'failed')),
    dataset TEXT NOT NULL, model TEXT NOT NULL, attack TEXT NOT NULL, defense TEXT NOT NULL,
    dataset_label TEXT NOT NULL, model_label TEXT NOT NULL,
    attack_label TEXT NOT NULL, defense_label TEXT NOT NULL,
    seed INTEGER NOT NULL,
    bonafide_size INTEGER NOT NULL,
    config TEXT NOT NULL,
    timings TEXT NOT NULL,
    wall_time REAL NOT NULL,
    device TEXT NOT NULL,
    versions TEXT NOT NULL,
    metric_info TEXT NOT NULL,
    series TEXT NOT NULL,
    notes TEXT NOT NULL,
    error TEXT,
    started_at TEXT NOT NULL,
    finished_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS suites (
    suite TEXT PRIMARY KEY,
    suite_file TEXT NOT NULL,
    job_keys TEXT NOT NULL,  -- JSON list: every job of the suite's latest run, finished or not
    updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS metrics (
    job_key TEXT NOT NULL REFERENCES results(job_key) ON DELETE CASCADE,
    name TEXT NOT NULL,
    value REAL,
    PRIMARY KEY (job_key, name)
);
"""


@dataclass
class Outcome:
    """What running one job produced (or how it failed)."""

    status: str
    metrics: dict[str, float] = field(default_factory=dict)
    metric_info: dict[str, dict] = field(default_factory=dict)  # key -> {label, higher_is_better}
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    series: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # e.g. metrics along a path
    notes: dict[str, Any] = field(default_factory=dict)  # cache hits, data source, ...
    device: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    started_at: str = ""
    finished_at: str = ""


class ResultStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        self._db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def record_suite(self, suite: str, suite_file: str, job_keys: list[str], when: str) -> None:
        """The jobs a run of `suite` is meant to produce, so a report can say what is missing."""
        self._db.execute("INSERT OR REPLACE INTO suites (suite, suite_file, job_keys, updated_at) VALUES (?, ?, ?, ?)",
                         (suite, suite_file, json.dumps(job_keys), when))

    def planned_jobs(self) -> dict[str, tuple[str, list[str]]]:
        """suite -> (suite file, job keys) as recorded by the suite's latest run."""
        return {suite: (suite_file, json.loads(keys))
                for suite, suite_file, keys in self._db.execute("SELECT suite, suite_file, job_keys FROM suites")}

    def finished_keys(self) -> set[str]:
        """Keys of jobs that ended successfully (failed jobs are run again)."""
        return {row[0] for row in self._db.execute("SELECT job_key FROM results WHERE status = 'ok'")}

    def record(self, job, outcome: Outcome) -> None:
        row = {
            "job_key": job.key, "suite": job.suite, "status": outcome.status,
            "dataset": job.dataset.name, "model": job.model.name,
            "attack": job.attack.name, "defense": job.defense.name,
            "dataset_label": job.dataset.label, "model_label": job.model.label,
            "attack_label": job.attack.label, "defense_label": job.defense.label,
            "seed": job.seed, "bonafide_size": job.bonafide_size,
            "config": json.dumps(job.config(), sort_keys=True),
            "timings": json.dumps(outcome.timings), "wall_time": sum(outcome.timings.values()),
            "device": outcome.device, "versions": json.dumps(outcome.versions, sort_keys=True),
            "metric_info": json.dumps(outcome.metric_info),  # keeps the column order
            "series": json.dumps(outcome.series), "notes": json.dumps(outcome.notes, sort_keys=True),
            "error": outcome.error, "started_at": outcome.started_at, "finished_at": outcome.finished_at,
        }
        columns = ", ".join(row)
        placeholders = ", ".join(f":{k}" for k in row)
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.execute("DELETE FROM metrics WHERE job_key = ?", (job.key,))
            self._db.execute(f"INSERT OR REPLACE INTO results ({columns}) VALUES ({placeholders})", row)
            self._db.executemany("INSERT INTO metrics (job_key, name, value) VALUES (?, ?, ?)",
                                 [(job.key, k, float(v)) for k, v in outcome.metrics.items()])
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def rows(self, suite: str | None = None) -> list[dict]:
        """All results (of one suite, if given), each with its metrics under 'metrics'."""
        self._db.row_factory = sqlite3.Row
        try:
            query = "SELECT * FROM results" + (" WHERE suite = ?" if suite else "") + " ORDER BY job_key"
            results = [dict(r) for r in self._db.execute(query, (suite,) if suite else ())]
            metrics: dict[str, dict[str, float]] = {}
            for r in self._db.execute("SELECT job_key, name, value FROM metrics"):
                metrics.setdefault(r["job_key"], {})[r["name"]] = r["value"]
        finally:
            self._db.row_factory = None
        for r in results:
            r["metrics"] = metrics.get(r["job_key"], {})
            for key in ("config", "timings", "versions", "metric_info", "series", "notes"):
                r[key] = json.loads(r[key])
        return results
