#!/usr/bin/env bash
# On a CUDA machine, from anywhere: kernel tests on the GPU (bf16/fp16 included),
# then the kernel benchmark. Everything printed is also kept under bench/results/
# (and copied into $OUT when that is set, e.g. by a remote runner).
#
#   bash bench/gpu.sh
#
# Exit status: non-zero if the tests or the benchmark failed.
set -uo pipefail
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET   # real GPU kernels, not the CPU interpreter
PY=${PYTHON:-python3}

mkdir -p bench/results
stamp=$(date -u +%Y%m%dT%H%M%SZ)
env_log=bench/results/gpu-env-$stamp.txt
test_log=bench/results/gpu-tests-$stamp.txt
bench_log=bench/results/gpu-bench-$stamp.txt

{
    echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    echo "host: $(hostname)"
    echo "git: $(git rev-parse HEAD 2>/dev/null || echo none) $(git status --porcelain 2>/dev/null | wc -l) changed files"
    nvidia-smi || echo "nvidia-smi failed"
    "$PY" -c 'import sys, torch, triton; print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda, "| triton", triton.__version__, "| gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)'
} 2>&1 | tee "$env_log"

echo "== $PY -m pytest -q tests/test_kernels.py" | tee "$test_log"
"$PY" -m pytest -q -rs tests/test_kernels.py 2>&1 | tee -a "$test_log"
test_rc=${PIPESTATUS[0]}

echo "== $PY bench/kernels.py" | tee "$bench_log"
"$PY" bench/kernels.py 2>&1 | tee -a "$bench_log"
bench_rc=${PIPESTATUS[0]}

echo "tests exit $test_rc, bench exit $bench_rc" | tee -a "$bench_log"
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    cp "$env_log" "$test_log" "$bench_log" "$OUT"/
    # only the JSON this run wrote (newer than the env log), not older devices' results
    find bench/results -maxdepth 1 -name 'kernels-*.json' -newer "$env_log" -exec cp {} "$OUT"/ \;
fi
[ "$test_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
