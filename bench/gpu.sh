#!/usr/bin/env bash
# The checks and benchmarks that need a CUDA device, in one go, each logged to LOGDIR:
#   1. the `gpu` tests (CUDA against CPU fp32 in fp32/bf16/fp16 and compiled, pinned batches,
#      batch size from free memory, a real out-of-memory error halving the batch, a training
#      step and a whole tiny training run under bf16 autocast);
#   2. the inference and training test files in full, where `device: auto` now means CUDA;
#   3. bench/inference.py: slices/s at 512 x 512 in fp32, fp16, bf16 (+ compile), FLOPs, % of peak;
#   4. bench/analyze.py: `dicom-node analyze` of a 300-slice 512 x 512 study on CUDA, per stage.
# Every step runs even when an earlier one fails; the exit status is that of the first failure.
#
#   HF_HUB_OFFLINE=1 bench/gpu.sh LOGDIR        (PYTHON defaults to .venv/bin/python, else python3)
set -uo pipefail
cd "$(dirname "$0")/.."
logdir=${1:?usage: bench/gpu.sh LOGDIR}
mkdir -p "$logdir"
py=${PYTHON:-.venv/bin/python}
[ -x "$py" ] || py=python3
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
status=0

step() {
    local name=$1
    shift
    local started=$SECONDS
    echo "== $name: $*"
    "$@" >"$logdir/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc in $((SECONDS - started)) s"
    tail -n "${TAIL:-25}" "$logdir/$name.log"
    if [ $rc -ne 0 ] && [ $status -eq 0 ]; then status=$rc; fi
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$py" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))'
step gpu-tests "$py" -m pytest -p no:cacheprovider -q -m gpu -rs \
    tests/analysis/test_inference.py tests/training/test_train.py
step cuda-auto-tests "$py" -m pytest -p no:cacheprovider -q -m "not gpu" \
    tests/analysis/test_inference.py tests/training/test_train.py
TAIL=40 step bench-inference "$py" bench/inference.py --cpu-slices 0 --cuda-slices 512 --compile
step bench-analyze "$py" bench/analyze.py --random-model --device cuda --slices 300
exit $status
