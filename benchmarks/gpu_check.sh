#!/usr/bin/env bash
# make gpu-check: everything a CUDA machine without network can tell, in one command (< 10 min).
#
#   bash benchmarks/gpu_check.sh                      # on the GPU machine, from anywhere
#   GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check.sh  # print the stages, run nothing (any machine)
#
# Stages, each under `timeout` so a hung stage cannot eat the budget, each logged to its own file:
#   env        nvidia-smi (queries only), python/torch/triton/CUDA/compiler versions, git commit
#   build      the extension with the CUDA kernels for the present GPU:
#              MITKERNELS_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=<its capability>
#              pip install --no-build-isolation --no-deps --no-index -e .  (nothing is downloaded;
#              falls back on `setup.py build_ext --inplace` when pip cannot). Skipped when an
#              extension with CUDA kernels already loads (one built elsewhere for this python and
#              torch, copied in: device time is scarce).
#   kernels    python -m benchmarks.gpu_kernels --sweep: each backend's kernels against the copy
#              bandwidth, the cross-entropy anchors, a tile sweep of the large-C Triton kernels
#   tests      pytest -m gpu tests/ (the CUDA tests)
#   bench      python -m benchmarks.bench_mit_loss --full --device cuda (GPU_CHECK_BENCH_ARGS)
#   fuzz       benchmarks/sanitizer_fuzz.py without a sanitizer (also warms the Triton cache)
#   sanitizer  the same fuzz under compute-sanitizer --tool memcheck, without the caching allocator
# Everything lands in benchmarks/results/gpu-<gpu>-<time>/ (or under $GPU_CHECK_RESULTS_ROOT).
# It uses the python, torch and triton already installed, and never resets or reconfigures the GPU
# (nvidia-smi is only queried).
#
# Environment:
#   GPU_CHECK_DRY_RUN=1      print the plan and exit 0
#   GPU_CHECK_BUDGET_S=540   the whole script's wall-clock budget in seconds
#   GPU_CHECK_SKIP=a,b       stages to skip (env, build, kernels, tests, bench, fuzz, sanitizer)
#   GPU_CHECK_KERNELS_ARGS   arguments for benchmarks.gpu_kernels (default: --sweep)
#   GPU_CHECK_RESULTS_ROOT   parent folder of the results folder (default benchmarks/results)
#   GPU_CHECK_FUZZ_CASES=16  fuzz cases per backend
#   GPU_CHECK_BENCH_ARGS     extra arguments for the benchmark (e.g. "--no-compile")
#   GPU_CHECK_KERNELS_CAP_S  the kernels stage's cap in seconds (default 150)
#   GPU_CHECK_TARBALL        also pack the results folder into this .tar.gz (for a machine that
#                            hands back only a few files)
#   PYTHON                   the interpreter (default: python, else python3)
set -u -o pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 2

DRY="${GPU_CHECK_DRY_RUN:-0}"
BUDGET="${GPU_CHECK_BUDGET_S:-540}"
SKIP=",${GPU_CHECK_SKIP:-},"
FUZZ_CASES="${GPU_CHECK_FUZZ_CASES:-16}"
BENCH_ARGS="${GPU_CHECK_BENCH_ARGS:-}"
KERNELS_ARGS="${GPU_CHECK_KERNELS_ARGS:---sweep}"
START=$(date +%s)
DEADLINE=$((START + BUDGET))

if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif command -v python >/dev/null 2>&1; then PY=python
else PY=python3; fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1

# CUDA tools: PATH first, then CUDA_HOME, then the usual install folder.
for dir in "${CUDA_HOME:-}/bin" /usr/local/cuda/bin; do
    if [ -d "$dir" ] && ! command -v nvcc >/dev/null 2>&1; then PATH="$PATH:$dir"; fi
done
SANITIZER="$(command -v compute-sanitizer || true)"
for dir in "${CUDA_HOME:-}/bin" /usr/local/cuda/bin /usr/local/cuda/compute-sanitizer; do
    if [ -z "$SANITIZER" ] && [ -x "$dir/compute-sanitizer" ]; then SANITIZER="$dir/compute-sanitizer"; fi
done

slug() { tr '[:upper:]' '[:lower:]' | sed -e 's/[^a-z0-9]\{1,\}/-/g' -e 's/^-//' -e 's/-$//' | cut -c1-40; }
GPU_NAME="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1)"
[ -n "$GPU_NAME" ] || GPU_NAME="$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0))' 2>/dev/null)"
[ -n "$GPU_NAME" ] || GPU_NAME="unknown-gpu"
GPU_SLUG="$(printf '%s' "$GPU_NAME" | slug)"
STAMP="$(date +%Y%m%d-%H%M%S)"
OUT="${GPU_CHECK_RESULTS_ROOT:-$REPO/benchmarks/results}/gpu-$GPU_SLUG-$STAMP"

# The capability of the present GPU, for TORCH_CUDA_ARCH_LIST (kept when the caller set it).
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
    ARCH="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 | tr -d ' ')"
    [ -n "$ARCH" ] || ARCH="$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability(0))' 2>/dev/null)"
    ARCH="${ARCH:-9.0}"
else
    ARCH="$TORCH_CUDA_ARCH_LIST"
fi
JOBS="${MAX_JOBS:-$(nproc 2>/dev/null || echo 8)}"

SUMMARY=()
FAILED=0

# The least time each stage is worth running with: what a stage keeps for the stages after it
# is the sum of their floors (skipped stages keep nothing).
declare -A FLOOR=([env]=15 [build]=60 [kernels]=60 [tests]=60 [bench]=75 [fuzz]=30 [sanitizer]=40)
ORDER=(env build kernels tests bench fuzz sanitizer)

reserve_after() {
    local after=0 total=0 name
    for name in "${ORDER[@]}"; do
        if [ "$after" = 1 ] && [[ "$SKIP" != *",$name,"* ]]; then total=$((total + FLOOR[$name])); fi
        [ "$name" = "$1" ] && after=1
    done
    echo "$total"
}

# stage NAME CAP_SECONDS FUNCTION
# Runs FUNCTION (exported, in a child bash) under `timeout min(CAP, time left - reserve)`, its
# output in $OUT/NAME.log; the reserve is the time kept for the stages after it.
stage() {
    local name="$1" cap="$2" fn="$3"
    local reserve
    reserve=$(reserve_after "$name")
    local now total left limit rc t0 t1
    now=$(date +%s)
    total=$((DEADLINE - now))
    left=$((total - reserve))
    limit=$(( cap < left ? cap : left ))
    # A small budget still gives each stage a short try rather than skipping it outright.
    if [ "$limit" -lt 20 ]; then limit=$(( cap < 20 ? cap : 20 )); limit=$(( limit < total ? limit : total )); fi
    if [ "$DRY" = "1" ]; then
        printf '%-10s timeout min(%ss, time left - %ss)\n' "$name" "$cap" "$reserve"
        declare -f "$fn" | sed -e '1,2d' -e '$d' -e 's/^/             /'
        return 0
    fi
    if [[ "$SKIP" == *",$name,"* ]]; then
        SUMMARY+=("$(printf '%-10s skipped (GPU_CHECK_SKIP)' "$name")")
        return 0
    fi
    if [ "$limit" -lt 10 ]; then
        SUMMARY+=("$(printf '%-10s skipped (no time left)' "$name")")
        echo "== $name: skipped, no time left"
        return 0
    fi
    echo "== $name (up to ${limit}s)"
    t0=$(date +%s)
    # timeout signals the whole process group: children (compute-sanitizer's target) go too.
    timeout -k 15 "$limit" bash -c "set -u -o pipefail; $fn" >"$OUT/$name.log" 2>&1
    rc=$?
    t1=$(date +%s)
    local verdict="ok"
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then verdict="TIMEOUT after ${limit}s"; FAILED=1
    elif [ $rc -ne 0 ]; then verdict="FAILED rc=$rc"; FAILED=1; fi
    SUMMARY+=("$(printf '%-10s %-22s %4ss  %s' "$name" "$verdict" "$((t1 - t0))" "$name.log")")
    tail -n 15 "$OUT/$name.log" | sed 's/^/   | /'
    echo "== $name: $verdict in $((t1 - t0))s"
    return $rc
}

# --- the stages' commands -------------------------------------------------------------------
env_stage() {
    echo "# date"; date -u
    echo "# gpu"; echo "$GPU_NAME (capability $ARCH)"
    echo "# nvidia-smi"; nvidia-smi
    nvidia-smi -q >"$OUT/nvidia-smi-q.txt" 2>&1
    echo "# python"; "$PY" --version; command -v "$PY"
    "$PY" - <<'EOF'
import platform, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
print("device", torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0),
      round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1), "GiB")
try:
    import triton
    print("triton", triton.__version__)
except Exception as err:
    print("triton: not importable:", err)
for mod in ("pytest", "hypothesis", "numpy", "matplotlib", "tqdm", "liger_kernel"):
    try:
        m = __import__(mod)
        print(mod, getattr(m, "__version__", "?"))
    except Exception as err:
        print(mod, "missing:", type(err).__name__)
EOF
    echo "# nvcc"; nvcc --version 2>&1 || echo "nvcc not found"
    echo "# compute-sanitizer"; echo "${SANITIZER:-not found}"; [ -n "$SANITIZER" ] && "$SANITIZER" --version
    echo "# gcc"; gcc --version 2>&1 | head -n1
    echo "# git"; git -C "$REPO" rev-parse HEAD 2>&1; git -C "$REPO" status --short 2>&1 | head -n 40
    "$PY" -m pip freeze >"$OUT/pip-freeze.txt" 2>&1
    echo "# pip freeze: pip-freeze.txt"
}

cuda_extension_loads() {
    "$PY" - <<'EOF'
import json, sys
import mitkernels
info = mitkernels.build_info()
print(json.dumps(info, indent=1, default=str))
sys.exit(0 if info.get("cuda") else 1)   # the point of this build: the CUDA kernels
EOF
}

build_stage() {
    if cuda_extension_loads; then
        echo "an extension with the CUDA kernels loads already: not rebuilding"
        return 0
    fi
    export MITKERNELS_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="$JOBS"
    echo "MITKERNELS_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=$ARCH MAX_JOBS=$JOBS"
    if ! "$PY" -m pip install --no-build-isolation --no-deps --no-index -v -e . ; then
        echo "pip install failed: building in place instead"
        "$PY" setup.py build_ext --inplace || return 1
    fi
    cuda_extension_loads
}

kernels_stage() {
    # shellcheck disable=SC2086
    "$PY" -m benchmarks.gpu_kernels $KERNELS_ARGS --csv "$OUT/kernels.csv"
}

tests_stage() {
    "$PY" -m pytest -q -m gpu -p no:cacheprovider --junitxml="$OUT/pytest-gpu.xml" tests/
    local rc=$?
    if [ $rc -eq 5 ]; then  # nothing marked gpu: the tests that name CUDA
        echo "no test marked gpu: running -k 'cuda or gpu'"
        "$PY" -m pytest -q -p no:cacheprovider -k "cuda or gpu" --junitxml="$OUT/pytest-gpu.xml" tests/
        rc=$?
    fi
    return $rc
}

fuzz_stage() {
    "$PY" benchmarks/sanitizer_fuzz.py --cases "$FUZZ_CASES"
}

sanitizer_stage() {
    if [ -z "$SANITIZER" ]; then echo "compute-sanitizer not found"; return 3; fi
    # No caching allocator: every tensor is its own allocation, so memcheck sees a read past it.
    # API errors are not reported: torch's own probing (peer access and such) trips them.
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck --error-exitcode 99 \
        --report-api-errors no --print-limit 100 --log-file "$OUT/memcheck-report.txt" \
        "$PY" benchmarks/sanitizer_fuzz.py --cases "$FUZZ_CASES"
    local rc=$?
    echo "--- memcheck report ($OUT/memcheck-report.txt):"
    tail -n 40 "$OUT/memcheck-report.txt" 2>/dev/null
    return $rc
}

bench_stage() {
    local left=$(( DEADLINE - $(date +%s) - RESERVE_AFTER_BENCH ))
    # Start no new case when less than a minute is left: one case (compiles included)
    # must still finish, and the CSV and plot be written, within the stage's timeout.
    local budget=$(( left - 60 ))
    [ $budget -lt 30 ] && budget=30
    # shellcheck disable=SC2086
    "$PY" -m benchmarks.bench_mit_loss --full --device cuda --out-dir "$OUT" --budget-s "$budget" $BENCH_ARGS
}

# --- run --------------------------------------------------------------------------------------
export -f env_stage cuda_extension_loads build_stage kernels_stage tests_stage fuzz_stage \
    sanitizer_stage bench_stage
RESERVE_AFTER_BENCH=$(reserve_after bench)
export REPO PY OUT GPU_NAME ARCH JOBS SANITIZER FUZZ_CASES BENCH_ARGS KERNELS_ARGS DEADLINE PATH \
    RESERVE_AFTER_BENCH
if [ "$DRY" = "1" ]; then
    echo "gpu-check (dry run): GPU '$GPU_NAME' -> results folder $OUT"
    echo "python: $PY   arch: $ARCH   jobs: $JOBS   budget: ${BUDGET}s   sanitizer: ${SANITIZER:-not found}"
else
    if ! command -v nvidia-smi >/dev/null 2>&1 && ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
        echo "gpu-check: no CUDA GPU here (nvidia-smi missing and torch sees no device)" >&2
        exit 2
    fi
    mkdir -p "$OUT" || exit 2
    echo "gpu-check: $GPU_NAME (capability $ARCH) -> $OUT (budget ${BUDGET}s)"
fi

# Caps (s), in ORDER. Measurements come before the checks that only a failure makes
# interesting; the sanitizer gets what is left.
stage env        45  env_stage
stage build      240 build_stage
stage kernels    "${GPU_CHECK_KERNELS_CAP_S:-150}" kernels_stage
stage tests      150 tests_stage
stage bench      300 bench_stage
stage fuzz       45  fuzz_stage
stage sanitizer  120 sanitizer_stage

if [ "$DRY" = "1" ]; then
    echo "results: $OUT/{env,build,kernels,tests,bench,fuzz,sanitizer}.log, nvidia-smi-q.txt,"
    echo "         pip-freeze.txt, kernels.csv,"
    echo "         pytest-gpu.xml,"
    echo "         memcheck-report.txt, cuda_<gpu>_<time>.csv/.png, latest_cuda.csv/.png, summary.txt"
    exit 0
fi

{
    echo "gpu-check $STAMP on $GPU_NAME (capability $ARCH), commit $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null)"
    echo "total $(( $(date +%s) - START ))s of a ${BUDGET}s budget"
    printf '%s\n' "${SUMMARY[@]}"
} | tee "$OUT/summary.txt"
echo "results: $OUT"
if [ -n "${GPU_CHECK_TARBALL:-}" ]; then
    tar -czf "$GPU_CHECK_TARBALL" -C "$(dirname "$OUT")" "$(basename "$OUT")" &&
        echo "packed: $GPU_CHECK_TARBALL"
fi
exit $FAILED
