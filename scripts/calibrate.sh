#!/usr/bin/env bash
# The calibration of docs/STUDY_PROTOCOL.md (section 4): the base and its warm-up on every split
# and on the pretraining split, on CALIBRATION episode ids (which no evaluation, demo or RL episode
# uses), 256 episodes each, temperature 0.6, with 95% Wilson intervals. Nothing else is tuned on.
#
#   BASE=assets/tiny-openvla-twin bash scripts/calibrate.sh                 # the warm-up recipe as it is
#   BASE=... OUT=/tmp/cal-16 bash scripts/calibrate.sh --num-demos 16 --total-steps 100  # a warm-up variant
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
TORCHRUN="$(dirname "$PY")/torchrun --standalone --nproc_per_node 2"
BASE=${BASE:-assets/tiny-openvla-twin}
PRETRAIN_SPLIT=${PRETRAIN_SPLIT:-pretrain}
OUT=${OUT:-results/calibration}
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1

# The warm-up: the demo's recipe from this base; extra arguments change it (--num-demos, --total-steps).
$TORCHRUN sft_warmup.py twin-warmup --model-path "$BASE" --output-dir "$OUT/runs" --demo-dir "$OUT/demos" \
  --device cpu --exp-name warmup --eval-every 0 "$@"  # no evaluation-id numbers
$TORCHRUN evaluate_ood.py --env twin --device cpu --calibration --splits all "$PRETRAIN_SPLIT" --seeds 0 \
  --episodes 256 --num-envs 64 --no-paper-columns --output-dir "$OUT/results" \
  --checkpoint base --model-path "$BASE" --checkpoint warm-up="$OUT/runs/warmup"
