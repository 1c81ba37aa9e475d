"""The result store: one SQLite file. A job's row and its metrics are written in a single
transaction once the job has ended, so an interrupted run (Ctrl-C, kill -9, power loss) leaves
only whole results behind and resumes from them."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from pathlib import Path

from bench.errors import BenchError
from bench.locations import no_space_message
from bench.jobs import Outcome

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
CREATE TABLE IF NOT EXISTS analyses (
    job_key TEXT PRIMARY KEY,
    suite TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('ok', 'failed')),
    analysis TEXT NOT NULL, dataset TEXT NOT NULL, model TEXT NOT NULL,
    analysis_label TEXT NOT NULL, dataset_label TEXT NOT NULL, model_label TEXT NOT NULL,
    seed INTEGER NOT NULL,
    config TEXT NOT NULL,
    metrics TEXT NOT NULL,      -- JSON: name -> value
    metric_info TEXT NOT NULL,  -- JSON: name -> {label, higher_is_better, kind, diagnostic}
    series TEXT NOT NULL,
    figures TEXT NOT NULL,      -- JSON list of figure specs drawn from the series
    timings TEXT NOT NULL,
    wall_time REAL NOT NULL,
    device TEXT NOT NULL,
    versions TEXT NOT NULL,
    notes TEXT NOT NULL,
    error TEXT,
    started_at TEXT NOT NULL,
    finished_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS claims (
    job_key TEXT PRIMARY KEY,   -- a job a running process has started; gone once it is recorded
    owner TEXT NOT NULL,        -- host:pid:random, one per bench run process
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    expires_at REAL NOT NULL    -- unix time; the owner renews it while it runs
);
CREATE TABLE IF NOT EXISTS metrics (
    job_key TEXT NOT NULL REFERENCES results(job_key) ON DELETE CASCADE,
    name TEXT NOT NULL,
    value REAL,
    PRIMARY KEY (job_key, name)
);
"""


SQLITE_HEADER = b"SQLite format 3\x00"
# The schema's version, kept in `PRAGMA user_version`: 0 = a store from before versions (the
# results, suites and metrics tables), 1 = with the analyses and claims tables. An older store is
# migrated when opened for writing (the new tables are added); a newer one is refused.
SCHEMA_VERSION = 1


def check_store_path(path: Path) -> None:
    """Refuse, with one line naming the path, a store that cannot be written or is not ours:
    its folder is a file, it is a folder, it is not SQLite, it is another program's SQLite
    database, or the location is read-only. Called before any data loads."""
    path = Path(path)
    try:
        path.resolve(strict=False)
    except (RuntimeError, OSError) as exc:  # a symlink loop on the way
        raise BenchError(f"{path}: cannot reach the result store ({exc}); check the symlinks on its path") from None
    if path.is_symlink() and not path.exists():
        raise BenchError(f"{path}: the result store is a dangling symlink (to {os.readlink(path)}); fix or remove it")
    if path.is_dir():
        raise BenchError(f"{path}: the result store is a folder; name a .db file")
    existing = path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise BenchError(f"{path}: cannot create the result store: {existing} is a file, not a folder")
    if path.exists():
        describe_store(path)
        if not os.access(path, os.W_OK):
            raise BenchError(f"{path}: the result store is read-only; make it writable or pass --store")
    elif not os.access(existing, os.W_OK):
        raise BenchError(f"{path}: cannot create the result store: {existing} is not writable; pass --store")


def read_only_uri(path: Path) -> str:
    """An SQLite URI that reads `path` without changing anything beside it: without a
    write-ahead log no writer is active and `immutable` creates no -wal or -shm files; with one,
    a read-only connection sees the writer's commits."""
    wal = path.with_name(path.name + "-wal").exists()
    return f"file:{path}?{'mode=ro' if wal else 'immutable=1'}"


def describe_store(path: Path) -> None:
    """Raise a `BenchError` unless `path` is empty or a robustness-bench store."""
    with open(path, "rb") as handle:
        header = handle.read(len(SQLITE_HEADER))
    if not header:
        return  # an empty file becomes a store
    if header != SQLITE_HEADER:
        raise BenchError(f"{path}: not an SQLite file, so not a result store")
    try:
        db = sqlite3.connect(read_only_uri(path), uri=True)
        try:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            db.close()
    except sqlite3.DatabaseError as exc:
        raise BenchError(f"{path}: unreadable SQLite file ({exc})") from None
    if tables and not {"results", "metrics"} <= tables:
        raise BenchError(
            f"{path}: an SQLite database that is not a robustness-bench store (its tables: "
            f"{', '.join(sorted(tables))}); choose another store file"
        )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _enable_wal(db: sqlite3.Connection, patience: float = 60.0) -> None:
    """Switch to write-ahead logging. Two processes opening a new store at once can find it locked
    while the other switches (SQLite answers that pragma without waiting for the busy timeout):
    retry for up to `patience` seconds."""
    deadline = time.monotonic() + patience
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class ResultStore:
    """The store; `read_only` opens an existing one for reports, never changing it."""

    def __init__(self, path: str | Path, read_only: bool = False):
        self.path = Path(path)
        if read_only:
            if not self.path.is_file():
                raise BenchError(f"{self.path}: no such result store; run `bench run SUITE.toml` first")
            describe_store(self.path)
            self._db = sqlite3.connect(read_only_uri(self.path), uri=True, isolation_level=None)
            self._check_version()
            return
        check_store_path(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None, timeout=60)
        _enable_wal(self._db)
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._check_version()
        # Creates what an older store lacks and changes nothing else, in one transaction: a second
        # process opening the same new store sees no tables or all of them, never some.
        self._db.executescript(f"BEGIN IMMEDIATE;\n{SCHEMA}\nPRAGMA user_version = {SCHEMA_VERSION};\nCOMMIT;")

    def close(self) -> None:
        self._db.close()

    def _check_version(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            self._db.close()
            raise BenchError(
                f"{self.path}: written by a newer robustness-bench (store schema {version}; this one "
                f"reads up to {SCHEMA_VERSION}); upgrade robustness-bench"
            )

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def record_suite(self, suite: str, suite_file: str, job_keys: list[str], when: str) -> None:
        """The jobs a run of `suite` is meant to produce, so a report can say what is missing."""
        self._db.execute(
            "INSERT OR REPLACE INTO suites (suite, suite_file, job_keys, updated_at) VALUES (?, ?, ?, ?)",
            (suite, suite_file, json.dumps(job_keys), when),
        )

    def planned_jobs(self) -> dict[str, tuple[str, list[str]]]:
        """suite -> (suite file, job keys) as recorded by the suite's latest run."""
        return {
            suite: (suite_file, json.loads(keys))
            for suite, suite_file, keys in self._db.execute("SELECT suite, suite_file, job_keys FROM suites")
        }

    def finished_keys(self) -> set[str]:
        """Keys of jobs that ended successfully (failed jobs are run again)."""
        keys = {row[0] for row in self._db.execute("SELECT job_key FROM results WHERE status = 'ok'")}
        if self._has_table("analyses"):
            keys |= {row[0] for row in self._db.execute("SELECT job_key FROM analyses WHERE status = 'ok'")}
        return keys

    def claim(self, job_key: str, owner: str, lease_seconds: float) -> bool:
        """Claim a job before running it, so that another `bench run` on this store does not run
        it too. Refused (False) when the job is already finished, or claimed by another owner whose
        lease has not run out and whose process is alive (on this host, checked by pid)."""
        host, pid = owner.split(":")[0], int(owner.split(":")[1])
        now = time.time()
        self._db.execute("BEGIN IMMEDIATE")
        try:
            if job_key in self._finished(job_key):
                self._db.execute("COMMIT")
                return False
            row = self._db.execute(
                "SELECT owner, host, pid, expires_at FROM claims WHERE job_key = ?", (job_key,)
            ).fetchone()
            if row is not None and row[0] != owner and row[3] > now and not (row[1] == host and not _alive(row[2])):
                self._db.execute("COMMIT")
                return False
            self._db.execute(
                "INSERT OR REPLACE INTO claims (job_key, owner, host, pid, expires_at) VALUES (?, ?, ?, ?, ?)",
                (job_key, owner, host, pid, now + lease_seconds),
            )
            self._db.execute("COMMIT")
            return True
        except BaseException as exc:
            self._rollback()
            if isinstance(exc, sqlite3.OperationalError) and "full" in str(exc):
                raise BenchError(no_space_message(self.path, "writing the result store")) from None
            raise

    def release_claims(self, owner: str) -> None:
        self._db.execute("DELETE FROM claims WHERE owner = ?", (owner,))

    def _finished(self, job_key: str) -> set[str]:
        found = {
            r[0]
            for r in self._db.execute("SELECT job_key FROM results WHERE job_key = ? AND status = 'ok'", (job_key,))
        }
        if self._has_table("analyses"):
            found |= {
                r[0]
                for r in self._db.execute(
                    "SELECT job_key FROM analyses WHERE job_key = ? AND status = 'ok'", (job_key,)
                )
            }
        return found

    def failed_keys(self) -> set[str]:
        """Keys of jobs whose stored result is a failure."""
        keys = {row[0] for row in self._db.execute("SELECT job_key FROM results WHERE status = 'failed'")}
        if self._has_table("analyses"):
            keys |= {row[0] for row in self._db.execute("SELECT job_key FROM analyses WHERE status = 'failed'")}
        return keys

    def _has_table(self, name: str) -> bool:
        return (
            self._db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone()
            is not None
        )

    def record(self, job, outcome: Outcome) -> None:
        """Store a finished job's outcome in its kind's table (`job.table`), in one transaction."""
        if job.table == "analyses":
            self._record_analysis(job, outcome)
            return
        row = {
            "job_key": job.key,
            "suite": job.suite,
            "status": outcome.status,
            "dataset": job.dataset.name,
            "model": job.model.name,
            "attack": job.attack.name,
            "defense": job.defense.name,
            "dataset_label": job.dataset.label,
            "model_label": job.model.label,
            "attack_label": job.attack.label,
            "defense_label": job.defense.label,
            "seed": job.seed,
            "bonafide_size": job.bonafide_size,
            "config": json.dumps(job.config(), sort_keys=True),
            "timings": json.dumps(outcome.timings),
            "wall_time": sum(outcome.timings.values()),
            "device": outcome.device,
            "versions": json.dumps(outcome.versions, sort_keys=True),
            "metric_info": json.dumps(outcome.metric_info),  # keeps the column order
            "series": json.dumps(outcome.series),
            "notes": json.dumps(outcome.notes, sort_keys=True),
            "error": outcome.error,
            "started_at": outcome.started_at,
            "finished_at": outcome.finished_at,
        }
        with self._recording(job.key, "results", row):
            self._db.execute("DELETE FROM metrics WHERE job_key = ?", (job.key,))
            self._db.executemany(
                "INSERT INTO metrics (job_key, name, value) VALUES (?, ?, ?)",
                [(job.key, k, float(v)) for k, v in outcome.metrics.items()],
            )

    def _record_analysis(self, job, outcome: Outcome) -> None:
        row = {
            "job_key": job.key,
            "suite": job.suite,
            "status": outcome.status,
            "analysis": job.analysis.name,
            "dataset": job.dataset.name,
            "model": job.model.name,
            "analysis_label": job.analysis.label,
            "dataset_label": job.dataset.label,
            "model_label": job.model.label,
            "seed": job.seed,
            "config": json.dumps(job.config(), sort_keys=True),
            "metrics": json.dumps(outcome.metrics),
            "metric_info": json.dumps(outcome.metric_info),
            "series": json.dumps(outcome.series),
            "figures": json.dumps(outcome.notes.get("figures", [])),
            "timings": json.dumps(outcome.timings),
            "wall_time": sum(outcome.timings.values()),
            "device": outcome.device,
            "versions": json.dumps(outcome.versions, sort_keys=True),
            "notes": json.dumps({k: v for k, v in outcome.notes.items() if k != "figures"}, sort_keys=True),
            "error": outcome.error,
            "started_at": outcome.started_at,
            "finished_at": outcome.finished_at,
        }
        with self._recording(job.key, "analyses", row):
            pass  # nothing besides the row

    def _rollback(self) -> None:
        """Roll back the open transaction, if SQLite has not already (it does on a full disk;
        a second ROLLBACK would then hide the real error)."""
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")

    @contextlib.contextmanager
    def _recording(self, job_key: str, table: str, row: dict):
        """One transaction: the job's claim released, `row` written to `table`, and whatever the
        body adds; all of it or, on any error, none."""
        columns = ", ".join(row)
        placeholders = ", ".join(f":{k}" for k in row)
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.execute("DELETE FROM claims WHERE job_key = ?", (job_key,))
            self._db.execute(f"INSERT OR REPLACE INTO {table} ({columns}) VALUES ({placeholders})", row)
            yield
            self._db.execute("COMMIT")
        except BaseException as exc:
            self._rollback()
            if isinstance(exc, sqlite3.OperationalError) and "full" in str(exc):
                raise BenchError(no_space_message(self.path, "writing the result store")) from None
            raise

    def analysis_rows(self, suite: str | None = None) -> list[dict]:
        """All analysis results (of one suite, if given), JSON columns decoded."""
        if not self._has_table("analyses"):
            return []
        self._db.row_factory = sqlite3.Row
        try:
            query = "SELECT * FROM analyses" + (" WHERE suite = ?" if suite else "") + " ORDER BY job_key"
            results = [dict(r) for r in self._db.execute(query, (suite,) if suite else ())]
        finally:
            self._db.row_factory = None
        keys = ("config", "metrics", "metric_info", "series", "figures", "timings", "versions", "notes")
        return [self._decoded(r, keys, "analysis") for r in results]

    def add_metric_descriptions(self, describe, methods=None) -> int:
        """Fill in what `describe(row, key)` says of each stored metric (a dict of fields, e.g.
        its doc line and headline flag) where the stored description lacks those fields, and the
        `methods` note (`methods(row)`: the plugins' links) where a row has none; values are
        never touched. One transaction; returns how many rows changed (`bench migrate`)."""
        changed = 0
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for table, kind in (("results", "job"), ("analyses", "analysis")):
                if not self._has_table(table):
                    continue
                self._db.row_factory = sqlite3.Row
                rows = [dict(r) for r in self._db.execute(f"SELECT * FROM {table}")]
                self._db.row_factory = None
                for row in rows:
                    info, notes = json.loads(row["metric_info"]), json.loads(row["notes"])
                    updated = {key: {**(describe(row, key) or {}), **fields} for key, fields in info.items()}
                    if "methods" not in notes and methods is not None and row["status"] == "ok":
                        notes = {**notes, "methods": methods(row)}
                    if updated != info or notes != json.loads(row["notes"]):
                        self._db.execute(
                            f"UPDATE {table} SET metric_info = ?, notes = ? WHERE job_key = ?",
                            (json.dumps(updated), json.dumps(notes), row["job_key"]),
                        )
                        changed += 1
            self._db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        return changed

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
        return [
            self._decoded(r, ("config", "timings", "versions", "metric_info", "series", "notes"), "job")
            for r in results
        ]

    def _decoded(self, row: dict, keys: tuple[str, ...], what: str) -> dict:
        """`row` with its JSON columns `keys` decoded; a column that is not JSON is an error
        naming the store, the column and the row."""
        for key in keys:
            try:
                row[key] = json.loads(row[key])
            except (TypeError, ValueError):
                raise BenchError(
                    f"{self.path}: the {key} of {what} {row['job_key']} is not valid JSON; the store "
                    "was changed outside robustness-bench"
                ) from None
        return row
