"""grpo_vla.py: its math on hand-computed numbers; on the twin, the KL anchor (the policy the run
started from), what is optimised, and resume."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SIZE, save_trained_checkpoint, scalars, with_move_right_bonus
from safetensors.torch import load_file

import grpo_vla
from common import load_checkpoint


def twin_args(tmp_path: Path, **overrides) -> grpo_vla.Args:
    """Small GRPO iterations on the twin: 2 groups of 2 envs, 10-step episodes, tiny model."""
    args = dict(
        env="twin", image_size=SIZE, num_envs=4, group_size=2, max_episode_steps=10, minibatch_size=20,
        grad_accum_steps=1, total_iterations=1, eval_every=0, save_every=1, device="cpu",
        output_dir=str(tmp_path), exp_name="twin",
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


def test_num_envs_must_be_a_multiple_of_group_size() -> None:
    with pytest.raises(ValueError, match=r"--num-envs \(6\) must be a multiple of --group-size \(4\)"):
        grpo_vla.check_args(grpo_vla.Args(num_envs=6, group_size=4))
    with pytest.raises(ValueError, match="group-size must be at least 2"):
        grpo_vla.check_args(grpo_vla.Args(num_envs=6, group_size=1))


def test_kl_is_zero_against_the_starting_adapter_and_grows_as_it_moves(tmp_path: Path, monkeypatch) -> None:
    # Start from a trained adapter: the reference is that policy, not the base model. Each
    # iteration takes one optimizer step at its end, so iteration 1 is scored before any step.
    # The move-right bonus gives the groups different returns, so the policy does move.
    checkpoint = save_trained_checkpoint(tmp_path / "sft" / "checkpoint", "sft", critic=None)
    with_move_right_bonus(monkeypatch, grpo_vla)
    args = twin_args(tmp_path, init_checkpoint=str(checkpoint), image_size=None, kl_coef=0.1,
                     total_iterations=3, grad_accum_steps=1000, minibatch_size=10, learning_rate=1e-2)
    grpo_vla.main(args)
    kl = scalars(tmp_path / "twin", "losses/kl_ref")
    assert len(kl) == 3 and all(math.isfinite(k) and k >= 0 for k in kl)
    assert abs(kl[0]) < 1e-6, f"before any update the policy is the reference, got KL {kl[0]}"
    assert kl[-1] > 1e-4, f"the reference must not follow the adapters (KL {kl[-1]})"
    assert min(scalars(tmp_path / "twin", "grpo/degenerate_group_fraction")) < 1, "precondition: signal"
    _, state = load_checkpoint(tmp_path / "twin" / "checkpoint")
    start, _ = load_checkpoint(checkpoint)
    for name, p in start.named_parameters():  # the saved reference is the starting adapter
        if "lora_" in name:
            torch.testing.assert_close(state["reference_lora"][name], p, rtol=0, atol=0)


def test_only_the_adapters_are_optimised(tmp_path: Path) -> None:
    grpo_vla.main(twin_args(tmp_path))
    agent, state = load_checkpoint(tmp_path / "twin/checkpoint")
    assert state["algorithm"] == "grpo" and state["iteration"] == 1
    assert agent.value_head is None and agent.critic_mode is None
    assert not (tmp_path / "twin/checkpoint/value_head.safetensors").exists()
    (group,) = state["optimizer"]["param_groups"]
    assert len(group["params"]) == len(agent.lora_parameters()), "no critic: nothing else optimised"
    degenerate = scalars(tmp_path / "twin", "grpo/degenerate_group_fraction")
    assert len(degenerate) == 1 and 0.0 <= degenerate[0] <= 1.0


def test_resume_reproduces_an_uninterrupted_run(tmp_path: Path, monkeypatch) -> None:
    with_move_right_bonus(monkeypatch, grpo_vla)  # so that the adapters move
    grpo_vla.main(twin_args(tmp_path / "a", total_iterations=2, kl_coef=0.1))
    grpo_vla.main(twin_args(tmp_path / "b", total_iterations=1, kl_coef=0.1))
    grpo_vla.main(twin_args(tmp_path / "b", total_iterations=2, kl_coef=0.1, resume=True))
    a = load_file(tmp_path / "a/twin/checkpoint/adapter/adapter_model.safetensors")
    b = load_file(tmp_path / "b/twin/checkpoint/adapter/adapter_model.safetensors")
    assert a.keys() == b.keys()
    changed = 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
        changed += int(a[k].abs().sum() > 0)
    assert changed > 0, "two GRPO iterations should have moved the LoRA weights"
    _, state = load_checkpoint(tmp_path / "b/twin/checkpoint")
    assert state["iteration"] == 2
    kl_a, kl_b = scalars(tmp_path / "a/twin", "losses/kl_ref"), scalars(tmp_path / "b/twin", "losses/kl_ref")
    assert kl_b == pytest.approx(kl_a, rel=1e-4, abs=1e-7), "the resumed run kept its reference"
