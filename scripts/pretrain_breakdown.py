"""Where a pretrained tiny VLA fails on its pretraining split: success by scene factor (objects and
receptacles in the scene, overlay, start pose, a jump of the target, what two objects share), and
the phase each failed episode ended in, on calibration episode ids, with 95% Wilson intervals.
Guides the pretraining recipe (docs/STUDY_PROTOCOL.md: tuned on the base's calibration numbers only).

    python scripts/pretrain_breakdown.py --model-path assets/tiny-openvla-twin --episodes 512
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's modules, from anywhere

from cli import parse_cli, require_non_negative, require_positive  # noqa: E402
from common import build_agent, calibration_episode_ids  # noqa: E402
from envs import make_vec_env  # noqa: E402
from evaluate_ood import wilson_interval  # noqa: E402
from twin_env import GRASP_RADIUS, GRIPPER_HOME, TwinVecEnv, decode_episode  # noqa: E402

# What a failed episode got furthest to, in the task's order (a success is "success").
MODES = ("never reached the target", "reached it, no grasp", "grasped the other object only",
         "grasped the target, not placed", "placed it, then lost it")


@dataclass
class Args:
    """Success of a pretrained tiny VLA on its pretraining split, by scene factor and failure mode."""

    model_path: str = "assets/tiny-openvla-twin"
    """the model directory (official OpenVLA layout)"""
    episodes: int = 512
    """calibration episodes to play"""
    temperature: float = 0.6
    """sampling temperature (the study's evaluation temperature)"""
    num_envs: int = 64
    """environments stepped together"""


def check_args(args: Args) -> None:
    require_positive(args, "episodes", "num_envs")
    require_non_negative(args, "temperature")  # 0: greedy


def factors(split: str, episode_id: int) -> dict[str, str]:
    ep = decode_episode(split, episode_id)
    shared = "one object"
    if len(ep.objects) == 2:
        (colour, shape), (other_colour, other_shape) = (name.split() for name in ep.objects)
        shared = "colour" if colour == other_colour else "shape" if shape == other_shape else "nothing"
    return {"scene": f"{len(ep.objects)} object(s), {len(ep.receptacles)} receptacle(s)",
            "overlay": ep.overlay or "none",
            "start": "home" if ep.gripper_xy == GRIPPER_HOME else "elsewhere",
            "jump": "yes" if ep.reposition_xy is not None else "no",
            "shared": shared}


def play(policy, envs: TwinVecEnv, episode_ids: np.ndarray) -> list[str]:
    """Play the episodes to the horizon, num_envs at a time -> each one's outcome: "success" (the
    target on its receptacle at the end, the study's metric) or the furthest phase of MODES."""
    outcomes: list[str] = []
    for start in range(0, len(episode_ids), envs.num_envs):
        ids = episode_ids[start:start + envs.num_envs]
        padded = np.concatenate([ids, np.repeat(ids[-1:], envs.num_envs - len(ids))])
        obs, _ = envs.reset(options={"episode_ids": padded})
        furthest = np.zeros(envs.num_envs, dtype=int)  # index into MODES
        for _ in range(envs.max_episode_steps):
            obs, _, _, _, info = envs.step(policy(obs).actions)
            reached = np.linalg.norm(envs.object_xy[:, 0] - envs.gripper_xy, axis=1) <= GRASP_RADIUS
            for mode, now in ((1, reached), (2, envs.held >= 1), (3, envs.held == 0), (4, info["success"])):
                furthest[now] = np.maximum(furthest[now], mode)
        outcomes += ["success" if done else MODES[mode]
                     for done, mode in zip(info["success"], furthest, strict=True)][:len(ids)]
    return outcomes


def main(args: Args) -> None:
    torch.manual_seed(0)
    agent = build_agent(args.model_path, critic=None, device="cpu")
    ids = calibration_episode_ids("pretrain", args.episodes)
    envs = make_vec_env("pretrain", args.num_envs, agent.image_size, seed=0, env="twin")
    outcomes = np.array(play(agent.as_policy(args.temperature), envs, ids))
    envs.close()
    success = outcomes == "success"
    low, high = wilson_interval(int(success.sum()), len(ids))
    print(f"pretrain: {100 * success.mean():.1f}% [{low:.1f}, {high:.1f}] of {len(ids)} calibration "
          f"episodes at temperature {args.temperature} ({args.model_path})")
    table = [factors("pretrain", int(i)) for i in ids]
    for factor in table[0]:
        for value in sorted({row[factor] for row in table}):
            chosen = np.array([row[factor] == value for row in table])
            wins = int(success[chosen].sum())
            low, high = wilson_interval(wins, int(chosen.sum()))
            failures = Counter(outcomes[chosen & ~success])
            print(f"  {factor:8s} {value:28s} {100 * wins / chosen.sum():5.1f}% [{low:4.1f}, {high:5.1f}]"
                  f"  ({chosen.sum()} episodes; failed: "
                  + ", ".join(f"{mode} {100 * n / chosen.sum():.0f}%" for mode, n in failures.most_common()) + ")")
    print("failed episodes, by the furthest phase reached (share of all episodes):")
    for mode in MODES:
        print(f"  {mode:32s} {100 * np.mean(outcomes == mode):5.1f}%")


if __name__ == "__main__":
    main(parse_cli(Args, check_args))
