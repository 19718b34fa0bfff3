"""What each split looks like: the scripted expert on splits, as a contact sheet (`make splits`).

    python scripts/contact_sheet.py --env twin --split all --episodes 2 --out results/twin_splits.png
    python scripts/contact_sheet.py --env maniskill --split unseen_table --episodes 4
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's modules, from anywhere
matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from cli import parse_cli  # noqa: E402
from common import EpisodeLoop, expert_policy  # noqa: E402
from envs import make_vec_env  # noqa: E402
from tasks import ENV_FAMILIES, check_split, valid_splits  # noqa: E402


@dataclass
class Args:
    """Run the scripted expert on splits and draw a contact sheet (first, middle and last frame
    of each episode, with its instruction and outcome): `python scripts/contact_sheet.py --env twin --split all`."""

    env: str = "twin"
    """task family: 'twin' (the 2D twin, seconds) or 'maniskill' (the benchmark, minutes)"""
    split: str = "all"
    """'all', or one of: ind, unseen_table, texture_weak, texture_strong, noise_weak,
    noise_strong, unseen_objects, unseen_receptacles, unseen_instructions, multi_object_seen,
    multi_object_unseen, distractor_receptacle, multi_receptacle, unseen_position,
    unseen_robot_pose, reposition (and pretrain for the twin)"""
    episodes: int = 2
    """episodes per split (episode ids 0 .. episodes-1)"""
    image_size: int = 112
    """rendered image size in pixels"""
    out: str = "results/contact_sheet.png"
    """where to write the contact sheet"""


def check_cli_args(args: Args) -> None:
    if args.split != "all":
        check_split(args.split, args.env)
    elif args.env not in ENV_FAMILIES:
        raise ValueError(f"unknown env {args.env!r}; valid: {', '.join(ENV_FAMILIES)}")
    if args.episodes < 1 or args.image_size < 8:
        raise ValueError("--episodes must be >= 1 and --image-size >= 8")


def contact_sheet(args: Args) -> None:
    splits = list(valid_splits(args.env)) if args.split == "all" else [args.split]
    fig, axes = plt.subplots(len(splits), 3 * args.episodes, squeeze=False,
                             figsize=(3 * args.episodes * 1.3, len(splits) * 1.45))
    envs = make_vec_env(splits[0], args.episodes, args.image_size, env=args.env)
    try:
        for row, split in enumerate(splits):
            if envs.split != split:
                envs.set_split(split)
            ids = np.arange(args.episodes)
            rollout = EpisodeLoop(envs, lambda ids=ids: ids).run(expert_policy(envs), envs.max_episode_steps)
            frames = np.concatenate([rollout.images.numpy(), rollout.final_images[None]])  # [T + 1, N, ...]
            rate = float(rollout.episode_success.mean())
            print(f"{split:24s} expert success {rate:6.1%} ({args.episodes} episodes)", flush=True)
            for n in range(args.episodes):
                for k, t in enumerate((0, len(frames) // 2, len(frames) - 1)):
                    ax = axes[row, 3 * n + k]
                    ax.imshow(frames[t, n])
                    ax.set_xticks([])
                    ax.set_yticks([])
                    ok = "ok" if rollout.episode_success[n] else "fail"
                    ax.set_title(rollout.instructions[0][n] if k == 0 else f"t={t}" + (f" {ok}" if k == 2 else ""),
                                 fontsize=5)
            axes[row, 0].set_ylabel(f"{split}\n{rate:.0%}", fontsize=6)
    finally:
        envs.close()
    fig.tight_layout(pad=0.3)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=150)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    contact_sheet(parse_cli(Args, check_cli_args))
