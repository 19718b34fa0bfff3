"""Rollout cost on the real ManiSkill env: overhead, a pipelined rollout, vector-env scaling.

    .venv/bin/python benchmarks/bench_rollout.py

Tiny preset, split "ind", N envs (--num-envs) for T steps (--steps); the envs' horizon is T, so
one rollout is one episode: a reset, then T x (act, step). Three results, measured side by side
in one run, --repeats times interleaved (medians), because on a machine shared with other jobs
absolute times drift and only ratios taken in the same run hold:

1. Overhead of common.EpisodeLoop: env-only (reset + T steps of the N envs in N worker
   processes, fixed random actions), policy-only (agent.act on the observations recorded there,
   batch N, T calls) and the full rollout on the same envs; (env + policy) / full is 1.0 when the
   rollout costs no more than its parts (target >= 0.9).
2. A pipelined rollout (pipelined_rollout below): the N envs as two VecEnvs of N/2 (N/2 workers
   each); while one half steps in its workers (VecEnv.step_async / step_wait), the policy acts
   on the other half's observations, at batch N/2. (env + policy) / pipelined > 1.0 when the
   two overlap. Only this benchmark has that loop: the training scripts use EpisodeLoop.
3. Scaling: env-steps/s of 1 in-process env against N envs in N worker processes, same T steps.
Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import ActorCritic, EpisodeLoop, build_agent  # noqa: E402  (repo root: no package)
from envs import make_vec_env  # noqa: E402
from maniskill_env import VecEnv  # noqa: E402

SPLIT = "ind"
TEMPERATURE = 1.0  # sampling, as in PPO's rollouts


def seconds(fn: Callable[[], object]) -> float:
    """Wall-clock seconds of one call."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def env_only(envs: VecEnv, episode_ids: np.ndarray,
             actions: np.ndarray) -> tuple[float, float, list[dict]]:
    """Reset, then step with the given actions [T, N, 7]: (reset seconds, step seconds, the
    observation before each step, for the policy to act on)."""
    start = time.perf_counter()
    observations = [envs.reset(options={"episode_ids": episode_ids})[0]]
    reset_seconds = time.perf_counter() - start
    for action in actions:
        observations.append(envs.step(action)[0])
    return reset_seconds, time.perf_counter() - start - reset_seconds, observations[:-1]


def policy_only(agent: ActorCritic, observations: list[dict]) -> None:
    for obs in observations:
        agent.act(obs["image"], obs["instruction"], TEMPERATURE)


def pipelined_rollout(agent: ActorCritic, halves: tuple[VecEnv, VecEnv], episode_ids: np.ndarray,
                      steps: int) -> np.ndarray:
    """One episode of `steps` steps in two half-batches, the policy on one half while the other
    steps in its worker processes. Rewards [steps, N]. Not wired into the training scripts."""
    first, second = halves
    obs_first, _ = first.reset(options={"episode_ids": episode_ids[:first.num_envs]})
    obs_second, _ = second.reset(options={"episode_ids": episode_ids[first.num_envs:]})
    rewards_first, rewards_second = [], []

    def act(obs: dict) -> np.ndarray:
        return agent.act(obs["image"], obs["instruction"], TEMPERATURE).actions

    first.step_async(act(obs_first))
    for t in range(steps):
        second.step_async(act(obs_second))  # the policy ran while `first` stepped
        obs_first, reward, _, _, _ = first.step_wait()
        rewards_first.append(reward)
        if t < steps - 1:
            first.step_async(act(obs_first))  # the policy runs while `second` steps
        obs_second, reward, _, _, _ = second.step_wait()
        rewards_second.append(reward)
    return np.concatenate([np.stack(rewards_first), np.stack(rewards_second)], axis=1)


def warm_up(agent: ActorCritic, env_sets: list[VecEnv]) -> None:
    """One reset, act and step on every VecEnv: first frames and first calls cost extra."""
    for envs in env_sets:
        obs, _ = envs.reset(options={"episode_ids": np.arange(envs.num_envs)})
        envs.step(agent.act(obs["image"], obs["instruction"], TEMPERATURE).actions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-envs", type=int, default=4,
                        help="N envs, one worker process each (even: the pipeline splits them)")
    parser.add_argument("--steps", type=int, default=20, help="T steps per rollout (the horizon)")
    parser.add_argument("--image-size", type=int, default=112, help="env and model image size")
    parser.add_argument("--device", default="cpu", help="torch device of the policy")
    parser.add_argument("--repeats", type=int, default=3,
                        help="interleaved repeats of every measurement (medians are reported)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads in this process (the env workers use 1 each)")
    args = parser.parse_args()
    if args.num_envs < 2 or args.num_envs % 2:
        parser.error("--num-envs must be even and >= 2")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n, steps, size = args.num_envs, args.steps, args.image_size

    agent = build_agent(image_size=size, device=args.device)
    episode_ids = np.arange(n)
    actions = np.random.default_rng(0).uniform(-1, 1, (steps, n, 7)).astype(np.float32)
    times: dict[str, list[float]] = {key: [] for key in
                                     ("env", "env_steps", "policy", "full", "pipelined", "single")}
    with ExitStack() as stack:
        start = time.perf_counter()
        def opened(envs: VecEnv) -> VecEnv:  # closed when the stack unwinds
            stack.callback(envs.close)
            return envs

        envs = opened(make_vec_env(SPLIT, n, size, max_episode_steps=steps, num_workers=n))
        halves = tuple(opened(make_vec_env(SPLIT, n // 2, size, max_episode_steps=steps,
                                           num_workers=n // 2)) for _ in range(2))
        single = opened(make_vec_env(SPLIT, 1, size, max_episode_steps=steps))
        print(f"{SPLIT}, {size}px, {n} envs x {steps} steps, tiny preset on {args.device} "
              f"(torch threads: {torch.get_num_threads()}); envs started in "
              f"{time.perf_counter() - start:.0f} s")
        warm_up(agent, [envs, *halves, single])

        for repeat in range(args.repeats):
            reset_s, steps_s, observations = env_only(envs, episode_ids, actions)
            times["env"].append(reset_s + steps_s)
            times["env_steps"].append(steps_s)
            times["policy"].append(seconds(lambda obs=observations: policy_only(agent, obs)))
            times["full"].append(seconds(lambda: EpisodeLoop(envs, lambda: episode_ids).run(
                agent.as_policy(TEMPERATURE), steps)))
            times["pipelined"].append(seconds(
                lambda: pipelined_rollout(agent, halves, episode_ids, steps)))
            times["single"].append(env_only(single, episode_ids[:1], actions[:, :1])[1])
            print(f"repeat {repeat + 1}: " + ", ".join(
                f"{key} {values[-1]:.2f} s" for key, values in times.items()))

    env, policy, full, pipelined = (statistics.median(times[key])
                                    for key in ("env", "policy", "full", "pipelined"))
    overhead_ratio, pipelined_ratio = (env + policy) / full, (env + policy) / pipelined
    print(f"RESULT rollout overhead: env-only {env:.2f} s + policy-only {policy:.2f} s vs "
          f"EpisodeLoop {full:.2f} s: ratio {overhead_ratio:.2f} "
          f"(target >= 0.9: {'met' if overhead_ratio >= 0.9 else 'NOT met'})")
    print(f"RESULT pipelined rollout (2 x {n // 2} envs): {pipelined:.2f} s vs env-only + "
          f"policy-only {env + policy:.2f} s: ratio {pipelined_ratio:.2f} "
          f"({'overlap' if pipelined_ratio > 1 else 'NO overlap'}); "
          f"{full / pipelined:.2f}x the speed of EpisodeLoop")
    one = steps / statistics.median(times["single"])
    many = n * steps / statistics.median(times["env_steps"])
    print(f"RESULT vector-env scaling: 1 env {one:.1f} env-steps/s, {n} envs in {n} workers "
          f"{many:.1f} env-steps/s: {many / one:.2f}x")


if __name__ == "__main__":
    main()
