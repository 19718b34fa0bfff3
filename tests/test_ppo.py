"""ppo_vla.py: its math on hand-computed numbers; on the twin, episodes that span iterations,
the skipped policy step, divergence, checkpoints, resume and its TensorBoard logs."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    REPO,
    SIZE,
    assert_one_line_error,
    observations,
    run_cli,
    scalar_events,
    scalars,
    tiny_agent,
    with_move_right_bonus,
)
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import grpo_vla
import ppo_vla
from common import EpisodeLoop, NonFiniteError, build_agent, load_checkpoint
from envs import make_vec_env
from twin_env import TWIN_HORIZON


def twin_args(tmp_path: Path, **overrides) -> ppo_vla.Args:
    """A few small PPO iterations on the twin: 2 envs x 10 steps, tiny model at SIZE px."""
    args = dict(
        env="twin", image_size=SIZE, num_envs=2, num_steps=10, minibatch_size=10, grad_accum_steps=1,
        total_iterations=2, eval_every=0, save_every=1, device="cpu", output_dir=str(tmp_path),
        exp_name="twin",
    )
    args.update(overrides)
    return ppo_vla.Args(**args)


def adapter(run_dir: Path, folder: str = "adapter") -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoint" / folder / "adapter_model.safetensors")


# ---------------------------------------------------------------------------- the math


def test_gae_matches_hand_computed_case_with_episode_ends() -> None:
    # env 0 ends an episode after step 1; env 1 after step 2 (so its next_value is ignored).
    rewards = torch.tensor([[1.0, 0.0], [0.0, 0.0], [2.0, 1.0]])
    values = torch.tensor([[0.5, 0.0], [0.2, 0.0], [0.4, 0.0]])
    dones = torch.tensor([[False, False], [True, False], [False, True]])
    next_value = torch.tensor([1.0, 5.0])
    adv, ret = ppo_vla.compute_gae(rewards, values, dones, next_value, gamma=0.5, gae_lambda=0.5)
    # By hand: env 0, t=2: 2 + 0.5*1.0 - 0.4 = 2.1; t=1: 0 - 0.2 = -0.2 (episode end, no
    # bootstrap); t=0: (1 + 0.5*0.2 - 0.5) + 0.25*(-0.2) = 0.55. env 1: 1, 0.25, 0.0625.
    torch.testing.assert_close(adv, torch.tensor([[0.55, 0.0625], [-0.2, 0.25], [2.1, 1.0]]))
    torch.testing.assert_close(ret, adv + values)


def test_the_update_s_joint_logprob_is_the_rollout_s(agent) -> None:
    # ppo_vla.py writes the joint log-prob out (7 token log-probs summed, at the temperature):
    # before any update it must equal what act() sampled with, or every ratio starts off 1.
    images = observations(8, seed=3)
    instructions = ["put red ball on plate", "put the blue cube on the plate"] * 4  # two lengths: padding
    for temperature in (1.0, 0.6):
        torch.manual_seed(0)
        out = agent.act(images, instructions, temperature)
        logits, index, _ = agent.teacher_forced(images, instructions, out.tokens)
        logprob, entropy = ppo_vla.joint_logprob_and_entropy(logits, index, temperature)
        torch.testing.assert_close(logprob, out.logprob.float(), rtol=0, atol=1e-5)
        assert logprob.shape == entropy.shape == (8,) and (entropy > 0).all()
        grpo_logprob, _ = grpo_vla.joint_logprob_and_entropy(logits, index, temperature)
        assert torch.equal(grpo_logprob, logprob), "GRPO's copy of the lines computes the same"


def test_clipped_policy_loss_on_known_numbers() -> None:
    new = torch.tensor([math.log(1.5), math.log(1.5), math.log(0.5), math.log(0.5)])
    old = torch.zeros(4)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    loss, stats = ppo_vla.clipped_policy_loss(new, old, adv, clip_coef=0.2)
    # Per sample max(-A r, -A clip(r)): -1.2, 1.5, -0.5, 0.8 -> mean 0.15.
    assert loss.item() == pytest.approx(0.15, abs=1e-6)
    assert stats["clipfrac"] == 1.0
    unclipped, stats = ppo_vla.clipped_policy_loss(old, old, adv, clip_coef=0.2)
    assert unclipped.item() == pytest.approx(0.0) and stats["approx_kl"] == pytest.approx(0.0)


def test_clipped_value_loss_on_known_numbers() -> None:
    old = torch.tensor([0.0, 0.0])
    new = torch.tensor([1.0, 0.1])
    returns = torch.tensor([1.0, 1.0])
    # Sample 0: raw error 0 but clipped value 0.2 -> 0.5 * 0.8^2 = 0.32 (pessimistic max).
    # Sample 1: inside the clip range: 0.5 * 0.9^2 = 0.405.
    loss = ppo_vla.clipped_value_loss(new, old, returns, clip=0.2, huber_delta=10.0)
    assert loss.item() == pytest.approx((0.32 + 0.405) / 2)
    # Past delta the Huber loss is linear: delta * (|e| - delta / 2) = 0.5 * (2 - 0.25).
    far = ppo_vla.clipped_value_loss(torch.tensor([2.0]), torch.tensor([2.0]), torch.tensor([0.0]), 0.2, 0.5)
    assert far.item() == pytest.approx(0.875)


def test_explained_variance() -> None:
    returns = torch.tensor([1.0, 2.0, 3.0])
    assert ppo_vla.explained_variance(returns, returns) == pytest.approx(1.0)
    assert ppo_vla.explained_variance(torch.full((3,), 2.0), returns) == pytest.approx(0.0)
    assert math.isnan(ppo_vla.explained_variance(returns, torch.ones(3)))


def test_bootstrap_value_is_the_value_of_the_next_observation() -> None:
    agent = tiny_agent()
    envs = make_vec_env("ind", 2, SIZE, env="twin")
    loop = EpisodeLoop(envs)
    cut = loop.run(agent.as_policy(1.0), 5)  # mid-episode
    value = ppo_vla.bootstrap_value(agent, cut, 1.0)
    tokens = cut.tokens[0]  # h0's value does not depend on the tokens that follow it
    with torch.no_grad():
        expected = agent.score_actions(cut.last_obs["image"], cut.last_obs["instruction"], tokens)[2]
    torch.testing.assert_close(value, expected, atol=1e-5, rtol=0)
    assert (value != 0).all()
    ended = loop.run(agent.as_policy(1.0), envs.max_episode_steps - 5)  # to the end of the episode
    assert ended.last_obs is None
    assert torch.equal(ppo_vla.bootstrap_value(agent, ended, 1.0), torch.zeros(2))


# ---------------------------------------------------------------------------- runs on the twin


def test_episodes_longer_than_an_iteration_are_trained_on_every_step(tmp_path: Path, monkeypatch) -> None:
    """--num-steps 10 on the 30-step twin: iterations 1-3 play one episode, 10 steps each, and
    iteration 4 starts the next; every step is trained on; cuts are bootstrapped."""
    assert TWIN_HORIZON == 30
    loops, gae_calls, batches = [], [], []

    class RecordingLoop(EpisodeLoop):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.record: list[tuple] = []
            loops.append(self)

        def run(self, *a, **kw):
            rollout = super().run(*a, **kw)
            self.record.append((rollout, self.envs.t))
            return rollout

    real_gae, real_update = ppo_vla.compute_gae, ppo_vla.ppo_update

    def recording_gae(rewards, values, dones, next_value, *a):
        gae_calls.append(next_value.clone())
        return real_gae(rewards, values, dones, next_value, *a)

    def recording_update(agent, optimizer, batch, *a):
        batches.append({k: batch[k] for k in ("images", "tokens", "logprobs")})
        return real_update(agent, optimizer, batch, *a)

    monkeypatch.setattr(ppo_vla, "EpisodeLoop", RecordingLoop)
    monkeypatch.setattr(ppo_vla, "compute_gae", recording_gae)
    monkeypatch.setattr(ppo_vla, "ppo_update", recording_update)
    args = twin_args(tmp_path, num_steps=10, total_iterations=4, save_every=100)
    ppo_vla.main(args)

    (loop,) = loops
    rollouts, steps_done = zip(*loop.record, strict=True)
    assert steps_done == (10, 20, 30, 10), "the env's step counter: one episode over 3 iterations"
    ids = [r.episode_ids for r in rollouts]
    assert all((i == ids[0][0]).all() for i in ids[:3]), "iterations 1-3 continue the same episodes"
    assert not (ids[3] == ids[0][0]).any(), "iteration 4 starts new ones"
    assert [r.dones.any(1).nonzero().flatten().tolist() for r in rollouts] == [[], [], [9], []]
    assert [len(r.episode_returns) for r in rollouts] == [0, 0, 2, 0]
    # Every step of every rollout went into the update, as it was recorded.
    assert len(batches) == 4
    for rollout, batch in zip(rollouts, batches, strict=True):
        assert len(batch["logprobs"]) == args.num_envs * args.num_steps
        assert torch.equal(batch["images"], rollout.flat("images"))
        assert torch.equal(batch["tokens"], rollout.flat("tokens"))
    # A cut episode is bootstrapped from the next observation's value; an ended one is not.
    assert all((v != 0).all() for v in (gae_calls[0], gae_calls[1], gae_calls[3]))
    assert torch.equal(gae_calls[2], torch.zeros(2))
    returns = scalars(tmp_path / "twin", "rollout/episodic_return")
    assert [math.isnan(r) for r in returns] == [True, True, False, True]


def test_an_evaluation_between_iterations_restarts_the_episodes(tmp_path: Path, monkeypatch) -> None:
    # The evaluation plays whole episodes in the training envs: the cut episode is gone, so the
    # next iteration starts new ones instead of stepping envs whose episodes are over.
    loops = []

    class RecordingLoop(EpisodeLoop):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.ids: list[torch.Tensor] = []
            loops.append(self)

        def run(self, *a, **kw):
            rollout = super().run(*a, **kw)
            self.ids.append(rollout.episode_ids[0])
            return rollout

    monkeypatch.setattr(ppo_vla, "EpisodeLoop", RecordingLoop)
    metrics = ppo_vla.main(twin_args(tmp_path, num_steps=5, max_episode_steps=12, eval_every=1,
                                     eval_episodes=2, total_iterations=2, save_every=100))
    first, second = loops[0].ids
    assert not (first == second).any(), "iteration 2 did not continue iteration 1's episodes"
    assert len(scalars(tmp_path / "twin", "eval/success")) == 3 and 0 <= metrics["eval/success"] <= 1  # and the start


def test_a_batch_of_equal_rewards_trains_only_the_critic(tmp_path: Path) -> None:
    # A random tiny policy never grasps on the twin: every reward is 0, advantages are noise.
    # With a separate critic, the policy's adapter then gets no gradient at all.
    args = twin_args(tmp_path, total_iterations=1, critic="separate")
    ppo_vla.main(args)
    run = tmp_path / "twin"
    assert scalars(run, "rollout/reward_per_step") == [0.0], "precondition: all rewards equal"
    assert scalars(run, "losses/skipped_policy_steps") == [1.0]
    fresh = build_agent(image_size=SIZE, critic="separate", seed=args.seed)
    start = {n: p for n, p in fresh.policy.named_parameters() if "lora_" in n}
    saved, _ = load_checkpoint(run / "checkpoint")
    for name, p in saved.policy.named_parameters():
        if "lora_" in name:
            torch.testing.assert_close(p, start[name], rtol=0, atol=0, msg=name)
    moved = [not torch.equal(p, q) for p, q in zip(saved.value_head_parameters(),
                                                  fresh.value_head_parameters(), strict=True)]
    assert all(moved), "the value head still learns"
    critic_lora = {n: p for n, p in fresh.critic_model.named_parameters() if "lora_B" in n}
    assert any(not torch.equal(p, critic_lora[n]) for n, p in saved.critic_model.named_parameters()
               if "lora_B" in n), "and so do the critic's adapters"


def test_a_batch_with_reward_differences_trains_the_policy(tmp_path: Path, monkeypatch) -> None:
    with_move_right_bonus(monkeypatch, ppo_vla)
    ppo_vla.main(twin_args(tmp_path, total_iterations=1, critic="separate"))
    run = tmp_path / "twin"
    assert scalars(run, "losses/skipped_policy_steps") == [0.0]
    assert sum(v.abs().sum().item() for k, v in adapter(run).items() if "lora_B" in k) > 0


def test_resume_reproduces_an_uninterrupted_run(tmp_path: Path) -> None:
    # Iterations end with their episodes (num_steps = horizon): a resumed run starts new
    # episodes, as the uninterrupted one does.
    small = dict(num_steps=10, max_episode_steps=10)
    ppo_vla.main(twin_args(tmp_path / "a", total_iterations=2, **small))
    ppo_vla.main(twin_args(tmp_path / "b", total_iterations=1, **small))
    ppo_vla.main(twin_args(tmp_path / "b", total_iterations=2, resume=True, **small))
    a, b = adapter(tmp_path / "a/twin"), adapter(tmp_path / "b/twin")
    assert a.keys() == b.keys()
    changed = 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
        changed += int(a[k].abs().sum() > 0)
    assert changed > 0, "two PPO iterations should have moved the LoRA weights"
    head_a = load_file(tmp_path / "a/twin/checkpoint/value_head.safetensors")
    head_b = load_file(tmp_path / "b/twin/checkpoint/value_head.safetensors")
    for k in head_a:
        torch.testing.assert_close(head_a[k], head_b[k], rtol=1e-5, atol=1e-6)
    _, state = load_checkpoint(tmp_path / "b/twin/checkpoint")
    assert state["iteration"] == 2 and state["algorithm"] == "ppo"


def test_a_resumed_run_logs_one_point_per_iteration(tmp_path: Path, monkeypatch) -> None:
    """Killed in iteration 4 with its checkpoint at 2 (iteration 3 already logged), then
    resumed: TensorBoard shows iterations 1-4 once each."""
    real_make_writer = ppo_vla.make_writer

    def flushing_writer(*a, **kw):  # what a run that logged for a while has on disk
        writer = real_make_writer(*a, **kw)
        add_scalar = writer.add_scalar

        def add_and_flush(*b, **kwb):
            add_scalar(*b, **kwb)
            writer.flush()

        writer.add_scalar = add_and_flush
        return writer

    rollouts = []

    class KilledInIteration4(EpisodeLoop):
        def run(self, *a, **kw):
            rollouts.append(1)
            if len(rollouts) == 4:
                raise KeyboardInterrupt
            return super().run(*a, **kw)

    args = twin_args(tmp_path, total_iterations=4, save_every=2, keep_checkpoints=True)
    with monkeypatch.context() as patch:
        patch.setattr(ppo_vla, "make_writer", flushing_writer)
        patch.setattr(ppo_vla, "EpisodeLoop", KilledInIteration4)
        with pytest.raises(KeyboardInterrupt):
            ppo_vla.main(args)
    run = tmp_path / "twin"
    assert load_checkpoint(run / "checkpoint")[1]["iteration"] == 2
    (killed_log,) = run.glob("events.out.tfevents.*")
    orphaned = EventAccumulator(str(killed_log), purge_orphaned_data=False)
    orphaned.Reload()
    batch = args.num_envs * args.num_steps
    assert [e.step for e in orphaned.Scalars("losses/value_loss")] == [batch, 2 * batch, 3 * batch]

    ppo_vla.main(twin_args(tmp_path, total_iterations=4, save_every=2, resume=True, keep_checkpoints=True))
    # --keep-checkpoints: every checkpoint written is kept, the killed run's too
    assert sorted(p.name for p in (run / "snapshots").iterdir()) == ["iteration_2", "iteration_4"]
    assert load_checkpoint(run / "snapshots" / "iteration_2")[1]["iteration"] == 2
    tags = EventAccumulator(str(run))
    tags.Reload()
    assert "losses/value_loss" in tags.Tags()["scalars"]
    for tag in tags.Tags()["scalars"]:
        steps = [step for step, _ in scalar_events(run, tag)]
        assert steps == [batch, 2 * batch, 3 * batch, 4 * batch], tag


def test_divergence_in_iteration_2_stops_with_one_line_and_keeps_iteration_1(tmp_path: Path) -> None:
    # One optimizer step per iteration; at lr 1e6 the value head's second step overflows.
    result = run_cli("ppo_vla.py", "paper", "--env", "twin", "--image-size", str(SIZE), "--num-envs", "2",
                     "--num-steps", "10", "--minibatch-size", "20", "--grad-accum-steps", "1",
                     "--total-iterations", "5", "--eval-every", "0", "--save-every", "1",
                     "--value-learning-rate", "1e6", "--device", "cpu", "--output-dir", str(tmp_path),
                     "--exp-name", "diverged")
    assert result.returncode == 1
    assert_one_line_error(result, "grad_norm is inf at iteration 2", "training diverged",
                          progress_bars=True)
    agent, state = load_checkpoint(tmp_path / "diverged" / "checkpoint")
    assert state["iteration"] == 1
    assert all(torch.isfinite(p).all() for p in agent.parameters())


def test_a_policy_that_diverged_is_caught_in_the_next_iteration(tmp_path: Path) -> None:
    # lr 1e6 on the adapters: finite weights after iteration 1, then non-finite logits in iteration
    # 2's rollout or a non-finite gradient in its update (which one first depends on the twin's
    # pixels: the study's grey gripper, 2026-12-04, moved it from the first to the second).
    with pytest.raises(NonFiniteError, match=r"(action_logits|grad_norm) is (nan|inf) at iteration 2") as info:
        ppo_vla.main(twin_args(tmp_path, total_iterations=3, minibatch_size=20, learning_rate=1e6))
    assert "\n" not in str(info.value)
    assert load_checkpoint(tmp_path / "twin" / "checkpoint")[1]["iteration"] == 1


@pytest.mark.slow
def test_killed_run_resumes_from_its_last_checkpoint(tmp_path: Path) -> None:
    flags = ["paper", "--env", "twin", "--image-size", str(SIZE), "--num-envs", "2", "--num-steps", "5",
             "--minibatch-size", "10", "--grad-accum-steps", "1", "--save-every", "1",
             "--eval-every", "0", "--device", "cpu", "--output-dir", str(tmp_path), "--exp-name", "killed"]
    proc = subprocess.Popen([sys.executable, "ppo_vla.py", *flags, "--total-iterations", "1000"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    checkpoint = tmp_path / "killed/checkpoint"
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not (checkpoint / "trainer_state.pt").exists():
            time.sleep(0.5)
        time.sleep(3)  # let it get a few iterations further, into the middle of one
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    _, state = load_checkpoint(checkpoint)  # the checkpoint on disk is whole after the kill
    done = state["iteration"]
    assert 1 <= done < 1000
    assert not list(checkpoint.parent.glob(".checkpoint.*")), "no temp dir left after loading"
    ppo_vla.main(twin_args(tmp_path, exp_name="killed", num_steps=5, total_iterations=done + 2, resume=True))
    _, state = load_checkpoint(checkpoint)
    assert state["iteration"] == done + 2


@pytest.mark.slow
def test_short_run_on_maniskill_writes_logs_and_a_loadable_checkpoint(tmp_path: Path) -> None:
    # One env, in this process (worker processes: test_envs.py); two evaluation episodes.
    args = ppo_vla.Args(split="ind", num_envs=1, num_steps=8, max_episode_steps=8, image_size=SIZE,
                        minibatch_size=4, grad_accum_steps=2, total_iterations=1, eval_every=1,
                        eval_episodes=2, output_dir=str(tmp_path), exp_name="sim", device="cpu")
    metrics = ppo_vla.main(args)
    assert 0.0 <= metrics["eval/success"] <= 1.0
    assert list((tmp_path / "sim").glob("events.out.tfevents.*"))
    agent, state = load_checkpoint(tmp_path / "sim/checkpoint")
    assert state["iteration"] == 1 and state["algorithm"] == "ppo"
    assert math.isfinite(scalars(tmp_path / "sim", "losses/value_loss")[0])
    assert np.isfinite(metrics["rollout/episodic_return"])


def test_evaluating_does_not_change_what_a_run_trains_on(tmp_path: Path) -> None:
    # Episodes of exactly one iteration (an evaluation's env reset cuts none short): a run
    # evaluated before and after every iteration trains the same weights as one never evaluated.
    flags = dict(num_steps=10, max_episode_steps=10, total_iterations=2, eval_episodes=2, save_every=100)
    ppo_vla.main(twin_args(tmp_path / "quiet", eval_every=0, **flags))
    ppo_vla.main(twin_args(tmp_path / "evaluated", eval_every=1, **flags))
    assert len(scalars(tmp_path / "evaluated" / "twin", "eval/success")) == 3
    quiet, evaluated = adapter(tmp_path / "quiet" / "twin"), adapter(tmp_path / "evaluated" / "twin")
    for name, weight in quiet.items():
        torch.testing.assert_close(evaluated[name], weight, rtol=0, atol=0, msg=name)
