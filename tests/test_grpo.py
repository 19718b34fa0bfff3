"""grpo_vla.py: its math on hand-computed numbers, its learning, its checkpoints and resume."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import grpo_vla
from common import load_checkpoint

REPO = Path(__file__).resolve().parents[1]


def scalars(run_dir: Path, tag: str) -> list[float]:
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return [e.value for e in events.Scalars(tag)]


def toy_args(tmp_path: Path, **overrides) -> grpo_vla.Args:
    """A small GRPO run on the toy task: one-step episodes, 16 groups of 8, tiny model at 56 px.

    Tuned on this CPU (45 iterations, eval at the end, seeds 0-2). Without a KL term GRPO
    sometimes locks an initial state onto one wrong action, e.g. dy fixed whatever the image
    says: every sample of its groups then fails, the groups are degenerate and nothing pulls
    the policy back (eval 0.46-1.0 across seeds, group sizes 8 and 16 and temperature 1.3). A
    KL penalty of 0.1 to the initial policy keeps each group's samples diverse: eval 0.97-1.0.
    lr 1e-2 collapsed at once; 2 epochs at 1e-3 reached 90% and then fell back.
    """
    args = dict(
        split="toy", num_envs=128, group_size=8, max_episode_steps=1, image_size=56,
        minibatch_size=32, grad_accum_steps=1, epochs=1, learning_rate=1e-3, kl_coef=0.1,
        total_iterations=45, eval_every=45, eval_episodes=256, save_every=1000,
        output_dir=str(tmp_path), exp_name="toy",
    )
    args.update(overrides)
    return grpo_vla.Args(**args)


def test_group_advantages_on_known_numbers() -> None:
    returns = torch.tensor([1.0, 0.0, 0.0, 0.0,    # one success in four
                            2.0, 0.0, 2.0, 0.0,    # mean 1, population std 1
                            0.2, 0.2, 0.2, 0.2,    # all equal: nothing to learn
                            0.0, 0.0, 0.0, 0.0])   # all failed: nothing to learn
    adv, stats = grpo_vla.group_relative_advantages(returns, group_size=4)
    # Group 0: mean 0.25, std sqrt(0.25 * 0.75) = 0.4330 -> 0.75 / 0.433 = 1.7321, -0.25 / 0.433 = -0.5774.
    s = math.sqrt(3)
    expected = torch.tensor([s, -1 / s, -1 / s, -1 / s, 1.0, -1.0, 1.0, -1.0, 0, 0, 0, 0, 0, 0, 0, 0])
    torch.testing.assert_close(adv, expected)
    assert stats["degenerate_group_fraction"] == 0.5
    assert stats["group_return_std"] == pytest.approx((math.sqrt(0.1875) + 1.0) / 4)


def test_equal_returns_up_to_float_noise_give_zero_advantage() -> None:
    # Potential-shaped rewards: both trajectories end with phi = 0.1 (grasped, not placed), but
    # the first succeeded for a step on the way, and 0.1 + 1.0 - 1.0 != 0.1 in float32.
    rewards = torch.tensor([[0.1, 0.1], [1.0, 0.0], [-1.0, 0.0]])  # [T, N]
    returns = rewards.sum(dim=0)
    assert returns[0] != returns[1]
    adv, stats = grpo_vla.group_relative_advantages(returns, group_size=2)
    torch.testing.assert_close(adv, torch.zeros(2))
    assert stats["degenerate_group_fraction"] == 1.0


def test_grouped_episode_ids_repeat_each_fresh_id_group_size_times() -> None:
    ids = grpo_vla.grouped_episode_ids(np.random.default_rng(0), num_envs=12, group_size=4)
    groups = ids.reshape(3, 4)
    assert (groups == groups[:, :1]).all(), "every env of a group starts from the same episode"
    assert len(set(groups[:, 0])) == 3, "different groups start from different episodes"


def test_clipped_policy_loss_and_kl_penalty_on_known_numbers() -> None:
    new = torch.tensor([math.log(1.5), math.log(1.5), math.log(0.5), math.log(0.5)])
    old = torch.zeros(4)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    loss, stats = grpo_vla.clipped_policy_loss(new, old, adv, clip_coef=0.2)
    # Per sample max(-A r, -A clip(r)): -1.2, 1.5, -0.5, 0.8 -> mean 0.15.
    assert loss.item() == pytest.approx(0.15, abs=1e-6)
    assert stats["clipfrac"] == 1.0
    # k3 with r = p_ref / p_new = 2: 2 - log 2 - 1; and 0 when the policy is the reference.
    kl = grpo_vla.kl_to_reference(torch.tensor([0.0, -1.0]), torch.tensor([math.log(2.0), -1.0]))
    torch.testing.assert_close(kl, torch.tensor([1.0 - math.log(2.0), 0.0]))


def test_num_envs_must_be_a_multiple_of_group_size(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="multiple of --group-size"):
        grpo_vla.main(toy_args(tmp_path, num_envs=6, group_size=4))
    proc = subprocess.run([sys.executable, "grpo_vla.py", "--split", "toy", "--num-envs", "6", "--group-size",
                           "4", "--output-dir", str(tmp_path)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "error: --num-envs (6) must be a multiple of --group-size (4)"


@pytest.mark.slow
def test_grpo_learns_toy_task_from_chance(tmp_path: Path) -> None:
    args = toy_args(tmp_path)
    final = grpo_vla.main(args)
    success = scalars(tmp_path / "toy", "rollout/success")
    assert len(success) == args.total_iterations
    assert success[0] < 0.35, f"the untrained policy should be near chance (~12%), got {success[0]}"
    assert final["eval/success"] >= 0.9, f"GRPO should solve the toy task, got {final['eval/success']}"
    degenerate = scalars(tmp_path / "toy", "grpo/degenerate_group_fraction")
    assert len(degenerate) == args.total_iterations and 0.0 <= min(degenerate) <= max(degenerate) <= 1.0
    assert all(math.isfinite(kl) and kl >= 0 for kl in scalars(tmp_path / "toy", "losses/kl_ref"))


def test_kl_penalty_is_zero_at_the_start_and_grows_as_the_adapters_move(tmp_path: Path) -> None:
    # LoRA starts as the identity, so the policy IS the reference until the first optimizer step.
    args = toy_args(tmp_path, total_iterations=3, kl_coef=0.1, grad_accum_steps=1000, learning_rate=1e-2,
                    num_envs=32, eval_every=0)
    grpo_vla.main(args)
    kl = scalars(tmp_path / "toy", "losses/kl_ref")
    assert len(kl) == 3
    assert abs(kl[0]) < 1e-5, f"before any update the reference should equal the policy, got KL {kl[0]}"
    assert kl[-1] > 1e-4, f"the reference must not follow the adapters (KL {kl[-1]})"


def test_only_the_adapters_are_optimised(tmp_path: Path) -> None:
    grpo_vla.main(toy_args(tmp_path, total_iterations=1, save_every=1, eval_every=0, num_envs=32))
    agent, state = load_checkpoint(tmp_path / "toy/checkpoint")
    assert state["algorithm"] == "grpo"
    (group,) = state["optimizer"]["param_groups"]
    assert len(group["params"]) == len(list(agent.lora_parameters())), "no critic: value head not optimised"
    fresh = grpo_vla.build_agent("tiny", None, image_size=56, device="cpu", seed=0)
    for p_fresh, p_trained in zip(fresh.value_head_parameters(), agent.value_head_parameters(), strict=True):
        torch.testing.assert_close(p_fresh, p_trained)


def test_resume_reproduces_an_uninterrupted_run(tmp_path: Path) -> None:
    straight = toy_args(tmp_path / "a", total_iterations=2, save_every=1, eval_every=0, num_envs=32)
    grpo_vla.main(straight)
    first_half = toy_args(tmp_path / "b", total_iterations=1, save_every=1, eval_every=0, num_envs=32)
    grpo_vla.main(first_half)
    grpo_vla.main(toy_args(tmp_path / "b", total_iterations=2, save_every=1, eval_every=0, num_envs=32,
                           resume=True))
    a = load_file(tmp_path / "a/toy/checkpoint/adapter/adapter_model.safetensors")
    b = load_file(tmp_path / "b/toy/checkpoint/adapter/adapter_model.safetensors")
    assert a.keys() == b.keys()
    changed = 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
        changed += int(a[k].abs().sum() > 0)
    assert changed > 0, "two GRPO iterations should have moved the LoRA weights"
    _, state = load_checkpoint(tmp_path / "b/toy/checkpoint")
    assert state["iteration"] == 2


@pytest.mark.slow
def test_short_run_on_maniskill_writes_logs_and_a_loadable_checkpoint(tmp_path: Path) -> None:
    args = grpo_vla.Args(split="ind", num_envs=2, group_size=2, max_episode_steps=8, image_size=56,
                         minibatch_size=4, grad_accum_steps=2, total_iterations=1, eval_every=1,
                         eval_episodes=2, output_dir=str(tmp_path), exp_name="sim")
    metrics = grpo_vla.main(args)
    assert 0.0 <= metrics["eval/success"] <= 1.0
    assert list((tmp_path / "sim").glob("events.out.tfevents.*"))
    agent, state = load_checkpoint(tmp_path / "sim/checkpoint")
    assert state["iteration"] == 1 and state["algorithm"] == "grpo"
    assert math.isfinite(scalars(tmp_path / "sim", "losses/policy_loss")[0])
    assert scalars(tmp_path / "sim", "grpo/degenerate_group_fraction")[0] in (0.0, 1.0)
