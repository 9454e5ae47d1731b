#!/usr/bin/env bash
# The GPU check of the project, as one script: build the extension, run the GPU tests, then the GPU benchmarks.
# From the repository root:
#   OUT=/some/dir GIT_COMMIT=$(git rev-parse HEAD) bash bench/gpu_run.sh [STEP ...]
# Results land in $OUT/results/<machine>/<workload>-<date>.json (copy them to bench/results/<machine>/), test
# reports and logs in $OUT/logs/ (not results).
# STEPs: build tests reduce ensemble (the default, about 8 minutes on an H100: build ~1 min, tests ~2 min with 8
# xdist workers, reduce ~2 min, ensemble ~3 min for its first 3-4 points), plus train (loop/vmap/fused in turns,
# NCHW and NHWC, fp32 and bf16 autocast), profile (where a training step's time goes, loop vs vmap vs fused), optim
# (optimizer steps), sweep and compile (Triton tile sweep, torch.compile of vmap: a few minutes each) when named.
# Steps are independent: a failing step is reported and the next one still runs; the exit code is the number of
# failed steps. Every step has its own time limit, so one hang cannot take the whole run.
# To fit a shorter run: TEST_PATHS (default tests) narrows the tests step, TRAIN_MEMBERS (default "4 8 16") the
# train step, whose points and implementations TRAIN_ARGS sets (default: NCHW and NHWC, fp32 and bf16 autocast,
# loop/vmap/fused; e.g. "--formats channels_last --precisions bf16 --implementations loop,fused,fused_compile");
# the profile step profiles NHWC members under bf16 autocast unless PROFILE_ARGS says otherwise.
set -uo pipefail
OUT=${OUT:-gpu-run}
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
STEPS=${*:-build tests reduce ensemble}
failed=0
step() {
    local name=$1; shift
    case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
    local start=$SECONDS
    echo "== $name"
    if "$@"; then echo "== $name: ok ($((SECONDS - start)) s)"; else echo "== $name: FAILED ($((SECONDS - start)) s)"; failed=$((failed + 1)); fi
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
# The extension is built against the torch installed here (a build from another torch does not load).
step build timeout 240 python3 -m pip install --quiet --no-deps --no-build-isolation -e .
MACHINE=$(python3 -c "from fused_ensemble.cli.environment import machine_name; print(machine_name('cuda'))")
DATE=$(date +%F)
RESULTS=$OUT/results/$MACHINE
LOGS=$OUT/logs
mkdir -p "$RESULTS" "$LOGS"
result() { echo "$RESULTS/$1-$DATE.json"; }
# pytest-xdist spreads the Triton compiles over the CPU cores (one GPU, several processes).
step tests timeout 240 python3 -m pytest ${TEST_PATHS:-tests} -q -m gpu -n 8 -p no:cacheprovider --timeout 200 \
    --junitxml="$LOGS/gpu-tests.xml"
step reduce timeout 200 python3 bench/reduce_gpu.py --out "$(result reduce)"
TRAIN_ARGS=${TRAIN_ARGS:---channels-last --bf16-autocast}
step train timeout 200 python3 bench/train_throughput.py --members ${TRAIN_MEMBERS:-4 8 16} $TRAIN_ARGS \
    --json "$(result train-interleaved)"
PROFILE_ARGS=${PROFILE_ARGS:---implementations loop,fused --channels-last --bf16-autocast}
step profile timeout 150 python3 bench/profile_train_step.py --members 8 $PROFILE_ARGS \
    --json "$(result profile-train)"
step optim timeout 90 python3 -m pytest bench/test_bench_optim.py -q -p no:cacheprovider --benchmark-enable \
    --benchmark-group-by=group --benchmark-json="$(result optim)"
step sweep timeout 120 python3 bench/triton_tile_sweep.py --out "$(result reduce-triton-tiles)"
step ensemble timeout 220 python3 bench/ensemble_throughput.py --preset gpu --budget-s 120 \
    --json "$(result ensemble)"
step compile timeout 200 python3 bench/ensemble_throughput.py --preset gpu-compile --compile-vmap \
    --json "$(result ensemble-compile)"
exit $failed
