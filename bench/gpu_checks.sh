#!/usr/bin/env bash
# Every check that needs a GPU, in one run (a GPU is often lent for minutes only):
#   1. the native kernels built for this GPU; the CUDA tests (kernel against float64 and gradcheck,
#      fp16/bf16, the whole model on CUDA against the CPU, `detr serve --device cuda` against the CPU);
#   2. bench/msda.py on CUDA in fp32 and bf16, with the achieved bandwidth;
#   3. training-step times of the R50 presets at 800x1333, batch 2, fp32 and bf16;
#   4. short bf16 training runs of both tiny presets (learning curve, images/s).
# Each step has its own time limit and the run goes on after a failure; everything is written to
# one log, LOG (default outputs/gpu_checks.log). Run from the repository root with the project's
# Python on PATH as python3 (or set PYTHON). Results are recorded in bench/README.md.
#
#     bash bench/gpu_checks.sh outputs/gpu_checks.log
set -uo pipefail
cd "$(dirname "$0")/.."
log=${1:-outputs/gpu_checks.log}
mkdir -p "$(dirname "$log")"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
if ! $py -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    echo "bench/gpu_checks.sh: $py sees no CUDA device; these checks need a GPU" >&2
    exit 2
fi
# Only the GPU in the machine: a build for one architecture takes a third of the default three.
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$($py -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')}
synth=${SYNTH_DIR:-data/synth_small}

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log its output and status
    local name=$1 limit=$2 started=$SECONDS status
    shift 2
    echo "=== $name: $*"
    timeout "$limit" "$@" 2>&1
    status=$?
    echo "=== $name: exit $status after $((SECONDS - started)) s"
}

{
    step environment 60 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv; \
        $py -c 'import torch, sys; print(sys.version.split()[0], torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))'; \
        nvcc --version | tail -n 2; nproc"
    # The dataset of the training runs is generated while the kernels compile.
    if [ ! -d "$synth" ]; then
        $py -m detr.cli data synth --format coco --out "$synth" --images 1700 --size 160x160 --val-fraction 0.06 \
            > "$log.synth" 2>&1 &
        synth_pid=$!
    fi
    $py -c 'from detr.ops import build; build.ensure_built("cpu")' > "$log.cpu-build" 2>&1 &
    cpu_build=$!
    step build-cuda 400 $py -c 'import time; from detr.ops import build; t = time.time(); s = build.ensure_built("cuda"); print(s.directory, f"{time.time() - t:.0f} s")'
    wait $cpu_build; echo "=== build-cpu: exit $?"; tail -n 3 "$log.cpu-build"
    step ops-info 60 $py -m detr.cli ops info
    step cuda-tests 600 $py -m pytest -p no:cacheprovider -q -rfEs -m "not slow" tests/ops/test_native_cuda.py \
        tests/ops/test_dispatch.py tests/models/test_cuda_agreement.py tests/deploy/test_cuda_serving.py
    step msda-bench 300 $py bench/msda.py --device cuda --dtypes fp32,bf16 --repeats 10
    step r50-train-step 300 $py bench/train_step.py --device cuda --amp none,bf16 --warmup 3 --steps 10
    if [ -n "${synth_pid:-}" ]; then wait "$synth_pid"; echo "=== synth: exit $?"; tail -n 2 "$log.synth"; fi
    for preset in deformable_detr_tiny detr_tiny; do
        step "train-$preset" 300 $py bench/train_run.py "configs/$preset.yaml" -o train.device=cuda -o train.amp=bf16 \
            -o train.epochs=2 -o data.num_workers=8 --window 50
    done
} 2>&1 | tee "$log"
