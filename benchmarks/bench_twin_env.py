"""Throughput of the 2D twin (twin_env.py) against the tiny policy's, measured in one run.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_twin_env.py

1. env-steps/s of 64 envs at the tiny model's image size in one process: split "ind" with the
   scripted expert's actions (expert_action() included), resets included, --steps vector steps
   after a warm-up episode. Target: >= 5,000.
2. the tiny policy's act() throughput (observations/s) at batch 64 on those observations, and
   the ratio env / policy: above 1 the rollout is bound by the policy, not the env (the point
   of the twin). Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from twin_env import TwinVecEnv  # noqa: E402  (the repo root is not a package)


def env_steps_per_second(split: str, num_envs: int, image_size: int, steps: int) -> float:
    """Env-steps/s of `steps` vector steps with expert actions, resets included."""
    envs = TwinVecEnv(split, num_envs, image_size, seed=0)
    envs.reset()
    truncated = [False]
    while not truncated[0]:  # warm-up: one episode (table textures are cached on first use)
        _, _, _, truncated, _ = envs.step(envs.expert_action())
    start = time.perf_counter()
    for _ in range(steps):
        if truncated[0]:
            envs.reset()
        _, _, _, truncated, _ = envs.step(envs.expert_action())
    elapsed = time.perf_counter() - start
    envs.close()
    return steps * num_envs / elapsed


def policy_obs_per_second(num_envs: int, image_size: int, model_path: str | None, calls: int) -> float:
    """Observations/s of agent.act() at batch num_envs on twin observations (T = 1)."""
    import torch

    from common import build_agent

    torch.set_num_threads(1)
    agent = build_agent(model_path, critic="h0", image_size=None if model_path else image_size)
    envs = TwinVecEnv("ind", num_envs, agent.image_size, seed=0)
    obs, _ = envs.reset()
    agent.act(obs["image"], obs["instruction"], 1.0)  # warm-up
    start = time.perf_counter()
    for _ in range(calls):
        agent.act(obs["image"], obs["instruction"], 1.0)
    return calls * num_envs / (time.perf_counter() - start)


def main() -> None:
    from model import TINY_IMAGE_SIZE

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--split", default="ind")
    parser.add_argument("--num-envs", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=TINY_IMAGE_SIZE)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--policy-calls", type=int, default=10)
    parser.add_argument("--model-path", default=None, help="policy to time (default: the random tiny model)")
    args = parser.parse_args()
    rate = env_steps_per_second(args.split, args.num_envs, args.image_size, args.steps)
    print(f"RESULT twin env-steps/s ({args.num_envs} envs, {args.image_size} px): {rate:.0f}")
    policy = policy_obs_per_second(args.num_envs, args.image_size, args.model_path, args.policy_calls)
    print(f"RESULT tiny policy act() obs/s (batch {args.num_envs}): {policy:.0f}")
    print(f"RESULT env / policy throughput: {rate / policy:.1f}x (> 1: rollouts are bound by the policy)")


if __name__ == "__main__":
    main()
