"""Where a pretrained tiny VLA fails on its pretraining split: success by scene factor (objects and
receptacles in the scene, overlay, start pose, a jump of the target), on calibration episode ids,
with 95% Wilson intervals. Guides the pretraining recipe (docs/STUDY_PROTOCOL.md: tuned on the
base's calibration numbers only).

    python scripts/pretrain_breakdown.py --model-path assets/tiny-openvla-twin --episodes 512
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's modules, from anywhere

from cli import parse_cli  # noqa: E402
from common import build_agent, calibration_episode_ids, evaluate_policy  # noqa: E402
from envs import make_vec_env  # noqa: E402
from evaluate_ood import wilson_interval  # noqa: E402
from twin_env import GRIPPER_HOME, decode_episode  # noqa: E402


@dataclass
class Args:
    """Success of a pretrained tiny VLA on its pretraining split, by scene factor."""

    model_path: str = "assets/tiny-openvla-twin"
    """the model directory (official OpenVLA layout)"""
    episodes: int = 512
    """calibration episodes to play"""
    temperature: float = 0.6
    """sampling temperature (the study's evaluation temperature)"""
    num_envs: int = 64
    """environments stepped together"""


def factors(split: str, episode_id: int) -> dict[str, str]:
    ep = decode_episode(split, episode_id)
    return {"scene": f"{len(ep.objects)} object(s), {len(ep.receptacles)} receptacle(s)",
            "overlay": ep.overlay or "none",
            "start": "home" if ep.gripper_xy == GRIPPER_HOME else "elsewhere",
            "jump": "yes" if ep.reposition_xy is not None else "no"}


def main(args: Args) -> None:
    torch.manual_seed(0)
    agent = build_agent(args.model_path, critic=None, device="cpu")
    ids = calibration_episode_ids("pretrain", args.episodes)
    envs = make_vec_env("pretrain", args.num_envs, agent.image_size, seed=0, env="twin")
    outcome = evaluate_policy(agent.as_policy(args.temperature), envs, ids)
    envs.close()
    low, high = wilson_interval(int(outcome.success.sum()), len(ids))
    print(f"pretrain: {100 * outcome.success_rate:.1f}% [{low:.1f}, {high:.1f}] of {len(ids)} calibration "
          f"episodes at temperature {args.temperature} ({args.model_path})")
    table = [factors("pretrain", int(i)) for i in ids]
    for factor in table[0]:
        for value in sorted({row[factor] for row in table}):
            chosen = np.array([row[factor] == value for row in table])
            wins = int(outcome.success[chosen].sum())
            low, high = wilson_interval(wins, int(chosen.sum()))
            print(f"  {factor:8s} {value:28s} {100 * wins / chosen.sum():5.1f}% [{low:4.1f}, {high:5.1f}]"
                  f"  ({chosen.sum()} episodes)")


if __name__ == "__main__":
    main(parse_cli(Args))
