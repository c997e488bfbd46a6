#!/usr/bin/env bash
# Train the model on a CUDA machine and score it on the held-out phantoms, in one go, each step
# logged to OUTDIR:
#   1. `dicom-node train` with the recipe below (the shipped recipe on a 1.0 mm grid, 384 x 384
#      input, batch 32; phantom generation, both stages and the operating points all within
#      MINUTES of wall-clock time); options given after OUTDIR are added and win over these;
#   2. from its metrics log: stage 1's step rate, validation Dice by check, where the time went;
#   3. `dicom-node evaluate` of the model just written on held-out set 1 (seeds 100000-100039,
#      shift 0.5: the model card's yardstick), on the same device (EVAL_ARGS replaces that set);
#   4. the held-out figures beside the targets.
# The model folder is OUTDIR/model, the evaluation OUTDIR/eval (evaluation.json, report.png).
# Every step runs even when an earlier one fails; the exit status is that of the first failure.
#
#   HF_HUB_OFFLINE=1 MINUTES=6 bench/gpu_train.sh OUTDIR [train options...]
#       (PYTHON defaults to .venv/bin/python, else python3; WORKERS to the number of cores)
set -uo pipefail
cd "$(dirname "$0")/.."
logdir=${1:?usage: bench/gpu_train.sh OUTDIR [train options...]}
shift
mkdir -p "$logdir"
logdir=$(cd "$logdir" && pwd)
py=${PYTHON:-.venv/bin/python}
[ -x "$py" ] || py=python3
workers=${WORKERS:-$(nproc)}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
cli=(-c 'import sys; from dicom_node.cli import main; sys.exit(main())')
status=0

# shellcheck source=bench/steps.sh
source bench/steps.sh

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
"$py" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device")'
recipe=(--pixel-spacing 1.0 --input-size 384 --batch-size 32 --seg-steps 30000
        --max-minutes "${MINUTES:-6}" --workers "$workers" --no-progress)
step train "$py" "${cli[@]}" train --output "$logdir/model" --work-dir "$logdir/run" "${recipe[@]}" "$@"
step train-timing "$py" - "$logdir/run/metrics.jsonl" <<'PY'
import json
import sys

rows = [json.loads(line) for line in open(sys.argv[1])]
seg = [r for r in rows if r.get("stage") == "seg" and "step" in r]
if len(seg) >= 2:
    first, last = seg[0], seg[-1]
    rate = (last["step"] - first["step"]) / max(1e-9, last["elapsed_s"] - first["elapsed_s"])
    print(f"stage 1: {rate:.1f} steps/s (steps {first['step']}-{last['step']}, validations"
          f" included); first logged step at {first['elapsed_s']:.0f} s")
checks = [r for r in rows if r.get("stage") == "seg_val"]
print("validation Dice by step:",
      ", ".join(f"{r['step']}: {r['val_dice']:.3f}" for r in checks) or "none")
marks = {}
for r in rows:  # the first row of each stage: when it began, in seconds from the run's start
    marks.setdefault(r.get("stage"), r["elapsed_s"])
print("first row of each stage at (s):", {k: round(v) for k, v in marks.items()})
PY
read -r -a held_out <<<"${EVAL_ARGS:---first-seed 100000 --phantoms 40 --shift 0.5}"
step evaluate "$py" "${cli[@]}" evaluate --model "$logdir/model" --out "$logdir/eval" \
    --workers "$workers" --no-progress "${held_out[@]}"
step figures "$py" - "$logdir/eval/evaluation.json" <<'PY'
import json
import sys

held = json.load(open(sys.argv[1]))["held_out"]
image, study = held["image"], held["study"]
seg, det = held["segmentation"], held["detection"]
rows = [
    ("per-image accuracy", image["accuracy"], ">= 0.94"),
    ("per-image MCC", image["mcc"], ">= 0.85"),
    ("per-image Cohen's kappa", image["kappa"], ">= 0.85"),
    ("per-image sensitivity", image["sensitivity"], ""),
    ("per-image specificity", image["specificity"], ""),
    ("per-image ROC AUC", image["roc_auc"], ""),
    ("per-study accuracy", study["accuracy"], ""),
    ("per-study MCC", study["mcc"], ""),
    ("lesion Dice, tumours >= 6 mm", seg["lesion_dice_mean_ge_6mm"], ">= 0.80"),
    ("detection, tumours >= 6 mm", det["sensitivity_ge_6mm"], ""),
    ("false-positive lesions per tumour-free study",
     det["false_positives_per_tumour_free_study"], "<= 0.5"),
]
print(f"held out: {held['cases']} cases, {held['studies_with_tumour']} with tumour")
for name, value, target in rows:
    shown = "n/a" if value is None else f"{value:.3f}"
    print(f"  {name:<46} {shown:>6}  {target}")
PY
exit $status
