#!/usr/bin/env bash
# What only a GPU can confirm, in one run of ~7 minutes on one GPU (README, "GPUs"): the set-up
# check through NCCL, the decode loop's host syncs, the bf16 log-prob gap with a GPU's kernels,
# a 7B-sized PPO update's and SFT step's memory and time (random weights, no checkpoint needed),
# and the twin's SFT warm-up -> PPO chain trained on the GPU in bf16 end to end.
#
#   bash scripts/gpu_smoke.sh 2>&1 | tee gpu_smoke.log       # PY=.venv/bin/python by default
#
# Each step runs under its own time limit and the next runs whatever it gave; the summary at the
# end lists every step's exit status and time. ManiSkill's GPU rendering is not in it: run
# `python scripts/check_setup.py` (its default env is ManiSkill) for that.
set -u
PY=${PY:-.venv/bin/python}
TORCHRUN=${TORCHRUN:-"$PY -m torch.distributed.run"}
RUNS=${RUNS:-runs/gpu_smoke}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
SUMMARY=()

step() {  # step NAME SECONDS COMMAND...: run it under a time limit, note its status and time
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  echo "=== $name (limit ${limit} s): $*"
  timeout --kill-after 10 "$limit" "$@"
  rc=$?
  SUMMARY+=("$(printf '%-14s rc %-3s %4d s' "$name" "$rc" $((SECONDS - start)))")
}

step gpu 30 bash -c "nvidia-smi -L; $PY -c 'import torch, transformers, peft; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.is_available(), \"transformers\", transformers.__version__, \"peft\", peft.__version__)'"
step check 120 $PY scripts/check_setup.py --env twin --device cuda --num-envs 16
step check-nccl 120 $TORCHRUN --standalone --nproc_per_node 1 scripts/check_setup.py --env twin --device cuda
step bf16-logprob 120 $PY benchmarks/bench_bf16_logprob.py --device cuda
step update-7b 180 $PY benchmarks/bench_update.py --model-scale 7b --device cuda --repeats 2 \
  --grad-accum-steps 2 --throughput-minibatch-sizes 8 32
step warmup 120 $PY sft_warmup.py twin-warmup --device cuda --output-dir "$RUNS" --exp-name warmup \
  --total-steps 200
step ppo 120 $PY ppo_vla.py twin --epochs 1 --temperature 1.0 --device cuda --output-dir "$RUNS" \
  --exp-name ppo --init-checkpoint "$RUNS/warmup/checkpoint" --total-iterations 3 --eval-every 3
step sft-memory-7b 150 $PY benchmarks/bench_sft_memory.py --device cuda

echo "=== summary (rc 0: passed, 124: over its time limit)"
printf '%s\n' "${SUMMARY[@]}"
