"""`bench run --executor ray` on a local Ray cluster with 2 CPUs: the same stored numbers as the
in-process run, a worker killed mid-job retried, a driver killed with SIGKILL resumed without
redoing or corrupting anything."""

import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from bench.store import ResultStore
from bench_plugins.testing import write_suite

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.third_party_plugins  # the jobs use a plugin package of the test's own

QUICK = [
    {"name": "finetune", "epochs": 1, "samples_per_epoch": 0},
    {"name": "mcr", "epochs": 1, "samples_per_epoch": 0, "path_points": 3},
]

DIES_ONCE = '''
import os
import signal
from pathlib import Path

import bench


class DiesOnce(bench.Defense):
    """Kills its own process the first time it runs (a worker lost mid-job), then defends like none."""
    name = "dies_once"
    description = "kills its worker once"

    def apply(self, model, bonafide, ctx):
        marker = Path(os.environ["DIES_ONCE_MARKER"])
        if not marker.exists():
            marker.write_text("died")
            os.kill(os.getpid(), signal.SIGKILL)
        return model


@bench.hookimpl
def register_defenses(register):
    register(DiesOnce)
'''


def environment(tmp_path, **extra):
    site = tmp_path / "site"
    if not site.exists():
        site.mkdir()
        (site / "dies_once_plugin.py").write_text(DIES_ONCE)
        info = site / "dies_once-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: dies-once\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text("[robustness_bench]\ndies_once = dies_once_plugin\n")
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(site), *sys.path]),
        "OMP_NUM_THREADS": "1",
        "RAY_AUTH_MODE": "disabled",
        "DIES_ONCE_MARKER": str(tmp_path / "died"),
        "PYTHONUNBUFFERED": "1",
        **extra,
    }


def command(suite, tmp_path, store, *extra):
    return [
        sys.executable,
        "-m",
        "bench.cli",
        "run",
        str(suite),
        "--store",
        str(tmp_path / store),
        "--cache-dir",
        str(tmp_path / f"{store}-cache"),
        "--no-progress",
        *extra,
    ]


def metrics_of(path):
    with ResultStore(path) as store:
        return {r["job_key"]: r["metrics"] for r in store.rows() if r["status"] == "ok"}


@pytest.mark.slow
def test_a_suite_on_ray_stores_what_the_in_process_run_stores_and_survives_a_lost_worker(tmp_path):
    suite = write_suite(
        tmp_path / "s.toml", seeds=[0, 1], defenses=["none", *QUICK, "dies_once"], bonafide_size=40, exclude=[]
    )
    in_process = write_suite(
        tmp_path / "in_process.toml",
        seeds=[0, 1],
        defenses=["none", *QUICK, "dies_once"],
        bonafide_size=40,
        exclude=[{"defense": "dies_once"}],
        name="s",
    )
    env = environment(tmp_path)
    local = subprocess.run(command(in_process, tmp_path, "local.db"), env=env, capture_output=True, text=True)
    assert local.returncode == 0, local.stdout + local.stderr
    on_ray = subprocess.run(
        command(suite, tmp_path, "ray.db", "--executor", "ray"), env=env, capture_output=True, text=True, timeout=600
    )
    assert on_ray.returncode == 0, on_ray.stdout + on_ray.stderr
    assert (tmp_path / "died").exists()  # a worker was killed mid-job, and its task ran again
    assert "8 succeeded, 0 failed" in on_ray.stdout
    reference, stored = metrics_of(tmp_path / "local.db"), metrics_of(tmp_path / "ray.db")
    assert len(reference) == 6 and {k: stored[k] for k in reference} == reference


@pytest.mark.slow
def test_a_killed_driver_resumes_without_redoing_or_corrupting_anything(tmp_path):
    suite = write_suite(tmp_path / "s.toml", seeds=[0, 1], defenses=["none", *QUICK], bonafide_size=40)
    env = environment(tmp_path)
    store = tmp_path / "ray.db"
    driver = subprocess.Popen(
        command(suite, tmp_path, "ray.db", "--executor", "ray"),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 400
    finished = {}
    while time.monotonic() < deadline and driver.poll() is None:
        time.sleep(1)
        if store.exists():
            with ResultStore(store) as results:
                finished = {r["job_key"]: r["finished_at"] for r in results.rows()}
            if finished:
                break
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local Ray cluster it started
    driver.wait()
    assert finished, "no job finished before the deadline"
    rerun = subprocess.run(
        command(suite, tmp_path, "ray.db", "--executor", "ray"), env=env, capture_output=True, text=True, timeout=600
    )
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    with ResultStore(store) as results:
        rows = results.rows()
    assert len(rows) == len({r["job_key"] for r in rows}) == 6
    for row in rows:
        if row["job_key"] in finished:
            assert row["finished_at"] == finished[row["job_key"]]  # never redone
    with sqlite3.connect(store) as con:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_an_unreachable_ray_address_is_one_line_and_touches_no_store(tmp_path):
    import time

    from click.testing import CliRunner

    from bench.cli import main
    from bench_plugins.testing import write_suite

    suite = write_suite(tmp_path / "s.toml", store=tmp_path / "r.db")
    start = time.perf_counter()
    result = CliRunner().invoke(
        main, ["run", str(suite), "--executor", "ray", "--ray-address", "127.0.0.1:1", "--no-progress"]
    )
    assert result.exit_code == 2 and "--ray-address 127.0.0.1:1: nothing answers there" in result.output
    assert time.perf_counter() - start < 60 and not (tmp_path / "r.db").exists()
