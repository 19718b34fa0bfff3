"""Learning, end to end, on the 2D twin's multi-step task: each algorithm's own main() takes a
policy from its start to clearly better, in a few CPU minutes.

The chain is the study's (arXiv 2505.19789): the pretrained tiny VLA shipped in
assets/tiny-openvla-twin (the stand-in for pretrained OpenVLA) -> LoRA SFT warm-up on a few
`ind` demos -> PPO, GRPO or DPO from the warm-up. Every run uses its script's README recipe
(`RECIPES["twin"]`, `RECIPES["twin-warmup"]`), with a smaller budget where it still learns
clearly, and evaluates on the same episode ids.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import dpo_vla
import grpo_vla
import ppo_vla
import sft_warmup
from common import build_agent, evaluate_policy, evaluation_episode_ids
from conftest import REPO, scalars
from envs import make_vec_env

PRETRAINED = REPO / "assets" / "tiny-openvla-twin"
pytestmark = pytest.mark.slow


def success_of(policy_agent, episodes: int = 128) -> float:
    """Success on the twin's ind split at temperature 0.6, on the ids every script's eval uses."""
    envs = make_vec_env("ind", 64, policy_agent.image_size, seed=1, env="twin")
    ids = evaluation_episode_ids(1, "ind", episodes)  # = the scripts' eval with --seed 0
    return evaluate_policy(policy_agent.as_policy(0.6), envs, ids).success_rate


@pytest.fixture(scope="module")
def warmup(tmp_path_factory) -> dict:
    """The SFT warm-up from the pretrained base, as `python sft_warmup.py twin-warmup` runs it."""
    root = tmp_path_factory.mktemp("learning")
    base = success_of(build_agent(str(PRETRAINED), critic=None))
    args = replace(sft_warmup.RECIPES["twin-warmup"][1], model_path=str(PRETRAINED), output_dir=str(root),
                   exp_name="warmup", demo_dir=str(root / "demos"))
    metrics = sft_warmup.main(args)
    return {"root": root, "base": base, "success": metrics["eval/success"],
            "checkpoint": str(root / "warmup" / "checkpoint")}


def test_sft_warmup_learns_the_new_task_from_the_pretrained_base(warmup: dict) -> None:
    # ind's plate, tables and instruction template are new to the pretrained model.
    assert warmup["success"] >= warmup["base"] + 0.15, warmup
    assert warmup["success"] >= 0.5, warmup


def ppo_args(warmup: dict, name: str, **overrides) -> ppo_vla.Args:
    return replace(ppo_vla.RECIPES["twin"][1], init_checkpoint=warmup["checkpoint"],
                   output_dir=str(warmup["root"]), exp_name=name, **overrides)


def test_ppo_from_the_warmup_reaches_90_percent(warmup: dict) -> None:
    args = ppo_args(warmup, "ppo")
    assert args.num_steps >= make_vec_env("ind", 1, 8, env="twin").max_episode_steps, \
        "GAE over whole episodes"
    final = ppo_vla.main(args)
    assert final["eval/success"] >= 0.9, f"PPO from {warmup['success']:.2f}: {final}"
    explained = scalars(warmup["root"] / "ppo", "losses/explained_variance")
    assert np.mean(explained[-3:]) > np.mean(explained[:2]) + 0.1, f"the critic learns: {explained}"


def test_ppo_learns_the_same_under_torchrun_with_two_ranks(warmup: dict) -> None:
    # Half the envs per rank: the same global batch as the one-process run above.
    args = ppo_args(warmup, "ppo_ddp")
    flags = ["--env", "twin", "--init-checkpoint", warmup["checkpoint"], "--output-dir", str(warmup["root"]),
             "--exp-name", "ppo_ddp", "--num-envs", str(args.num_envs // 2)]
    subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2",
                    "ppo_vla.py", "twin", *flags], cwd=REPO, check=True, capture_output=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    success = scalars(warmup["root"] / "ppo_ddp", "eval/success")
    assert success[-1] >= 0.9, success


def test_grpo_from_the_warmup_gets_clearly_better(warmup: dict) -> None:
    args = replace(grpo_vla.RECIPES["twin"][1], init_checkpoint=warmup["checkpoint"],
                   output_dir=str(warmup["root"]), exp_name="grpo")
    final = grpo_vla.main(args)
    assert final["eval/success"] >= warmup["success"] + 0.1, (warmup["success"], final)


def test_dpo_from_the_warmup_gets_clearly_better(warmup: dict) -> None:
    args = replace(dpo_vla.RECIPES["twin"][1], init_checkpoint=warmup["checkpoint"],
                   output_dir=str(warmup["root"]), exp_name="dpo")
    final = dpo_vla.main(args)
    assert final["eval/success"] >= warmup["success"] + 0.1, (warmup["success"], final)
