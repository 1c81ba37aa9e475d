"""The committed quickstart leaderboard is what a fresh run gives: `bench run
suites/quickstart.toml` in a new cache and store, then `bench report`, cell for cell on the
machine it was made on (the header's Device and Machine lines: thread count, CPU model and the
kernels torch uses), all but the run dates and the wall-clock defense times; elsewhere the
cells must agree within a stated tolerance, and the test says so."""

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOLERANCE = 10.0  # points (percent cells) or units (other cells), used only on another machine


def table_cells(text: str) -> dict[tuple[str, str], list[float]]:
    """(defense, bonafide) -> the leading number of every cell of its table row."""
    cells = {}
    for line in comparable(text):
        parts = [p.strip() for p in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(parts) > 3 and parts[0] not in ("Rank", "Defense") and "---" not in line:
            key = (parts[1], parts[2]) if parts[0] in ("ref",) or parts[0].isdigit() else (parts[0], parts[1])
            cells[key] = [float(m.group()) for p in parts for m in [re.match(r"\**(-?\d+(\.\d+)?)", p)] if m]
    return cells


def comparable(text: str) -> list[str]:
    """The report without what no rerun reproduces: the run dates and the wall-clock times (the
    defense-time column of every table, the attacked models' training-time line)."""
    lines, drop = [], None
    for line in text.splitlines():
        if line.startswith("- Run:"):
            continue
        if line.startswith("Attacked model training:"):
            if lines and lines[-1] == "":
                lines.pop()  # and the blank line that sets it apart
            continue
        if line.startswith("|"):
            cells = line.split("|")
            if drop is None and any(c.strip() == "Defense time (s)" for c in cells):
                drop = next(i for i, c in enumerate(cells) if c.strip() == "Defense time (s)")
            if drop is not None and len(cells) > drop:
                cells = cells[:drop] + cells[drop + 1 :]
            line = "|".join(cells)
        else:
            drop = None
        lines.append(line)
    return lines


@pytest.mark.slow
def test_a_fresh_quickstart_reproduces_the_committed_leaderboard(tmp_path):
    committed = (ROOT / "leaderboard" / "quickstart.md").read_text()
    env = {**os.environ, "BENCH_CACHE_DIR": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}
    env.pop("OMP_NUM_THREADS", None)  # the quickstart is run with torch's default threads
    store = tmp_path / "quickstart.db"
    run = [sys.executable, "-m", "bench.cli", "run", "suites/quickstart.toml", "--store", str(store), "--no-progress"]
    subprocess.run(run, cwd=ROOT, env=env, check=True, capture_output=True)
    board = tmp_path / "board" / "quickstart.md"
    report = [sys.executable, "-m", "bench.cli", "report", str(store), "-o", str(board)]
    subprocess.run(report, cwd=ROOT, env=env, check=True, capture_output=True)
    fresh = board.read_text()

    def machine(text: str) -> list[str]:  # thread count, CPU model and the kernels torch picks
        return [line for line in text.splitlines() if line.startswith(("- Device:", "- Machine:"))]

    device = machine(committed)
    if device == machine(fresh):
        assert comparable(fresh) == comparable(committed)
        return
    warnings.warn(
        f"quickstart: this machine ({machine(fresh)}) is "
        f"not the one the committed leaderboard names ({device}); comparing within {TOLERANCE} instead"
    )
    mine, theirs = table_cells(fresh), table_cells(committed)
    assert mine.keys() == theirs.keys()
    for key, values in theirs.items():
        assert len(mine[key]) == len(values) and all(abs(a - b) <= TOLERANCE for a, b in zip(mine[key], values)), key
