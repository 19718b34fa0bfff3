#!/usr/bin/env bash
# `make demo`: the study of arXiv 2505.19789 at toy scale, on the 2D twin (twin_env.py), from the
# shipped pretrained tiny VLA (assets/tiny-openvla-twin, the stand-in for pretrained OpenVLA):
#   1. LoRA SFT warm-up on a few `ind` demos, then PPO from it (--epochs 1 --temperature 1.0)
#   2. the SFT baseline: LoRA SFT on many `ind` demos, from the base (the paper's SFT-16k)
#   3. GRPO and DPO from the same warm-up
#   4. every checkpoint on all 16 splits, the same episode ids for each -> table, chart, JSON, CSV
# Every stage runs on 2 processes (torchrun, one torch thread each): the two cores of this machine.
#
#   DEMO_DIR=/tmp/demo bash scripts/demo.sh   # where everything goes (default: demo/)
#   STUDY=1 bash scripts/demo.sh              # `make study`: more evaluation seeds and episodes
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
TORCHRUN="$(dirname "$PY")/torchrun --standalone --nproc_per_node 2"
OUT=${DEMO_DIR:-demo}
RUNS=$OUT/runs
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
if [[ "${STUDY:-0}" == 1 ]]; then SEEDS="0 1 2 3 4"; EPISODES=64; else SEEDS="0 1 2"; EPISODES=32; fi

stage() { printf '\n=== [%s] %s\n' "$(date +%H:%M:%S)" "$*"; }
start=$SECONDS
# The CPU's two cores, also on a GPU host (the tiny model gains nothing there, and 2 ranks on one
# GPU would be refused by NCCL).
common=(--output-dir "$RUNS" --demo-dir "$OUT/demos" --device cpu)

stage "1/5 SFT warm-up: LoRA, 200 steps on 64 ind demos, from the pretrained tiny VLA (python sft_warmup.py twin-warmup)"
$TORCHRUN sft_warmup.py twin-warmup "${common[@]}" --exp-name warmup

stage "2/5 PPO from the warm-up, the paper's recipe (python ppo_vla.py twin --epochs 1 --temperature 1.0)"
$TORCHRUN ppo_vla.py twin --output-dir "$RUNS" --device cpu --exp-name ppo --epochs 1 --temperature 1.0 \
  --init-checkpoint "$RUNS/warmup/checkpoint"

stage "3/5 SFT baseline: LoRA, 1000 steps on 1024 ind demos, from the base (python sft_warmup.py twin-sft)"
$TORCHRUN sft_warmup.py twin-sft "${common[@]}" --exp-name sft

stage "4/5 GRPO and DPO from the warm-up (python grpo_vla.py twin, python dpo_vla.py twin)"
$TORCHRUN grpo_vla.py twin --output-dir "$RUNS" --device cpu --exp-name grpo --init-checkpoint "$RUNS/warmup/checkpoint"
$TORCHRUN dpo_vla.py twin --output-dir "$RUNS" --device cpu --exp-name dpo --init-checkpoint "$RUNS/warmup/checkpoint"

stage "5/5 every checkpoint on all 16 splits (ind + 15 OOD): seeds $SEEDS x $EPISODES episodes, same ids for each"
# shellcheck disable=SC2086
$TORCHRUN evaluate_ood.py --env twin --device cpu --splits all --seeds $SEEDS --episodes "$EPISODES" --num-envs 32 \
  --checkpoint base --model-path assets/tiny-openvla-twin --checkpoint warm-up="$RUNS/warmup" --checkpoint SFT="$RUNS/sft" --checkpoint PPO="$RUNS/ppo" \
  --checkpoint GRPO="$RUNS/grpo" --checkpoint DPO="$RUNS/dpo" --output-dir "$OUT/results"

stage "done in $(( (SECONDS - start) / 60 )) min $(( (SECONDS - start) % 60 )) s"
cat <<EOF
  demonstrations      $OUT/demos/  (HDF5 + JSON, ManiSkill's trajectory layout)
  checkpoints         $RUNS/{warmup,ppo,sft,grpo,dpo}/checkpoint/
  TensorBoard         $PY -m tensorboard.main --logdir $RUNS
  results table       $OUT/results/results.csv  (and results.json, every episode)
  chart               $OUT/results/success.png
EOF
