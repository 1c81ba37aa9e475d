"""benchmarks/gpu_study.sh (the CIFAR-10 backdoor study in one GPU call) and its suite."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.suite import load_suite

ROOT = Path(__file__).resolve().parents[2]
SUITE = ROOT / "suites" / "cifar10-backdoor-gpu.toml"
SHARED_TARBALL = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
DEFENSES = {"none", "finetune", "fine_pruning", "mcr", "weight_average_finetune"}
ATTACKS = {"badnets", "blended", "error_injection"}


def test_the_suite_is_the_standard_table_at_one_common_budget(registry):
    suite = load_suite(SUITE, registry)
    assert suite.name == "cifar10-backdoor-gpu"
    assert suite.settings.seeds == [0, 1, 2]
    assert suite.settings.bonafide_size == [2500, 500]
    assert suite.settings.bonafide_source.value == "test_half"
    assert [s.name for s in suite.plugins["datasets"]] == ["cifar10"]
    assert [s.name for s in suite.plugins["models"]] == ["preact_resnet18"]
    assert {s.name for s in suite.plugins["attacks"]} == ATTACKS
    assert {s.name for s in suite.plugins["defenses"]} == DEFENSES
    repairs = [s for s in suite.plugins["defenses"] if s.name != "none"]
    budgets = {s.options["epochs"] for s in repairs}
    assert len(budgets) == 1, "finetune, fine_pruning, mcr and its control share one budget"
    (epochs,) = budgets
    assert epochs < 100  # below the reference: the labels must say so
    assert all(s.label == f"{s.name}(epochs={epochs})" for s in repairs)


def cifar10_root() -> str | None:
    """$BENCH_CIFAR10_ROOT as the user gave it, else None. tests/conftest.py removes it from
    os.environ (so that no other test reads the user's data), so it is read from the environment
    this process started with."""
    if os.environ.get("BENCH_CIFAR10_ROOT"):
        return os.environ["BENCH_CIFAR10_ROOT"]
    try:
        initial = Path("/proc/self/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for entry in initial:
        key, _, value = entry.partition(b"=")
        if key == b"BENCH_CIFAR10_ROOT" and value:
            return os.fsdecode(value)
    return None


def defense_rows(markdown: str) -> set[str]:
    """The defense names of every leaderboard table row ('mcr(epochs=1)' -> 'mcr')."""
    names = set()
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) > 2 and cells[0] not in ("Rank", "") and not cells[0].startswith(":"):
            names.add(cells[1].split("(")[0])
    return names


@pytest.mark.slow  # about a minute on 2 idle cores: 6 slices, each its own `bench run`
def test_smoke_runs_the_whole_pipeline_into_out(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    env.pop("BENCH_CIFAR10_ROOT", None)
    root = cifar10_root()
    if root is not None:
        env["BENCH_CIFAR10_ROOT"] = root
    elif not SHARED_TARBALL.is_file():
        pytest.skip(f"no CIFAR-10 data: neither {SHARED_TARBALL} nor $BENCH_CIFAR10_ROOT")
    done = subprocess.run(
        ["bash", "benchmarks/gpu_study.sh", "--smoke"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    out = tmp_path / "out"
    files = sorted(p.name for p in out.iterdir())
    assert all(p.is_file() for p in out.iterdir()) and len(files) <= 8, files  # flat, as `run` sends back
    assert "cifar10-backdoor-gpu-smoke.db" in files and "RESULTS.md" in files, files
    report = (out / "cifar10-backdoor-gpu-smoke.md").read_text(encoding="utf-8")
    assert DEFENSES <= defense_rows(report), report
    for attack in ATTACKS:  # every slice ran, and the plan is the whole suite's: nothing missing
        assert f"/ {attack}\n" in report, attack
    assert "27 jobs, 27 succeeded, 0 failed" in report and "Incomplete" not in report
    assert re.search(r"^\[gpu_study +\d+s\] slice badnets/100: bench run --time-limit [\d.]+$", log, re.M), log
