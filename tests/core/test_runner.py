import os
import signal
import sqlite3
import subprocess
import sys
import time

import importlib.metadata


import torch

from click.testing import CliRunner

import bench
import bench.cli
from bench.registry import ENTRY_POINT_GROUP, build_registry

from bench.cli import main
from bench.store import ResultStore
from bench_plugins.testing import run_suite_file, write_suite

# Fine-tuning's default is the MCR reference's budget (a million samples); a test needs a few passes.
QUICK_FINETUNE = {"name": "finetune", "epochs": 2, "samples_per_epoch": 0}


def test_attacked_model_is_trained_once_for_all_defenses(tmp_path):
    suite = write_suite(tmp_path / "s.toml", defenses=["none", QUICK_FINETUNE, {**QUICK_FINETUNE, "epochs": 1}])
    rows = run_suite_file(suite, tmp_path)
    assert [r["status"] for r in rows] == ["ok"] * 3
    assert sorted(r["notes"]["model_cache"] for r in rows) == ["hit", "hit", "miss"]
    assert len(list((tmp_path / "artifacts" / "models").glob("*.pt"))) == 1
    # a later run of another suite with the same attacked model reuses it too
    other = write_suite(tmp_path / "other.toml", defenses=[{**QUICK_FINETUNE, "lr": 0.02}])
    (row,) = [r for r in run_suite_file(other, tmp_path) if r["suite"] == "other"]
    assert row["notes"]["model_cache"] == "hit"


def test_rerun_skips_finished_jobs(tmp_path):
    suite = write_suite(tmp_path / "s.toml", defenses=["none", QUICK_FINETUNE])
    first = {r["job_key"]: r["finished_at"] for r in run_suite_file(suite, tmp_path)}
    time.sleep(1.1)
    second = {r["job_key"]: r["finished_at"] for r in run_suite_file(suite, tmp_path)}
    assert first == second


class Exploding(bench.Defense):
    name = "exploding"
    description = "fails on purpose"

    def apply(self, model, bonafide, ctx):
        raise RuntimeError("this defense always fails")


def test_failing_job_is_recorded_and_the_rest_goes_on(tmp_path, monkeypatch):
    registry = build_registry(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
    registry.register(Exploding, plugin="test", package="tests")
    monkeypatch.setattr(bench.cli, "load_plugins", lambda: registry)
    suite = write_suite(tmp_path / "s.toml", defenses=["none", "exploding"], store=tmp_path / "r.db")
    result = CliRunner().invoke(main, ["run", str(suite), "--cache-dir", str(tmp_path / "c"), "--no-progress"])
    assert result.exit_code == 1, result.output  # some job failed
    assert "1 succeeded, 1 failed" in result.output
    assert (
        "FAILED digits / small_cnn(width=8) / badnets(trigger_size=2) / exploding bonafide=50 seed=0: "
        "RuntimeError: this defense always fails" in result.output
    )
    with ResultStore(tmp_path / "r.db") as store:
        rows = {r["defense"]: r for r in store.rows()}
    assert rows["none"]["status"] == "ok"
    assert rows["exploding"]["status"] == "failed"
    assert "this defense always fails" in rows["exploding"]["error"]
    assert "Traceback" in rows["exploding"]["error"]  # the full trace is kept for the author
    # the console names the plugin's own line, and the report prints the whole trace on demand
    assert f"at {__file__}:" in result.output and "(in apply)" in result.output
    shown = CliRunner().invoke(main, ["report", str(tmp_path / "r.db"), "--failures"])
    assert shown.exit_code == 0 and "=== digits / small_cnn(width=8)" in shown.output
    assert "Traceback" in shown.output and "this defense always fails" in shown.output


def _ok_rows(db):
    try:
        with sqlite3.connect(db) as con:
            return con.execute("SELECT count(*) FROM results WHERE status = 'ok'").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def test_resume_after_kill_minus_nine_matches_an_uninterrupted_run(tmp_path):
    suite = write_suite(tmp_path / "s.toml", seeds=[0, 1, 2], defenses=["none", QUICK_FINETUNE], bonafide_size=40)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [
        sys.executable,
        "-m",
        "bench.cli",
        "run",
        str(suite),
        "--cache-dir",
        str(tmp_path / "cache-a"),
        "--store",
        str(tmp_path / "killed.db"),
        "--no-progress",
    ]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while _ok_rows(tmp_path / "killed.db") < 2 and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    with ResultStore(tmp_path / "killed.db") as store:
        before = {r["job_key"]: r for r in store.rows()}
    assert 2 <= len(before) < 6

    subprocess.run(command, env=env, check=True, capture_output=True)
    with sqlite3.connect(tmp_path / "killed.db") as con:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    with ResultStore(tmp_path / "killed.db") as store:
        resumed = {r["job_key"]: r for r in store.rows()}
    assert len(resumed) == 6
    for key, row in before.items():  # finished jobs were not redone
        assert resumed[key]["finished_at"] == row["finished_at"]

    clean = [
        sys.executable,
        "-m",
        "bench.cli",
        "run",
        str(suite),
        "--cache-dir",
        str(tmp_path / "cache-b"),
        "--store",
        str(tmp_path / "clean.db"),
        "--no-progress",
    ]
    subprocess.run(clean, env=env, check=True, capture_output=True)
    with ResultStore(tmp_path / "clean.db") as store:
        uninterrupted = {r["job_key"]: r["metrics"] for r in store.rows()}
    assert {k: r["metrics"] for k, r in resumed.items()} == uninterrupted


def test_ctrl_c_stops_cleanly_and_says_how_to_resume(tmp_path):
    suite = write_suite(tmp_path / "s.toml", seeds=[0, 1, 2], defenses=["none", QUICK_FINETUNE], bonafide_size=40)
    command = [
        sys.executable,
        "-m",
        "bench.cli",
        "run",
        str(suite),
        "--cache-dir",
        str(tmp_path / "c"),
        "--store",
        str(tmp_path / "r.db"),
        "--no-progress",
    ]
    process = subprocess.Popen(
        command, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 120
    while _ok_rows(tmp_path / "r.db") < 1 and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "run the same command again to resume" in stderr
    assert "Traceback" not in stderr
    with sqlite3.connect(tmp_path / "r.db") as con:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_time_limit_starts_no_job_past_it_and_a_rerun_finishes(tmp_path):
    suite = write_suite(tmp_path / "s.toml", seeds=[0, 1, 2], store=tmp_path / "r.db")
    command = ["run", str(suite), "--cache-dir", str(tmp_path / "c"), "--no-progress"]
    stopped = CliRunner().invoke(main, command + ["--time-limit", "0.0001"])
    assert stopped.exit_code == 3, stopped.output
    assert "jobs not started: 2" in stopped.output
    assert "1 succeeded, 0 failed, 0 already done, 2 left for the next run" in stopped.output
    assert _ok_rows(tmp_path / "r.db") == 1
    report = CliRunner().invoke(main, ["report", str(tmp_path / "r.db")])
    assert (
        f"⚠ Incomplete: 2 of the 3 jobs of suite s have no result yet; `bench run {suite}` runs them" in report.output
    )
    resumed = CliRunner().invoke(main, command + ["--time-limit", "60"])
    assert resumed.exit_code == 0, resumed.output
    assert "2 succeeded, 0 failed, 1 already done; results in" in resumed.output
    assert "Incomplete" not in CliRunner().invoke(main, ["report", str(tmp_path / "r.db")]).output


def test_time_limit_must_be_positive(tmp_path):
    suite = write_suite(tmp_path / "s.toml", store=tmp_path / "r.db")
    result = CliRunner().invoke(main, ["run", str(suite), "--time-limit", "0"])
    assert result.exit_code == 2
    assert "--time-limit" in result.output and not (tmp_path / "r.db").exists()


class Branchy(bench.Model):
    name = "branchy"
    description = "data-dependent control flow, which torch.fx cannot trace"

    def build(self, shape):
        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = torch.nn.Linear(shape.channels * shape.height * shape.width, shape.num_classes)

            def forward(self, x):
                x = torch.relu(x.flatten(1))
                return self.fc(x) if x.sum() > 0 else -self.fc(x)

        return Net()


def test_a_model_sap_cannot_trace_is_refused_before_the_run(tmp_path, monkeypatch):
    registry = build_registry(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
    registry.register(Branchy, plugin="test", package="tests")
    monkeypatch.setattr(bench.cli, "load_plugins", lambda: registry)
    suite = write_suite(tmp_path / "s.toml", models=["branchy"], defenses=["sap"], store=tmp_path / "r.db")
    result = CliRunner().invoke(main, ["run", str(suite), "--cache-dir", str(tmp_path / "c")])
    assert result.exit_code == 2, result.output
    assert "model 'branchy', defense 'sap': sap: cannot trace the model with torch.fx" in result.output
    assert not (tmp_path / "r.db").exists()


class CountingAttack(bench.Attack):
    name = "counting"
    description = "a test-time attack that counts its evaluations"
    metrics = (bench.Metric("robust_acc", "Robust acc", higher_is_better=True),)
    calls = 0

    def evaluate(self, model, test, ctx, state):
        CountingAttack.calls += 1
        return {"robust_acc": 0.5}


def test_the_none_defense_is_not_attacked_a_second_time(tmp_path, monkeypatch):
    registry = build_registry(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
    registry.register(CountingAttack, plugin="test", package="tests")
    monkeypatch.setattr(bench.cli, "load_plugins", lambda: registry)
    for defense, evaluations in (("none", 1), ("finetune", 2)):  # a fresh cache each: nothing measured yet
        CountingAttack.calls = 0
        suite = write_suite(
            tmp_path / f"{defense}.toml",
            attacks=["counting"],
            defenses=[QUICK_FINETUNE if defense == "finetune" else defense],
            store=tmp_path / f"{defense}.db",
        )
        result = CliRunner().invoke(main, ["run", str(suite), "--cache-dir", str(tmp_path / defense), "--no-progress"])
        assert result.exit_code == 0, result.output
        assert CountingAttack.calls == evaluations, defense


class NotAModel(bench.Defense):
    name = "not_a_model"
    description = "returns a string instead of a model"

    def apply(self, model, bonafide, ctx):
        return "oops"


class UndeclaredValue(bench.Defense):
    name = "undeclared_value"
    description = "reports a value its metrics do not declare"

    def apply(self, model, bonafide, ctx):
        return bench.Defended(model, values={"threshold": 0.3})


class ChosenValue(bench.Defense):
    name = "chosen_value"
    description = "reports a declared value and a series"
    metrics = (bench.Metric("threshold", "Threshold", higher_is_better=None, kind=bench.MetricKind.NUMBER),)

    def apply(self, model, bonafide, ctx):
        return bench.Defended(model, series={"steps": [{"step": 1, "acc": 0.5}]}, values={"threshold": 0.3})


def test_what_a_defense_returns_is_checked_and_its_values_are_stored(tmp_path, monkeypatch):
    registry = build_registry(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
    for cls in (NotAModel, UndeclaredValue, ChosenValue):
        registry.register(cls, plugin="test", package="tests")
    monkeypatch.setattr(bench.cli, "load_plugins", lambda: registry)
    suite = write_suite(
        tmp_path / "s.toml", defenses=["not_a_model", "undeclared_value", "chosen_value"], store=tmp_path / "r.db"
    )
    result = CliRunner().invoke(main, ["run", str(suite), "--cache-dir", str(tmp_path / "c"), "--no-progress"])
    assert result.exit_code == 1, result.output  # two failed jobs, the suite went on
    with ResultStore(tmp_path / "r.db") as store:
        rows = {r["defense"]: r for r in store.rows()}
    assert "not_a_model: apply() returned a str" in rows["not_a_model"]["error"]
    assert "value 'threshold', which its `metrics` do not declare" in rows["undeclared_value"]["error"]
    ok = rows["chosen_value"]
    assert ok["status"] == "ok" and ok["metrics"]["threshold"] == 0.3
    assert ok["metric_info"]["threshold"]["kind"] == "number" and ok["series"]["steps"] == [{"step": 1, "acc": 0.5}]


def test_a_claimed_job_is_left_to_its_owner_until_it_dies_or_its_lease_ends(tmp_path):
    import os
    import socket
    import subprocess
    import sys

    from bench.store import ResultStore

    host = socket.gethostname()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()  # a pid that has exited
    me, other_live = f"{host}:{os.getpid()}:a", f"{host}:{os.getppid()}:b"
    with ResultStore(tmp_path / "r.db") as store:
        assert store.claim("job1", other_live, lease_seconds=60)
        assert not store.claim("job1", me, lease_seconds=60)  # alive and within its lease
        assert store.claim("job2", f"{host}:{dead}:c", lease_seconds=60)
        assert store.claim("job2", me, lease_seconds=60)  # its owner died: taken over at once
        assert store.claim("job3", f"elsewhere:{os.getppid()}:d", lease_seconds=-1)
        assert store.claim("job3", me, lease_seconds=60)  # another host's lease ran out
        store.release_claims(me)
        assert store.claim("job2", other_live, lease_seconds=60)


def test_rerun_failed_runs_only_the_failed_jobs(tmp_path, monkeypatch):
    registry = build_registry(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
    registry.register(Exploding, plugin="test", package="tests")
    monkeypatch.setattr(bench.cli, "load_plugins", lambda: registry)
    store = tmp_path / "r.db"
    first = write_suite(tmp_path / "s.toml", defenses=["none", "exploding"], store=store)
    args = ["--cache-dir", str(tmp_path / "c"), "--no-progress"]
    assert CliRunner().invoke(main, ["run", str(first), *args]).exit_code == 1
    # the suite grows a job that never ran; --rerun failed leaves it alone and retries the failure
    grown = write_suite(tmp_path / "s.toml", defenses=["none", "exploding", "finetune"], store=store)
    result = CliRunner().invoke(main, ["run", str(grown), *args, "--rerun", "failed"])
    assert result.exit_code == 1 and "1 failed to run" in result.output, result.output
    assert "0 succeeded, 1 failed" in result.output
    with ResultStore(store) as results:
        assert sorted(r["defense"] for r in results.rows()) == ["exploding", "none"]


def test_one_cache_root_holds_models_and_can_be_inspected_and_cleared(tmp_path):
    suite = write_suite(tmp_path / "s.toml", store=tmp_path / "r.db")
    root = tmp_path / "cache"
    assert CliRunner().invoke(main, ["run", str(suite), "--cache-dir", str(root), "--no-progress"]).exit_code == 0
    assert list((root / "artifacts" / "models").glob("*.pt"))  # --cache-dir is the root, models under artifacts/
    info = CliRunner().invoke(main, ["cache", "info", "--cache-dir", str(root)])
    assert info.exit_code == 0 and "artifacts/models" in info.output, info.output
    cleared = CliRunner().invoke(main, ["cache", "clear", "--cache-dir", str(root), "--yes"])
    assert cleared.exit_code == 0 and not (root / "artifacts").exists()
    with ResultStore(tmp_path / "r.db") as store:  # results are never touched
        assert store.rows()


def test_relative_paths_in_a_suite_are_relative_to_its_folder(tmp_path, registry, monkeypatch):
    from bench.expansion import expand
    from bench.suite import load_suite

    folder = tmp_path / "project" / "suites"
    folder.mkdir(parents=True)
    suite_file = write_suite(
        folder / "s.toml", datasets=[{"name": "cifar10", "root": "../data"}], store="../results/s.db"
    )
    monkeypatch.chdir(tmp_path)  # somewhere else entirely
    suite = load_suite(suite_file, registry)
    assert suite.store_path == tmp_path / "project" / "results" / "s.db"
    (job, *_) = expand(suite)
    assert job.dataset.options["root"] == str(tmp_path / "project" / "data")


def test_a_defense_that_needs_a_second_model_is_charged_for_training_it(tmp_path):
    # MCR's control asks for a second attacked model (seed + 1): training it is part of the
    # defense's cost, also when an earlier job trained it and this one reads it from the cache
    rows = {}
    for epochs in (1, 2):
        defense = {"name": "weight_average_finetune", "epochs": epochs, "samples_per_epoch": 0}
        suite = write_suite(tmp_path / f"s{epochs}.toml", defenses=[defense], store=tmp_path / "r.db")
        (rows[epochs],) = [r for r in run_suite_file(suite, tmp_path) if r["suite"] == f"s{epochs}"]
    assert all(r["status"] == "ok" for r in rows.values())
    trained, cached = rows[1]["notes"]["extra_models_train_seconds"], rows[2]["notes"]["extra_models_train_seconds"]
    assert trained > 0 and cached == trained  # the stored training time, not the time to read it back
    assert all(r["timings"]["defense"] > trained for r in rows.values())
    assert all(r["notes"]["extra_models_trained"] == 1 for r in rows.values())


def test_cache_clear_removes_only_what_bench_wrote_and_says_what_first(tmp_path):
    # --cache-dir pointed at a project folder that has its own artifacts/ and .npz files
    project = tmp_path / "proj"
    (project / "artifacts").mkdir(parents=True)
    (project / "artifacts" / "mine.txt").write_text("the user's")
    (project / "data.npz").write_bytes(b"the user's")
    cleared = CliRunner().invoke(main, ["cache", "clear", "--cache-dir", str(project), "--datasets", "--yes"])
    assert cleared.exit_code == 0 and "nothing to clear" in cleared.output
    assert (project / "artifacts" / "mine.txt").exists() and (project / "data.npz").exists()
    # what bench writes there is recorded, listed before removal, and removed
    from bench.artifacts import save_arrays_atomically
    import numpy as np

    save_arrays_atomically(project / "digits-decoded.npz", {"x": np.zeros(3)})
    asked = CliRunner().invoke(main, ["cache", "clear", "--cache-dir", str(project), "--datasets"], input="n\n")
    assert "will remove:" in asked.output and "digits-decoded.npz" in asked.output and "data.npz" not in asked.output
    assert (project / "digits-decoded.npz").exists()  # declined
    cleared = CliRunner().invoke(main, ["cache", "clear", "--cache-dir", str(project), "--datasets", "--yes"])
    assert cleared.exit_code == 0 and not (project / "digits-decoded.npz").exists()
    assert (project / "data.npz").exists() and (project / "artifacts" / "mine.txt").exists()


class CacheRootRecorder(bench.Defense):
    """Records where the run says its cache is, from the context and from the toolkit."""

    name = "cache_root_recorder"
    description = "returns the model unchanged; records the cache folders it is shown"
    seen: list = []

    def apply(self, model, bonafide, ctx):
        CacheRootRecorder.seen.append((ctx.cache_dir, bench.toolkit.cache_dir()))
        return model


def test_two_runs_in_one_process_keep_their_cache_folders_apart(tmp_path):
    """`cache_root` reaches the plugins of its own run only: no environment variable is rewritten,
    and the next run (or the code after it) sees its own folder again."""
    import bench.toolkit
    from bench.runner import run_suite
    from bench.suite import load_suite

    registry = build_registry(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
    registry.register(CacheRootRecorder, plugin="test", package="tests")
    before = os.environ.get("BENCH_CACHE_DIR")
    suite = write_suite(tmp_path / "s.toml", defenses=["cache_root_recorder"])
    CacheRootRecorder.seen.clear()
    for name in ("a", "b"):
        run_suite(
            load_suite(suite, registry),
            registry,
            store_path=tmp_path / f"{name}.db",
            cache_root=tmp_path / name,
            show_progress=False,
            echo=lambda _: None,
        )
        assert len(list((tmp_path / name / "artifacts" / "models").glob("*.pt"))) == 1
    assert CacheRootRecorder.seen == [(tmp_path / "a", tmp_path / "a"), (tmp_path / "b", tmp_path / "b")]
    assert os.environ.get("BENCH_CACHE_DIR") == before
    assert bench.toolkit.cache_dir() == bench.toolkit.cache_dir().__class__(before)


def test_deterministic_kernels_are_set_for_a_run_and_restored_after_it(monkeypatch):
    from bench.artifacts import cuda_determinism

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    before_algorithms = torch.are_deterministic_algorithms_enabled()
    with cuda_determinism(True):
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) == before
    assert torch.are_deterministic_algorithms_enabled() == before_algorithms
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
