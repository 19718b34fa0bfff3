"""Throughput of the 2D twin (twin_env.py): env-steps/s of 64 envs at 64 px in one process.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_twin_env.py

Steps split "ind" with the scripted expert's actions (expert_action() is included in the time),
resetting whenever the episodes end (resets included), for --steps vector steps after a warm-up
episode that fills the table cache. Prints one RESULT line. Not a test: numbers depend on the
machine (target: >= 5,000 env-steps/s).
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--split", default="ind")
    parser.add_argument("--num-envs", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    rate = env_steps_per_second(args.split, args.num_envs, args.image_size, args.steps)
    print(f"RESULT twin env-steps/s ({args.num_envs} envs, {args.image_size} px): {rate:.0f}")


if __name__ == "__main__":
    main()
