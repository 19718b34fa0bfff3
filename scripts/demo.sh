#!/usr/bin/env bash
# `make demo`: the study of arXiv 2505.19789 at toy scale, on the 2D twin (twin_env.py), from the
# shipped pretrained tiny VLA (assets/tiny-openvla-twin, the stand-in for pretrained OpenVLA):
#   1. LoRA SFT warm-up on a few `ind` demos, then PPO from it (--epochs 1 --temperature 1.0)
#   2. the SFT baseline: LoRA SFT on many `ind` demos, from the base (the paper's SFT-16k)
#   3. (`make study` only: GRPO and DPO from the same warm-up; the demo's 30 minutes leave no room)
#   4. SFT and PPO (`make study`: also the warm-up, GRPO, DPO) on all 16 splits, the same episode
#      ids for each: table with each minus SFT paired over episodes (95% bootstrap intervals), KL
#      from the base (every 5th state of the first seed's episodes), chart, JSON, CSV
#   5. SFT's and PPO's snapshots along training on all splits (PPO's from the warm-up on): OOD
#      success against `ind` success (scripts/matched_ind.py), i.e. at matched in-distribution success
# Every stage runs on 2 processes (torchrun, one torch thread each): the two cores of this machine.
#
#   DEMO_DIR=/tmp/demo bash scripts/demo.sh   # where everything goes (default: demo/, study/)
#   STUDY=1 bash scripts/demo.sh              # `make study`: 3 training seeds of every stage (each
#                                             # its own --seed), intervals over seeds, then episodes
# Run again, it goes on where it stopped: a finished stage is kept (its `done` file), a killed
# training run continues from its last checkpoint (--resume), an evaluation is re-run only when a
# training run changed. `make study` took 68 min from a fresh clone (2026-12-06), 50 min at the fastest hour, ~3x at slow ones. To start over: rm -rf demo/
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
TORCHRUN="$(dirname "$PY")/torchrun --standalone --nproc_per_node 2"
OUT=${DEMO_DIR:-demo}
[[ "${STUDY:-0}" == 1 ]] && OUT=${DEMO_DIR:-study}  # its own folder: its evaluations are not the demo's
RUNS=$OUT/runs
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
BASE=assets/tiny-openvla-twin
if [[ "${STUDY:-0}" == 1 ]]; then
  TRAIN_SEEDS="0 1 2"; EVAL_SEEDS="0 1"; EPISODES=64; MATCHED_EPISODES=32; STAGES=4
  METHODS="warm-up:warmup SFT:sft PPO:ppo GRPO:grpo DPO:dpo"
else
  TRAIN_SEEDS="0"; EVAL_SEEDS="0 1 2"; EPISODES=32; MATCHED_EPISODES=16; STAGES=3
  METHODS="SFT:sft PPO:ppo"  # the warm-up: PPO@0 of the matched figure (the 30-minute budget)
fi

stage() { printf '\n=== [%s] %s\n' "$(date +%H:%M:%S)" "$*"; }
# train NAME SCRIPT FLAGS...: one training run under $RUNS/NAME, kept once finished, else continued.
train() {
  local name=$1 resume=()
  shift
  if [[ -e "$RUNS/$name/done" ]]; then echo "$RUNS/$name finished in an earlier run: kept"; return; fi
  [[ -d "$RUNS/$name/checkpoint" ]] && resume=(--resume) && echo "$RUNS/$name was stopped: continued"
  rm -f "$OUT/results/done" "$OUT/matched/done"  # the evaluations no longer show every run as it is
  $TORCHRUN "$@" --output-dir "$RUNS" --exp-name "$name" "${resume[@]}"
  touch "$RUNS/$name/done"
}
# evaluated DIR [TABLE]: true if DIR's evaluation is up to date with the runs (TABLE: shown again).
evaluated() {
  [[ -e "$1/done" ]] || return 1
  echo "$1: evaluated in an earlier run, no training run changed since: kept"
  [[ -z "${2:-}" ]] || cat "$2"
}
start=$SECONDS
# The CPU's two cores, also on a GPU host (the tiny model gains nothing there, and 2 ranks on one
# GPU would be refused by NCCL).
common=(--demo-dir "$OUT/demos" --device cpu)
checkpoints=()  # the base is on every split in the README's calibration table, and SFT@0 of the matched figure
# The scripts' own `ind` evaluations are left out (--eval-every 0): the evaluations below measure
# every checkpoint on every split (PPO's progress bar shows its rollouts' success).

for seed in $TRAIN_SEEDS; do
  stage "training seed $seed: 1/$STAGES SFT warm-up, LoRA, 200 steps on 32 ind demos (python sft_warmup.py twin-warmup)"
  train "warmup-$seed" sft_warmup.py twin-warmup "${common[@]}" --seed "$seed" --eval-every 0

  stage "training seed $seed: 2/$STAGES PPO from the warm-up, the paper's recipe (python ppo_vla.py twin --epochs 1 --temperature 1.0)"
  train "ppo-$seed" ppo_vla.py twin --device cpu --seed "$seed" --epochs 1 --temperature 1.0 \
    --init-checkpoint "$RUNS/warmup-$seed/checkpoint" --keep-checkpoints --eval-every 0

  stage "training seed $seed: 3/$STAGES SFT baseline, LoRA, 1000 steps on 1024 ind demos, from the base (python sft_warmup.py twin-sft)"
  train "sft-$seed" sft_warmup.py twin-sft "${common[@]}" --seed "$seed" --keep-checkpoints --eval-every 0

  [[ $STAGES == 4 ]] || continue
  stage "training seed $seed: 4/4 GRPO and DPO from the warm-up (python grpo_vla.py twin, python dpo_vla.py twin)"
  train "grpo-$seed" grpo_vla.py twin --device cpu --seed "$seed" --init-checkpoint "$RUNS/warmup-$seed/checkpoint"
  train "dpo-$seed" dpo_vla.py twin --device cpu --seed "$seed" --init-checkpoint "$RUNS/warmup-$seed/checkpoint"
done
for name in $METHODS; do  # a label repeated = its training runs
  for seed in $TRAIN_SEEDS; do checkpoints+=(--checkpoint "${name%%:*}=$RUNS/${name#*:}-$seed"); done
done

stage "every checkpoint on all 16 splits (ind + 15 OOD): eval seeds $EVAL_SEEDS x $EPISODES episodes, same ids for each"
if ! evaluated "$OUT/results" "$OUT/results/table.txt"; then
  mkdir -p "$OUT/results"
  rm -f "$OUT/matched/done"  # it takes the final checkpoints' points from here
  # shellcheck disable=SC2086
  $TORCHRUN evaluate_ood.py --env twin --device cpu --splits all --seeds $EVAL_SEEDS --episodes "$EPISODES" \
    --num-envs 32 --model-path "$BASE" "${checkpoints[@]}" --reference SFT --kl --kl-every 5 \
    --output-dir "$OUT/results" --exclude-from-averages noise_strong multi_receptacle unseen_table \
    | tee "$OUT/results/table.txt"  # excluded: out of calibration range, docs/STUDY_PROTOCOL.md
  touch "$OUT/results/done"
fi

stage "SFT and PPO along training (seed 0's snapshots) on all 16 splits: $MATCHED_EPISODES episodes each"
# `make demo`: the final snapshots are the checkpoints evaluated above (on more episodes), so they
# join the lines from there (--also); `make study` evaluates them here (above: 3 runs pooled).
snapshots=(--checkpoint SFT@0=base --checkpoint "PPO@0=$RUNS/warmup-0")
finals=()
for method in SFT:sft PPO:ppo; do
  mapfile -t paths < <(ls -dv "$RUNS/${method#*:}-0"/snapshots/*)  # -v: step_250 before step_1000
  [[ $STAGES == 4 ]] || { last=${paths[-1]}; finals+=("${method%%:*}=${last##*_}"); unset 'paths[-1]'; }
  for path in "${paths[@]}"; do snapshots+=(--checkpoint "${method%%:*}@${path##*_}=$path"); done
done
also=()
[[ ${#finals[@]} == 0 ]] || also=(--also "$OUT/results/results.json" --steps "${finals[@]}")
if ! evaluated "$OUT/matched"; then
  mkdir -p "$OUT/matched"
  $TORCHRUN evaluate_ood.py --env twin --device cpu --splits all --seeds 0 --episodes "$MATCHED_EPISODES" \
    --num-envs 32 --model-path "$BASE" "${snapshots[@]}" --no-paper-columns --output-dir "$OUT/matched" \
    --exclude-from-averages noise_strong multi_receptacle unseen_table > "$OUT/matched/table.txt"
  $PY scripts/matched_ind.py "$OUT/matched/results.json" "${also[@]}" --out "$OUT/matched/matched_ind.png"
  touch "$OUT/matched/done"
fi

stage "done in $(( (SECONDS - start) / 60 )) min $(( (SECONDS - start) % 60 )) s"
cat <<EOF
  demonstrations      $OUT/demos/  (HDF5 + JSON, ManiSkill's trajectory layout)
  checkpoints         $RUNS/{warmup,ppo,sft,grpo,dpo}-SEED/checkpoint/  (snapshots/: SFT's and PPO's along training)
  TensorBoard         $PY -m tensorboard.main --logdir $RUNS
  results table       $OUT/results/results.csv  (and results.json, every episode)
  chart               $OUT/results/success.png
  matched ind         $OUT/matched/matched_ind.png  (OOD against ind success along training)
EOF
