"""What `bench report` and `bench export` write: never over the store or another database,
never through a symlink, never half a file, never a formula a spreadsheet would run, and only
valid, exact JSON."""

import json
import math
import sqlite3

import pytest
from click.testing import CliRunner

from bench.cli import main
from bench.export import neutralise_formulas
from bench.jobs import Outcome
from bench.report import json_text
from bench.store import ResultStore
from test_report import INFO, fake_job, fill


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_export_refuses_to_overwrite_the_store_or_any_database(tmp_path):
    fill(tmp_path / "s.db")
    before = (tmp_path / "s.db").read_bytes()
    result = invoke("export", tmp_path / "s.db", "-o", tmp_path / "s.db")
    assert result.exit_code == 2 and "which this command reads" in result.output
    assert (tmp_path / "s.db").read_bytes() == before
    fill(tmp_path / "other.db")
    result = invoke("report", tmp_path / "s.db", "--format", "json", "-o", tmp_path / "other.db")
    assert result.exit_code == 2 and "SQLite database" in result.output
    with sqlite3.connect(tmp_path / "other.db") as connection:  # still a store
        assert connection.execute("SELECT count(*) FROM results").fetchone()[0] == 5


def test_an_output_symlink_is_replaced_not_followed(tmp_path):
    fill(tmp_path / "s.db")
    outside = tmp_path / "outside.md"
    outside.write_text("someone else's file\n")
    board = tmp_path / "board"
    board.mkdir()
    (board / "s.md").symlink_to(outside)
    result = invoke("report", tmp_path / "s.db", "-o", board / "s.md", "--no-plots")
    assert result.exit_code == 0, result.output
    assert outside.read_text() == "someone else's file\n"
    assert not (board / "s.md").is_symlink() and "# Leaderboard" in (board / "s.md").read_text()


def test_a_failed_write_leaves_the_previous_file_whole(tmp_path, monkeypatch):
    fill(tmp_path / "s.db")
    out = tmp_path / "e.csv"
    assert invoke("export", tmp_path / "s.db", "-o", out).exit_code == 0
    previous = out.read_text()

    def full_disk(handle, *args, **kwargs):
        raise OSError(28, "No space left on device")

    import bench.locations

    real = bench.locations.write_atomically

    def failing(path, write, **kwargs):
        return real(path, lambda handle: (handle.write(b"half a fi"), full_disk(handle)), **kwargs)

    monkeypatch.setattr(bench.locations, "write_atomically", failing)
    result = invoke("export", tmp_path / "s.db", "-o", out)
    assert result.exit_code == 2 and "No space left on device" in result.output
    assert out.read_text() == previous and not list(tmp_path.glob("*.tmp"))


def test_csv_cells_that_would_run_as_formulas_are_neutralised(tmp_path):
    import pandas as pd

    frame = pd.DataFrame(
        {
            "label": ['=HYPERLINK("http://x")', "+cmd|' /C calc'!A0", "@SUM(1)", "-2+3", "\tx", "plain", "a=b"],
            "value": [-1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0],
        }
    )
    out = neutralise_formulas(frame)
    assert list(out["label"]) == [
        '\'=HYPERLINK("http://x")',
        "'+cmd|' /C calc'!A0",
        "'@SUM(1)",
        "'-2+3",
        "'\tx",
        "plain",
        "a=b",
    ]
    assert list(out["value"]) == [-1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]  # numbers untouched


def test_json_outputs_are_valid_exact_and_say_how_non_finite_values_are_written(tmp_path):
    text = json_text({"a": float("nan"), "b": [float("inf"), -math.inf, 0.1 + 0.2]})
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"invalid JSON token {c}"))
    assert data == {"a": "NaN", "b": ["Infinity", "-Infinity", 0.30000000000000004]}
    fill(tmp_path / "s.db")
    value = 0.123456789012345678
    with ResultStore(tmp_path / "s.db") as store:
        store.record(
            fake_job("exact", 0, 100),
            Outcome(
                status="ok",
                metrics={"clean_acc": value, "asr": 0.5},
                metric_info=INFO,
                timings={"defense": 1.0},
                device="cpu",
                started_at="2026-11-23T10:00:00",
                finished_at="2026-11-23T10:01:00",
            ),
        )
    exported = json.loads(invoke("export", tmp_path / "s.db", "--format", "json").output)
    (row,) = [r for r in exported if r["defense"] == "exact"]
    assert row["metric.clean_acc"] == value and row["metric.der"] is None  # exact; a missing value is null
    report = json.loads(invoke("report", tmp_path / "s.db", "--format", "json").output)
    assert "NaN" in report["encoding"] and "complete" in report and "jobs_without_result" in report


def test_symlink_loops_and_dangling_stores_are_one_line_errors(tmp_path):
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    (tmp_path / "dangling.db").symlink_to(tmp_path / "nowhere" / "x.db")
    from bench.errors import BenchError
    from bench.store import check_store_path

    with pytest.raises(BenchError, match="dangling symlink"):
        check_store_path(tmp_path / "dangling.db")
    with pytest.raises(BenchError, match="check the symlinks on its path"):
        check_store_path(tmp_path / "loop1" / "r.db")
    suite = tmp_path / "s.toml"
    from bench_plugins.testing import write_suite

    write_suite(suite)
    result = invoke("run", suite, "--cache-dir", tmp_path / "loop1", "--dry-run")
    assert result.exit_code == 2 and "cannot use this cache folder" in result.output


def test_a_full_disk_is_named_not_hidden_behind_a_rollback_or_a_torch_assertion(tmp_path, monkeypatch):
    import errno

    from bench import artifact_cache
    from bench.errors import BenchError

    def full(path, write, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(artifact_cache, "write_atomically", full)
    with pytest.raises(BenchError, match=r"no space left on device while writing the cache entry .* MB free"):
        artifact_cache.write_entry(tmp_path / "e.pt", "models", "k", {"x": 1})

    class FullDisk:  # SQLite rolls back by itself on a full disk: a second ROLLBACK must not hide it
        in_transaction = False

        def execute(self, sql, *args):
            if sql.startswith("INSERT"):
                raise sqlite3.OperationalError("database or disk is full")
            if sql == "ROLLBACK":
                raise sqlite3.OperationalError("cannot rollback - no transaction is active")

    fill(tmp_path / "s.db")
    store = ResultStore(tmp_path / "s.db")
    real, store._db = store._db, FullDisk()
    with pytest.raises(BenchError, match="no space left on device while writing the result store"):
        store.record(fake_job("x", 0, 100), Outcome(status="failed", error="e", started_at="t", finished_at="t"))
    store._db = real
    store.close()
