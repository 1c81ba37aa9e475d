"""The fault audit, kept: runs killed at successive moments resume to the same numbers, and two
runs of one suite at once share the store and the cache safely."""

import os
import signal
import sqlite3
import subprocess
import sys

import pytest

from bench.store import ResultStore
from bench_plugins.testing import write_suite

QUICK_FINETUNE = {"name": "finetune", "epochs": 2, "samples_per_epoch": 0}
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def command(suite, tmp_path, store, cache):
    return [
        sys.executable,
        "-m",
        "bench.cli",
        "run",
        str(suite),
        "--cache-dir",
        str(tmp_path / cache),
        "--store",
        str(tmp_path / store),
        "--no-progress",
    ]


def metrics_of(path):
    with ResultStore(path) as store:
        return {r["job_key"]: r["metrics"] for r in store.rows() if r["status"] == "ok"}


@pytest.fixture(scope="module")
def suite_and_reference(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("audit")
    suite = write_suite(tmp_path / "s.toml", seeds=[0, 1], defenses=["none", QUICK_FINETUNE], bonafide_size=40)
    subprocess.run(command(suite, tmp_path, "clean.db", "cache-clean"), env=ENV, check=True, capture_output=True)
    return suite, metrics_of(tmp_path / "clean.db")


@pytest.mark.slow
def test_kills_at_successive_moments_lose_nothing_and_redo_nothing(tmp_path, suite_and_reference):
    """kill -9 after 1, 2.5, 4, ... seconds (start-up, data loading, training, writing the
    cache, defending, storing), resuming each time, until a run finishes by itself."""
    suite, reference = suite_and_reference
    finished_before: dict[str, str] = {}
    kills = 0
    for delay in [1.0 + 1.5 * i for i in range(12)]:
        process = subprocess.Popen(
            command(suite, tmp_path, "killed.db", "cache"),
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            process.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
            process.wait()
            kills += 1
        if (tmp_path / "killed.db").exists():
            with ResultStore(tmp_path / "killed.db") as store:
                rows = {r["job_key"]: r["finished_at"] for r in store.rows()}
            for key, finished in finished_before.items():  # a stored job is never redone
                assert rows[key] == finished
            finished_before = rows
        if process.returncode == 0:
            break
    assert kills >= 2, "the suite ran too fast to be interrupted"
    assert process.returncode == 0
    with sqlite3.connect(tmp_path / "killed.db") as con:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert metrics_of(tmp_path / "killed.db") == reference


@pytest.mark.slow
def test_two_runs_of_one_suite_at_once_agree_with_one_run(tmp_path, suite_and_reference):
    suite, reference = suite_and_reference
    processes = [
        subprocess.Popen(
            command(suite, tmp_path, "shared.db", "shared-cache"),
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    succeeded = 0
    for process in processes:
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err
        succeeded += int(out.strip().splitlines()[-1].split(" succeeded")[0].split()[-1])
    assert metrics_of(tmp_path / "shared.db") == reference
    assert succeeded == len(reference)  # each job ran in one process only: claimed before it started
    with ResultStore(tmp_path / "shared.db") as store:
        rows = store.rows()
    trained = [r for r in rows if r["notes"]["model_cache"] == "miss"]
    assert len(trained) == 2  # one attacked model per seed, trained once; the other jobs waited and read it
    with sqlite3.connect(tmp_path / "shared.db") as con:
        assert con.execute("SELECT count(*) FROM claims").fetchone()[0] == 0
    assert not list((tmp_path / "shared-cache").rglob("*.tmp"))
