#!/usr/bin/env bash
# One `run` call on a lent GPU machine (see benchmarks/GPU.md): install what the machine lacks,
# run the given command, and send the result stores and RESULTS.md back through $OUT.
#     bash benchmarks/gpu_call.sh bench run suites/cifar10-badnets.toml --time-limit 8
#     bash benchmarks/gpu_call.sh python benchmarks/stage_timings.py suites/cifar10-badnets-speed.toml --device cuda
# The command's exit status is this script's (3 from `bench run --time-limit`: jobs are left).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -d .gpu/wheels ] && [ ! -d /tmp/site ]; then
    python3 -m pip install -q --no-deps --target /tmp/site .gpu/wheels/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null || exit 1
export BENCH_CIFAR10_ROOT=${BENCH_CIFAR10_ROOT:-$PWD/.gpu} BENCH_CACHE_DIR=${BENCH_CACHE_DIR:-/tmp/bench-cache}
export PYTHONUNBUFFERED=1
"$@"
status=$?
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    cp results/*.db "$OUT"/ 2>/dev/null
    cp benchmarks/RESULTS.md "$OUT"/
fi
exit $status
