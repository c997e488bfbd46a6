#!/usr/bin/env bash
# The checks and benchmarks that need a CUDA device, in one go, each logged to LOGDIR:
#   1. the `gpu` tests (CUDA against CPU fp32 in fp32/bf16/fp16 and compiled, pinned batches,
#      batch size from free memory, a real out-of-memory error halving the batch, a training
#      step and a whole tiny training run under bf16 autocast);
#   2. the inference and training test files in full, where `device: auto` now means CUDA;
#   3. bench/inference.py: slices/s at 512 x 512 in fp32, fp16, bf16 (+ compile), FLOPs, % of peak;
#   4. bench/analyze.py: `dicom-node analyze` of a 300-slice 512 x 512 study on CUDA, per stage;
#   5. `dicom-node train` with the shipped recipe's shapes on 60 phantoms for 1000 steps: where
#      the time goes (loading, stage 1 per step, stage 2) on this machine.
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

# shellcheck source=bench/steps.sh
source bench/steps.sh

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$py" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))'
step gpu-tests "$py" -m pytest -p no:cacheprovider -q -m gpu -rs \
    tests/analysis/test_inference.py tests/training/test_train.py
step cuda-auto-tests "$py" -m pytest -p no:cacheprovider -q -m "not gpu" \
    tests/analysis/test_inference.py tests/training/test_train.py
TAIL=40 step bench-inference "$py" bench/inference.py --cpu-slices 0 --cuda-slices 512 --compile
step bench-analyze "$py" bench/analyze.py --random-model --device cuda --slices 300
work=$(mktemp -d)
step train "$py" -m dicom_node.cli train --output "$work/model" --work-dir "$work/run" \
    --phantoms 60 --seg-steps 1000 --no-progress
step train-timing "$py" - "$work/run/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
seg = [r for r in rows if r.get("stage") == "seg" and "step" in r]
first, last = seg[0], seg[-1]
rate = (last["step"] - first["step"]) / (last["elapsed_s"] - first["elapsed_s"])
done = next(r for r in rows if r.get("stage") == "done")
print(f"stage 1: {rate:.1f} steps/s (steps {first['step']}-{last['step']}, validations included);"
      f" first logged step at {first['elapsed_s']:.0f} s; whole run {done['elapsed_s']:.0f} s")
PY
rm -rf "$work"
exit $status
