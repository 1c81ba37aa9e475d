#!/usr/bin/env bash
# The CIFAR-10 backdoor study (suites/cifar10-backdoor-gpu.toml) as ONE `run` call on a lent GPU
# machine (benchmarks/GPU.md), and the same pipeline on the CPU in one to two minutes with --smoke:
#     bash benchmarks/gpu_study.sh            # on the GPU machine ($OUT is set by `run`)
#     bash benchmarks/gpu_study.sh --smoke    # anywhere: a tiny generated suite on the CPU
# Steps, each announced with the seconds elapsed:
#   1. install the project (the GPU machine has its dependencies, not the project);
#   2. run the suite as slices, most important first, each a `bench run --time-limit` on the same
#      store: the time left decides how far it gets, so the least important jobs are the ones cut
#      (a later call carrying the store back resumes with the next slice);
#   3. record the whole suite as the store's plan, so the report names what is still missing;
#   4. render the report and copy it, the store, this log and benchmarks/RESULTS.md flat into $OUT;
#   5. run benchmarks/stage_timings.py only if the time left allows it.
# Exit status: 0 every job of the suite has a result; 3 jobs are left for a later call; 1 some job
# failed; 2 the set-up failed (no CUDA device, no data, install or suite error).
set -euo pipefail
cd "$(dirname "$0")/.."

SMOKE=0
case "${1:-}" in
    "") ;;
    --smoke) SMOKE=1 ;;
    -h | --help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "usage: bash benchmarks/gpu_study.sh [--smoke]" >&2; exit 2 ;;
esac

PYTHON=${PYTHON:-python3}
MAIN_SUITE=suites/cifar10-backdoor-gpu.toml
# Slices in the order they run, as attack:N (N: the Nth of the suite's bonafide sizes). Running
# last means dropped first: Blended, then the second size (500), then error injection; BadNets
# with 2500 images runs first. This is the study's order of importance, not the cheapest one:
# two slices of one attack in one call would share its trained models, but at the suite's budget
# one call holds one slice anyway (see the suite's header).
SLICES="badnets:1 error_injection:1 badnets:2 error_injection:2 blended:1 blended:2"

if [ "$SMOKE" = 1 ]; then
    # Generous: the smoke takes one to two minutes; its time limits are passed, never reached.
    BUDGET_S=${GPU_STUDY_BUDGET_S:-300}
    RESERVE_S=20 # plan, report and copies after the last slice
    STARTUP_S=5  # python and torch start of a `bench run`, before its own clock starts
    MIN_SLICE_S=10
    DEVICE=cpu
else
    # `run` is called with timeout_s 560; the script keeps to 540 s (9 minutes).
    BUDGET_S=${GPU_STUDY_BUDGET_S:-540}
    RESERVE_S=30  # plan (~10 s, imports torch), report (~10 s), copies
    STARTUP_S=10  # python, torch and CUDA start of a `bench run`, before its own clock starts
    MIN_SLICE_S=60 # a slice's first job always starts (bench's rule) and may train a model (~40 s)
    DEVICE=cuda    # not auto: without a GPU, bench stops at once instead of training for hours
fi
# stage_timings.py runs suites/cifar10-badnets-speed.toml on a fresh cache at the reference
# budget: 6 models (~240 s) + 9 repair jobs of 100 x 10,000 samples at ~6,400 samples/s (~1,400 s):
# more than a 10-minute command allows, so it never runs in this call; the check keeps the step
# honest should the budget or the suite change.
STAGE_TIMINGS_NEED_S=1700

say() { printf '[gpu_study %4ds] %s\n' "$SECONDS" "$*"; }
left_s() { echo $((BUDGET_S - SECONDS)); }

OUT=${OUT:-$(mktemp -d -t gpu-study-out.XXXXXX)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

# The Python helper: `smoke MAIN OUT_FILE STORE` writes the tiny suite; `slices SUITE DIR SLICES...`
# writes one suite file per slice (the same tables, so the same job keys, less the other attacks
# and sizes) and prints "name", "store" and "slice" lines for the shell. Only tomllib: no torch.
helper() {
    "$PYTHON" - "$@" <<'PY'
import json
import re
import sys
import tomllib
from pathlib import Path


def toml_value(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(value)  # strings, ints, floats: JSON's spelling is valid TOML


def write_toml(data, path):
    lines = []
    for table in ("suite", "training"):
        if data.get(table):
            lines += [f"[{table}]", *(f"{k} = {toml_value(v)}" for k, v in data[table].items()), ""]
    for table in ("datasets", "models", "attacks", "defenses", "exclude", "analyses"):
        for entry in data.get(table, []):
            lines += [f"[[{table}]]", *(f"{k} = {toml_value(v)}" for k, v in entry.items()), ""]
    Path(path).write_text("\n".join(lines), encoding="utf-8")


command, args = sys.argv[1], sys.argv[2:]
data = tomllib.loads(Path(args[0]).read_text(encoding="utf-8"))
if command == "smoke":  # same attacks and defenses; everything else CPU-sized
    data["suite"].update(
        name=data["suite"]["name"] + "-smoke",
        seeds=[0],
        bonafide_size=[100, 50],
        device="cpu",
        eval_batch_size=500,
        store=args[2],
    )
    data["training"] = {"epochs": 1, "batch_size": 64}
    data["datasets"] = [{**d, "train_images": 1000, "test_images": 600} for d in data["datasets"]]
    data["models"] = [{"name": "small_cnn", "width": 8}]
    for defense in data["defenses"]:
        if "epochs" in defense:
            defense.update(epochs=1, samples_per_epoch=256)
            if "label" in defense:
                defense["label"] = re.sub(r"epochs=\d+", "epochs=1", defense["label"])
    write_toml(data, args[1])
elif command == "slices":
    suite_path, folder, slices = Path(args[0]), Path(args[1]), args[2:]
    if data.get("exclude") or data.get("analyses"):
        sys.exit(f"{suite_path}: slicing needs a suite without [[exclude]] and [[analyses]]")
    sizes = data["suite"]["bonafide_size"]
    sizes = sizes if isinstance(sizes, list) else [sizes]
    wanted = {(a["name"], size) for a in data["attacks"] for size in sizes}
    chosen = [(attack, sizes[int(n) - 1]) for attack, n in (s.split(":") for s in slices)]
    if sorted(chosen) != sorted(wanted):  # a suite edit must not drop jobs silently
        sys.exit(f"{suite_path}: the slices {chosen} do not cover its attacks x sizes {sorted(wanted)} once each")
    store = Path(data["suite"].get("store") or f"results/{data['suite']['name']}.db")
    print("name", data["suite"]["name"])
    print("store", store if store.is_absolute() else (suite_path.parent / store).resolve())
    for index, (attack, size) in enumerate(chosen, 1):
        part = {**data, "suite": {k: v for k, v in data["suite"].items() if k != "store"}}
        part["suite"]["bonafide_size"] = [size]
        part["attacks"] = [a for a in data["attacks"] if a["name"] == attack]
        path = folder / f"slice-{index}-{attack}-{size}.toml"
        write_toml(part, path)
        print("slice", path, f"{attack}/{size}")
PY
}

# The fallback when pip cannot build the project: `--no-build-isolation` needs setuptools >= 77
# in the machine's Python, which a bare Python 3.12 may lack, and there is no network to fetch it.
# Does by hand what an editable install does: the packages linked into a folder on PYTHONPATH,
# and the metadata whose entry points `bench` discovers its plugins by.
install_by_hand() {
    "$PYTHON" - "$1" <<'PY'
import sys
import tomllib
from pathlib import Path

site = Path(sys.argv[1])
pyproject = tomllib.loads(Path("pyproject.toml").read_text(encoding="utf-8"))
project = pyproject["project"]
info = site / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
info.mkdir(parents=True)
(info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
groups = {"console_scripts": project.get("scripts", {}), **project.get("entry-points", {})}
text = "".join(f"[{g}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()) + "\n" for g, eps in groups.items())
(info / "entry_points.txt").write_text(text)
for package, folder in pyproject["tool"]["setuptools"]["package-dir"].items():
    (site / package).symlink_to(Path(folder).resolve())
PY
}

# Records the whole suite's jobs as the store's plan (a slice's run recorded only its own), so
# `bench report` warns about the jobs still missing and names the suite file that runs them.
# Exit status 0 when every job has a result, 3 when some are left.
record_plan() {
    "$PYTHON" - "$@" <<'PY'
import datetime
import sys

from bench.expansion import expand
from bench.registry import load_plugins
from bench.store import ResultStore
from bench.suite import load_suite

suite_file, store_path = sys.argv[1:3]
suite = load_suite(suite_file, load_plugins())
keys = [job.key for job in expand(suite)]
now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
with ResultStore(store_path) as store:
    store.record_suite(suite.name, suite_file, keys, now)
    done = len(store.finished_keys() & set(keys))
print(f"{done} of the {len(keys)} jobs of {suite.name} have a result; {len(keys) - done} left")
sys.exit(0 if done == len(keys) else 3)
PY
}

# The store runs in WAL mode: SQLite's backup API writes one consistent file, whatever is still
# in the -wal file.
copy_store() {
    "$PYTHON" - "$@" <<'PY'
import sqlite3
import sys

source, target = sqlite3.connect(sys.argv[1]), sqlite3.connect(sys.argv[2])
source.backup(target)
target.close()
source.close()
PY
}

main() {
    # Slice suites here; with --smoke also the cache, whose 60,000 extracted JPEGs took 3 minutes
    # to delete from this machine's disk (mounted with online discard) and no time from memory.
    if [ "$SMOKE" = 1 ] && [ -d /dev/shm ] && [ -w /dev/shm ]; then
        WORK=$(mktemp -d -p /dev/shm gpu-study.XXXXXX)
    else
        WORK=$(mktemp -d -t gpu-study.XXXXXX)
    fi
    trap 'rm -rf "$WORK"' EXIT
    say "mode: $([ "$SMOKE" = 1 ] && echo "smoke (CPU, tiny suite)" || echo GPU); budget ${BUDGET_S} s; output: $OUT"

    # 1. The project. The GPU machine is bare: install it as gpu_call.sh does. --smoke runs where
    # it is normally installed already (this checkout's virtualenv): no reinstall then.
    if [ "$SMOKE" = 1 ] && "$PYTHON" -c 'import bench, bench_plugins' 2>/dev/null; then
        say "project already installed for $PYTHON"
    else
        say "installing the project (pip install --no-deps --no-build-isolation -e .)"
        if ! "$PYTHON" -m pip install -q --no-deps --no-build-isolation -e . >"$WORK/pip.log" 2>&1; then
            tail -n 3 "$WORK/pip.log"
            say "pip could not install the project; linking it onto PYTHONPATH instead"
            install_by_hand "$WORK/site" || return 2
            export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
        fi
    fi
    "$PYTHON" -c 'import bench, bench_plugins' || {
        say "the project cannot be imported"
        return 2
    }

    if [ "$SMOKE" = 1 ]; then
        default_root=../shared/data/cifar10-jpeg.tar.gz
        export BENCH_CACHE_DIR="$WORK/cache" # never the user's cache: the smoke decodes afresh
        smoke_store="$WORK/$(basename "$MAIN_SUITE" .toml)-smoke.db"
    else
        default_root=$PWD/.gpu # benchmarks/GPU.md: the tarball travels in .gpu/ (carry)
        export BENCH_CACHE_DIR=${BENCH_CACHE_DIR:-/tmp/bench-cache}
    fi
    export BENCH_CIFAR10_ROOT=${BENCH_CIFAR10_ROOT:-$default_root}
    if [ ! -e "$BENCH_CIFAR10_ROOT" ]; then
        say "no CIFAR-10 data at $BENCH_CIFAR10_ROOT (set BENCH_CIFAR10_ROOT; see benchmarks/GPU.md)"
        return 2
    fi
    export PYTHONUNBUFFERED=1
    say "data: $BENCH_CIFAR10_ROOT; cache: $BENCH_CACHE_DIR"

    suite=$MAIN_SUITE
    if [ "$SMOKE" = 1 ]; then
        suite="$WORK/$(basename "$MAIN_SUITE" .toml)-smoke.toml"
        helper smoke "$MAIN_SUITE" "$suite" "$smoke_store"
        say "generated the smoke suite $suite"
    fi
    mkdir -p "$WORK/slices"
    helper slices "$suite" "$WORK/slices" $SLICES >"$WORK/slices.txt" || return 2
    name=$(awk '$1 == "name" { print $2 }' "$WORK/slices.txt")
    store=$(awk '$1 == "store" { print $2 }' "$WORK/slices.txt")
    mkdir -p "$(dirname "$store")"
    say "suite $name -> store $store"

    # 2. The slices, most important first. A slice starts only with MIN_SLICE_S left (its first
    # job always runs); its --time-limit is the time left less the reserve for steps 3-4, so
    # bench starts no job that would likely end after that.
    failed=0
    while read -r kind file what; do
        [ "$kind" = slice ] || continue
        budget=$(($(left_s) - RESERVE_S - STARTUP_S))
        if [ "$budget" -lt "$MIN_SLICE_S" ]; then
            say "slice $what not started: ${budget} s left of the budget (it needs ${MIN_SLICE_S} s to start)"
            break
        fi
        minutes=$(awk -v s="$budget" 'BEGIN { printf "%.2f", s / 60 }')
        say "slice $what: bench run --time-limit $minutes"
        rc=0
        "$PYTHON" -m bench run "$file" --store "$store" --device "$DEVICE" --no-progress --time-limit "$minutes" ||
            rc=$?
        say "slice $what ended with status $rc"
        case $rc in
            0) ;;
            1) failed=1 ;;                       # failed jobs are stored; the other slices still run
            3) say "time limit reached"; break ;; # no time for the less important slices
            *) return 2 ;;                        # bad input or interrupted: nothing more to do
        esac
    done <"$WORK/slices.txt"

    # 3.-4. The plan, the report, the copies.
    status=0
    if [ -f "$store" ]; then
        say "recording the whole suite as the store's plan"
        record_plan "$suite" "$store" || status=$?
        case $status in 0 | 3) ;; *) return 2 ;; esac
        say "report -> $OUT/$name.md"
        "$PYTHON" -m bench report "$store" --no-plots -o "$OUT/$name.md" || say "bench report failed"
        copy_store "$store" "$OUT/$name.db"
        say "store -> $OUT/$name.db"
    else
        say "no store: no job ran"
        status=3
    fi

    # 5. The stage timings benchmark, only when its whole run fits in the time left.
    if [ "$SMOKE" = 1 ]; then
        say "stage_timings.py skipped in --smoke (its figures are meant for the GPU)"
    elif [ "$(left_s)" -ge "$STAGE_TIMINGS_NEED_S" ]; then
        say "benchmarks/stage_timings.py suites/cifar10-badnets-speed.toml --device cuda"
        "$PYTHON" benchmarks/stage_timings.py suites/cifar10-badnets-speed.toml --device cuda ||
            say "stage_timings.py failed"
    else
        say "stage_timings.py skipped: $(left_s) s left, it needs about ${STAGE_TIMINGS_NEED_S} s"
    fi
    cp benchmarks/RESULTS.md "$OUT/"
    say "done; in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
    [ "$failed" = 0 ] || return 1
    return "$status"
}

# Not `main || ...`: that would switch off `set -e` inside main. With pipefail, main's status is
# the script's.
main 2>&1 | tee "$OUT/gpu_study.log"
