"""Times every stage of a backdoor-repair suite through the real pipeline and writes the
figures to benchmarks/RESULTS.md (issue 3's speed targets are for suites/cifar10-badnets-speed.toml
on one H100).

    python benchmarks/stage_timings.py suites/cifar10-badnets-speed.toml --device cuda

The suite runs on a fresh model cache (so attacked-model training is timed) and a fresh store;
the per-stage wall times the pipeline records are then summarised: attacked-model training,
each defense, MCR's path evaluation, and the whole suite. Runs anywhere (CPU too, for a smoke
test with a small suite); only CUDA figures are comparable with the targets.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.registry import load_plugins
from bench.runner import resolve_device, run_suite
from bench.store import ResultStore
from bench.suite import load_suite


def summarise(rows: list[dict]) -> list[tuple[str, str]]:
    lines = []
    trained = [r["timings"]["train"] for r in rows if r["notes"].get("model_cache") == "miss"]
    if trained:
        lines.append(("attacked-model training (per model)", _stats(trained)))
    extra = [r["timings"]["other_attacked_models"] for r in rows if "other_attacked_models" in r["timings"]]
    if extra:
        lines.append(("second MCR endpoints, training or cache read (per job)", _stats(extra)))
    for defense in sorted({r["defense_label"] for r in rows}):
        mine = [r for r in rows if r["defense_label"] == defense]
        lines.append((f"defense `{defense}` (per job)", _stats([r["timings"]["defense"] for r in mine])))
        points = [r["timings"]["evaluate_points"] for r in mine if "evaluate_points" in r["timings"]]
        if points:
            count = len(mine[0]["series"].get("path", []))
            lines.append((f"`{defense}` path evaluation, {count} points (per job)", _stats(points)))
        lines.append(
            (f"`{defense}` evaluation after the defense (per job)", _stats([r["timings"]["evaluate"] for r in mine]))
        )
    for defense in sorted({r["defense_label"] for r in rows}):
        mine = [r["metrics"] for r in rows if r["defense_label"] == defense]
        summary = ", ".join(
            f"{k} {statistics.mean(m[k] for m in mine) * 100:.1f}%"
            for k in ("clean_acc", "asr")
            if all(k in m for m in mine)
        )
        lines.append((f"`{defense}` results (mean over seeds)", summary))
    return lines


def _stats(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f} s"
    return f"{statistics.mean(values):.2f} s (min {min(values):.2f}, max {max(values):.2f}, n={len(values)})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite", type=Path)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument(
        "--results",
        type=Path,
        default=Path(__file__).parent / "RESULTS.md",
        help="markdown file the figures are appended to",
    )
    parser.add_argument("--keep", type=Path, default=None, help="keep the store and cache in this folder")
    args = parser.parse_args()

    registry = load_plugins()
    suite = load_suite(args.suite, registry)
    device = resolve_device(args.device)
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="bench-timings-"))
    store = workdir / "timings.db"
    start = time.perf_counter()
    summary = run_suite(suite, registry, store_path=store, device=device.type, artifact_dir=workdir / "artifacts")
    total = time.perf_counter() - start
    with ResultStore(store) as results:
        rows = [r for r in results.rows() if r["status"] == "ok"]
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    )
    lines = [
        f"## Stage timings: `{args.suite}`",
        "",
        f"- Date: {datetime.date.today().isoformat()}; device: {name}; torch {torch.__version__}",
        f"- Command: `python benchmarks/stage_timings.py {args.suite} --device {args.device}`",
        f"- Jobs: {summary.total} ({summary.succeeded} succeeded, {len(summary.failed)} failed); "
        f"whole suite including data loading: {total:.1f} s",
        "",
        "| stage | wall time |",
        "|---|---|",
    ]
    lines += [f"| {stage} | {value} |" for stage, value in summarise(rows)]
    text = "\n".join(lines) + "\n"
    print(text)
    with open(args.results, "a", encoding="utf-8") as handle:
        handle.write("\n" + text)
    return 0 if not summary.failed else 1


if __name__ == "__main__":
    sys.exit(main())
