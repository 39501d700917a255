#!/usr/bin/env bash
# One shot on a CUDA machine: every GPU number nanoforge needs, in separate steps that each keep
# what they measured even if a later step fails or the machine's per-command limit hits.
#
#   make gpu                      # or: bash bench/gpu.sh [step ...]
#   OUT=/some/dir make gpu        # logs and results are also written (teed) into $OUT as they happen
#   STEP_TIMEOUT=540 make gpu     # seconds per step (default 540: under a 10-minute command limit)
#   bash bench/gpu.sh kernels     # one step per command where the machine limits a command to 10 minutes
#
# Steps (default: all, in this order; name some to run only those):
#   env        device, driver, versions, git commit, date            -> gpu-env-<stamp>.txt
#   tests      kernel/model/engine tests on the GPU (bf16/fp16 too)   -> gpu-tests-<stamp>.txt
#   suite      the rest of the test suite on the GPU                  -> gpu-suite-<stamp>.txt
#   sanitizer  compute-sanitizer over the kernel tests (if installed) -> gpu-sanitizer-<stamp>.txt
#   kernels    bench/kernels.py, one JSON row per measurement         -> kernels-<device>.jsonl
#   generate   bench/generate.py (engine vs transformers)             -> generate-cuda.jsonl
#   scoring    bench/benchmarks.py (packed vs one forward per choice) -> benchmarks_cuda.json
#   train      bench/train_step.py (135M step, triton/torch, compile) -> train_step-cuda.jsonl
# Results go to bench/results/ (and $OUT). Every JSON row carries device, driver, versions, commit, date.
# The machine may lack pip and transformers: a step that needs a missing package says so and the
# others still run. Exit status: the number of failed steps (0 = all passed).
set -uo pipefail
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET   # real GPU kernels, not the CPU interpreter
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
STEP_TIMEOUT=${STEP_TIMEOUT:-540}
RES=bench/results
mkdir -p "$RES"
[ -n "${OUT:-}" ] && mkdir -p "$OUT"
stamp=$(date -u +%Y%m%dT%H%M%SZ)
header="date=$(date -u '+%Y-%m-%dT%H:%M:%SZ') git=$(git rev-parse HEAD 2>/dev/null || echo none) dirty_files=$(git status --porcelain 2>/dev/null | wc -l)"
failed=0

# log <name>: tee stdin into bench/results/<name> and, when set, $OUT/<name>
log() {
    if [ -n "${OUT:-}" ]; then tee -a "$RES/$1" "$OUT/$1"; else tee -a "$RES/$1"; fi
}

# run_step <step> <log name> <command...>: header line, the command under timeout, its exit status
run_step() {
    local step=$1 name=$2
    shift 2
    {
        echo "== step $step: $* ($header, timeout ${STEP_TIMEOUT}s)"
        head -n 3 "$RES/gpu-env-$stamp.txt" 2>/dev/null
    } | log "$name"
    timeout --signal=TERM --kill-after=20 "$STEP_TIMEOUT" "$@" 2>&1 | log "$name"
    local rc=${PIPESTATUS[0]}
    echo "== step $step exit $rc" | log "$name"
    [ "$rc" -ne 0 ] && failed=$((failed + 1))
    # raw JSON rows are appended as they are measured; copy the ones this step touched into $OUT
    if [ -n "${OUT:-}" ]; then
        find "$RES" -maxdepth 1 \( -name '*.jsonl' -o -name '*.json' \) -newer "$RES/gpu-env-$stamp.txt" \
            -exec cp {} "$OUT"/ \; 2>/dev/null
    fi
    return 0
}

step_env() {
    {
        echo "$header"
        echo "host: $(hostname)"
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv 2>&1 || echo "nvidia-smi failed"
        "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda, "| gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)' 2>&1
        "$PY" -c 'import triton; print("triton", triton.__version__)' 2>&1
        "$PY" -c 'import numpy; print("numpy", numpy.__version__)' 2>&1
        "$PY" -c 'import transformers; print("transformers", transformers.__version__)' 2>&1 | tail -n 1
        which compute-sanitizer 2>/dev/null || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null || echo "compute-sanitizer: not found"
        nvidia-smi 2>&1
    } 2>&1 | log "gpu-env-$stamp.txt"
}

step_tests() {  # the GPU-specific tests first (kernels, model wiring, engine + CUDA graphs)
    run_step tests "gpu-tests-$stamp.txt" "$PY" -m pytest -q -rs --durations=15 tests/test_kernels.py \
        tests/test_model.py tests/test_engine.py
}

step_suite() {  # everything else (`make test` on a CUDA machine)
    run_step suite "gpu-suite-$stamp.txt" "$PY" -m pytest -q -rs --durations=15 tests --deselect tests/test_kernels.py \
        --deselect tests/test_model.py --deselect tests/test_engine.py
}

step_sanitizer() {
    local cs
    cs=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)
    if [ -z "$cs" ]; then
        echo "compute-sanitizer not found on this machine: step skipped" | log "gpu-sanitizer-$stamp.txt"
        return 0
    fi
    # memcheck over the kernel tests, no autotuning (every candidate would be run under the sanitizer)
    run_step sanitizer "gpu-sanitizer-$stamp.txt" env NANOFORGE_AUTOTUNE=0 "$cs" --tool memcheck --error-exitcode 9 \
        --target-processes all "$PY" -m pytest -q -x tests/test_kernels.py -k "not every_autotune and not autotuned"
}

step_kernels() {
    run_step kernels "gpu-kernels-$stamp.txt" "$PY" bench/kernels.py
}

step_generate() {
    # batch 64 with 256 new tokens is the issue's shape; the bench prints the batch-1 bandwidth bound
    run_step generate "gpu-generate-$stamp.txt" "$PY" bench/generate.py --device=cuda --batches=1,8,64 --reps=3
}

step_scoring() {
    run_step scoring "gpu-scoring-$stamp.txt" "$PY" bench/benchmarks.py --device=cuda --items=64
}

step_train() {
    run_step train "gpu-train-$stamp.txt" "$PY" bench/train_step.py --preset=135m
}

steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(env tests sanitizer kernels generate scoring train suite)
[ -f "$RES/gpu-env-$stamp.txt" ] || step_env
for s in "${steps[@]}"; do
    case "$s" in
        env) ;;
        tests|suite|sanitizer|kernels|generate|scoring|train) "step_$s" ;;
        *) echo "unknown step '$s' (steps: env tests suite sanitizer kernels generate scoring train)"; failed=$((failed + 1)) ;;
    esac
done
echo "gpu.sh: ${#steps[@]} step(s), $failed failed; results in $RES${OUT:+ and $OUT}" | log "gpu-env-$stamp.txt"
exit "$failed"
