#!/usr/bin/env bash
# `make demo-maniskill`: the study's pipeline on the real ManiSkill3 task, at tiny scale on a CPU,
# in the paper's order (arXiv 2505.19789): expert demos -> SFT warm-up -> PPO from the warm-up,
# an SFT baseline on more demos, then all three on every split.
#
# The model is the random-init tiny OpenVLA and the budget a few CPU minutes, so its success
# rates are ~0: this checks the plumbing on the real simulator. The study itself, with a
# pretrained tiny VLA, runs on the 2D twin: `make demo` (scripts/demo.sh).
#
#   DEMO_DIR=/tmp/demo bash scripts/demo_maniskill.sh     # where everything goes (default: demo-maniskill/)
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
OUT=${DEMO_DIR:-demo-maniskill}
RUNS=$OUT/runs
# One torch thread: the env worker processes need the other core (2 threads on 2 busy cores
# made the tiny model 10-60x slower here).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export HF_HUB_OFFLINE=1

stage() { printf '\n=== [%s] %s\n' "$(date +%H:%M:%S)" "$*"; }
start=$SECONDS

stage "1/4 expert demonstrations + SFT warm-up (the paper's 140-demo warm-up, at 16 demos)"
"$PY" sft_warmup.py --output-dir "$RUNS" --exp-name sft_warmup --demo-dir "$OUT/demos" \
  --num-demos 16 --val-demos 4 --num-envs 2 --total-steps 150 --val-every 50 \
  --eval-every 0 --save-every 50 --eval-temperature 0.6

stage "2/4 PPO from the warm-up (python ppo_vla.py paper --epochs 1 --temperature 1.0, 4 iterations)"
"$PY" ppo_vla.py paper --output-dir "$RUNS" --exp-name ppo --epochs 1 --temperature 1.0 \
  --init-checkpoint "$RUNS/sft_warmup/checkpoint" --num-envs 4 --num-steps 80 \
  --total-iterations 4 --grad-accum-steps 4 --eval-every 0 --save-every 1

stage "3/4 SFT baseline: the same recipe on 4x the demonstrations (the paper's SFT-16k, scaled down)"
"$PY" sft_warmup.py --output-dir "$RUNS" --exp-name sft_baseline --demo-dir "$OUT/demos" \
  --num-demos 64 --val-demos 4 --num-envs 2 --total-steps 300 --val-every 100 \
  --eval-every 0 --save-every 100

stage "4/4 every checkpoint on all 16 splits (ind + 15 OOD), same episodes for each"
"$PY" evaluate_ood.py --checkpoint warm-up="$RUNS/sft_warmup" \
  --checkpoint PPO="$RUNS/ppo" --checkpoint SFT="$RUNS/sft_baseline" \
  --splits all --episodes 4 --seeds 0 --num-envs 4 --output-dir "$OUT/results"

stage "done in $(( (SECONDS - start) / 60 )) min $(( (SECONDS - start) % 60 )) s"
cat <<EOF
  demonstrations      $OUT/demos/  (HDF5 + JSON, ManiSkill's trajectory layout)
  checkpoints         $RUNS/{sft_warmup,ppo,sft_baseline}/checkpoint/
  TensorBoard         $PY -m tensorboard.main --logdir $RUNS
  results table       $OUT/results/results.csv  (and results.json, every episode)
  chart               $OUT/results/success.png
EOF
