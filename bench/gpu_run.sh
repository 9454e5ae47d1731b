#!/usr/bin/env bash
# One GPU session (about 8 minutes on an H100): build the extension, run the GPU tests, then the GPU benchmarks.
# Everything lands in $OUT (default bench/results). Run from the repository root on the GPU machine:
#   OUT=/some/dir GIT_COMMIT=$(git rev-parse HEAD) bash bench/gpu_run.sh
# Steps are independent: a failing step is reported and the next one still runs; the exit code is the number of
# failed steps.
set -uo pipefail
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
failed=0
step() {
    local name=$1; shift
    local start=$SECONDS
    echo "== $name"
    if "$@"; then echo "== $name: ok ($((SECONDS - start)) s)"; else echo "== $name: FAILED ($((SECONDS - start)) s)"; failed=$((failed + 1)); fi
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
# The extension is built against the torch installed here (a build from another torch does not load).
step build python3 -m pip install --quiet --no-deps --no-build-isolation -e .
step gpu-tests python3 -m pytest tests -q -m gpu -x -p no:cacheprovider --junitxml="$OUT/gpu-tests.xml"
step reduce-bench timeout 240 python3 bench/reduce_gpu.py --out "$OUT/reduce-gpu.json"
step ensemble-bench timeout 300 python3 bench/ensemble_throughput.py --preset gpu --budget-s 200 \
    --json "$OUT/ensemble-gpu.json"
exit $failed
