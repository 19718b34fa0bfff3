"""dpo_vla.py: its loss on known numbers, its chunked gradient, its pairs, its learning, its files."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import dpo_vla
from common import build_agent, load_checkpoint


def scalars(run_dir: Path, tag: str) -> list[float]:
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return [e.value for e in events.Scalars(tag)]


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoint/adapter/adapter_model.safetensors")


def toy_args(tmp_path: Path, **overrides) -> dpo_vla.Args:
    """A small DPO run on the toy task: one-step episodes, tiny model at 56 px, no evaluation.

    beta 1.0, not 0.1: a one-step trajectory sums only 7 token log-probs, and with beta 0.1 the
    loss barely saturates, so the policy drifts (measured over 8 rounds: eval success 0.74, the
    rollouts' success swinging from 0.66 down to 0.34; with 1.0: 0.99). lr 1e-3, 8 pairs a step
    and one epoch learned fastest of the settings tried (3e-3 and two epochs memorised the pairs).
    """
    args = dict(
        split="toy", num_envs=64, max_episode_steps=1, image_size=56, num_states=128, rollouts_per_state=4,
        max_pairs_per_state=3, rounds=1, epochs=1, beta=1.0, learning_rate=1e-3, pairs_per_batch=8,
        chunk_size=64, eval_every=0, output_dir=str(tmp_path), exp_name="toy",
    )
    args.update(overrides)
    return dpo_vla.Args(**args)


# ---------------------------------------------------------------- the loss and its gradient


def test_dpo_loss_on_known_numbers() -> None:
    zeros = torch.zeros(3)
    logp = torch.tensor([-5.0, -12.0, -0.3])
    loss, chosen, rejected = dpo_vla.dpo_loss(logp, logp + 1, logp, logp + 1, beta=0.1)
    # Policy = reference: both implicit rewards are 0 and the loss is log 2, whatever the log-probs.
    torch.testing.assert_close(loss, torch.full((3,), math.log(2)))
    torch.testing.assert_close(chosen, zeros)
    torch.testing.assert_close(rejected, zeros)
    # Chosen up by 2 nats, rejected down by 2: margin beta * 4 = 2, loss log(1 + e^-2) = 0.126928.
    loss, chosen, rejected = dpo_vla.dpo_loss(torch.tensor([0.0]), torch.tensor([-4.0]), torch.tensor([-2.0]),
                                              torch.tensor([-2.0]), beta=0.5)
    assert loss.item() == pytest.approx(0.126928, abs=1e-6)
    assert chosen.item() == pytest.approx(1.0) and rejected.item() == pytest.approx(-1.0)
    # The loss falls as the margin grows, and stays finite far on the wrong side.
    margins = torch.tensor([-500.0, -1.0, 0.0, 1.0, 10.0])
    loss, _, _ = dpo_vla.dpo_loss(margins, torch.zeros(5), torch.zeros(5), torch.zeros(5), beta=1.0)
    assert torch.all(loss[1:] < loss[:-1]) and torch.isfinite(loss).all()
    assert loss[0].item() == pytest.approx(500.0)


def test_dpo_gradient_raises_chosen_and_lowers_rejected() -> None:
    chosen = torch.tensor([-3.0, -8.0], requires_grad=True)
    rejected = torch.tensor([-3.0, -1.0], requires_grad=True)
    loss, _, _ = dpo_vla.dpo_loss(chosen, rejected, torch.tensor([-3.0, -3.0]), torch.tensor([-3.0, -3.0]), beta=0.1)
    loss.sum().backward()
    # Descent moves against the gradient: chosen log-probs up, rejected down, even where the
    # policy already ranks the pair wrongly (pair 1).
    assert torch.all(chosen.grad < 0) and torch.all(rejected.grad > 0)
    # At the reference the slope is exactly beta * sigmoid(0) = beta / 2.
    assert chosen.grad[0].item() == pytest.approx(-0.05) and rejected.grad[0].item() == pytest.approx(0.05)
    # A badly ranked pair pulls harder than a well-ranked one would: sigmoid(-margin) > 1/2.
    assert abs(chosen.grad[1].item()) > 0.05


def random_trajectories(agent, num_trajectories: int, length: int, seed: int = 0) -> dpo_vla.Preferences:
    """Random images and valid action tokens, M trajectories of L steps, with made-up reference log-probs."""
    rng = np.random.default_rng(seed)
    size = agent.image_size
    actions = rng.uniform(-1, 1, size=(num_trajectories, length, 7))
    return dpo_vla.Preferences(
        images=torch.as_tensor(rng.integers(0, 256, (num_trajectories, length, size, size, 3), dtype=np.uint8)),
        instructions=[[f"move to the {c} square"] * length for c in ["red", "green", "blue", "yellow"][:num_trajectories]],
        tokens=torch.as_tensor(agent.action_tokenizer.encode(actions)).long(),
        ref_logprobs=torch.as_tensor(rng.normal(-30.0, 3.0, num_trajectories), dtype=torch.float32),
        episode_ids=torch.zeros(num_trajectories, dtype=torch.long),
        success=torch.zeros(num_trajectories, dtype=torch.bool),
        pairs=torch.tensor([[0, 1], [2, 1], [0, 2]]),
        stats={},
    )


def test_chunked_two_pass_gradient_equals_direct_autograd() -> None:
    agent = build_agent("tiny", None, image_size=56, device="cpu", seed=0)
    params = list(agent.lora_parameters())
    with torch.no_grad():  # move off the zero-initialised adapter so that every LoRA weight gets a gradient
        for p in params:
            p.add_(0.05 * torch.randn_like(p))
    agent.train()
    data = random_trajectories(agent, num_trajectories=3, length=3)

    # Direct: one graph through all 9 steps, loss.backward().
    logp, _, _ = agent.evaluate(data.images.flatten(0, 1), [s for t in data.instructions for s in t],
                                data.tokens.flatten(0, 1), temperature=1.0)
    logp = logp.view(3, 3).sum(dim=1)
    c, r = data.pairs[:, 0], data.pairs[:, 1]
    loss, _, _ = dpo_vla.dpo_loss(logp[c], logp[r], data.ref_logprobs[c], data.ref_logprobs[r], beta=0.3)
    loss.mean().backward()
    direct = [p.grad.clone() for p in params]
    assert sum(g.abs().sum().item() for g in direct) > 0

    # Two passes, chunks of 1 step, of 2 (straddling trajectory ends), and all steps at once.
    for chunk_size in (1, 2, 100):
        for p in params:
            p.grad = None
        stats = dpo_vla.dpo_update(agent, data, data.pairs, beta=0.3, chunk_size=chunk_size)
        assert stats["losses/loss"] == pytest.approx(loss.mean().item(), rel=1e-5)
        for p, g in zip(params, direct, strict=True):
            torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- preference pairs


def test_pairs_join_a_success_and_a_failure_of_the_same_state() -> None:
    ids = torch.tensor([7, 7, 7, 3, 3, 5, 5, 5, 5])
    success = torch.tensor([1, 0, 1, 0, 0, 1, 0, 0, 0], dtype=torch.bool)
    pairs = dpo_vla.pair_successes_with_failures(ids, success, max_pairs_per_state=2, rng=np.random.default_rng(0))
    # State 7: 2 successes x 1 failure = 2 pairs; state 3: no success, none; state 5: 1 x 3, capped at 2.
    assert pairs.shape == (4, 2)
    assert success[pairs[:, 0]].all() and not success[pairs[:, 1]].any()
    assert torch.equal(ids[pairs[:, 0]], ids[pairs[:, 1]])
    assert sorted(ids[pairs[:, 0]].tolist()) == [5, 5, 7, 7]
    assert len({tuple(p) for p in pairs.tolist()}) == 4, "no pair is drawn twice"
    none = dpo_vla.pair_successes_with_failures(ids, torch.zeros(9, dtype=torch.bool), 4, np.random.default_rng(0))
    assert none.shape == (0, 2)


def test_user_mistakes_are_rejected_before_loading_anything() -> None:
    with pytest.raises(ValueError, match="rollouts-per-state"):
        dpo_vla.check_args(dpo_vla.Args(rollouts_per_state=1))
    with pytest.raises(ValueError, match="multiple of --num-envs"):
        dpo_vla.check_args(dpo_vla.Args(num_envs=64, num_states=3, rollouts_per_state=4))
    with pytest.raises(ValueError, match="beta"):
        dpo_vla.check_args(dpo_vla.Args(beta=0.0))


# ---------------------------------------------------------------- the whole script


@pytest.mark.slow
def test_dpo_learns_toy_task_from_chance(tmp_path: Path) -> None:
    # Iterative DPO: each round's pairs come from the policy the previous round left.
    args = toy_args(tmp_path, rounds=8, eval_every=4, eval_episodes=256)
    final = dpo_vla.main(args)
    run = tmp_path / "toy"
    assert final["eval/reference_success"] < 0.35, f"the untrained policy should be near chance (~12%), got {final}"
    assert final["eval/success"] >= max(0.5, 2 * final["eval/reference_success"]), f"DPO did not learn: {final}"
    pairs = scalars(run, "data/pairs")
    assert len(pairs) == args.rounds and min(pairs) > 0
    assert len(scalars(run, "eval/success")) == 3, "the reference, round 4 and round 8"
    loss = scalars(run, "losses/loss")
    assert loss[0] == pytest.approx(math.log(2), abs=1e-4), "the first step starts at the reference: loss log 2"
    assert np.mean(scalars(run, "rewards/accuracy")[-5:]) > 0.5
    _, state = load_checkpoint(run / "checkpoint")
    assert state["round"] == 8 and state["algorithm"] == "dpo"


def test_no_pairs_is_reported_and_the_run_still_finishes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # Greedy rollouts from one state are identical, so no state can have both a success and a failure.
    args = toy_args(tmp_path, num_states=16, rollouts_per_state=4, temperature=0.0)
    metrics = dpo_vla.main(args)
    assert metrics["data/pairs"] == 0
    assert "no preference pairs" in capsys.readouterr().out
    _, state = load_checkpoint(tmp_path / "toy/checkpoint")
    assert state["round"] == 1 and state["updates"] == 0
    assert sum(v.abs().sum().item() for k, v in adapter(tmp_path / "toy").items() if "lora_B" in k) == 0, \
        "without pairs the adapter must stay at its (zero) initialisation"


def test_pairs_are_reused_and_a_corrupt_file_is_collected_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    args = toy_args(tmp_path, num_states=32, rollouts_per_state=8, num_envs=64)
    first = dpo_vla.main(args)
    assert first["data/pairs"] > 0
    path = tmp_path / "toy/preferences/round_001.pt"
    trained = adapter(tmp_path / "toy")

    def no_collection(*_args, **_kwargs):
        raise AssertionError("the stored pairs should have been reused")

    with monkeypatch.context() as patch:
        patch.setattr(dpo_vla, "collect_preferences", no_collection)
        again = dpo_vla.main(args)  # same settings: no rollout, and the very same training
        assert again["data/pairs"] == first["data/pairs"]
        for k, v in adapter(tmp_path / "toy").items():
            torch.testing.assert_close(v, trained[k])
        # Round 1's pairs come from the initial policy, so a learning-rate sweep shares them too.
        dpo_vla.main(toy_args(tmp_path, num_states=32, rollouts_per_state=8, learning_rate=3e-4, exp_name="lr",
                              preference_dir=str(path.parent)))
    assert "reusing" in capsys.readouterr().out

    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a half-written file
    redone = dpo_vla.main(args)
    assert "unreadable" in capsys.readouterr().out
    assert redone["data/pairs"] == first["data/pairs"]
    assert dpo_vla.load_preferences(path, dpo_vla.collection_settings(args, 0)) is not None


def test_resume_reproduces_an_uninterrupted_run(tmp_path: Path) -> None:
    small = dict(num_states=16, rollouts_per_state=8, num_envs=64, epochs=1)
    dpo_vla.main(toy_args(tmp_path / "a", rounds=2, **small))
    dpo_vla.main(toy_args(tmp_path / "b", rounds=1, **small))
    dpo_vla.main(toy_args(tmp_path / "b", rounds=2, resume=True, **small))
    a, b = adapter(tmp_path / "a/toy"), adapter(tmp_path / "b/toy")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    _, state = load_checkpoint(tmp_path / "b/toy/checkpoint")
    assert state["round"] == 2 and state["updates"] > 0


@pytest.mark.slow
def test_short_rounds_on_maniskill_write_a_loadable_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    # Round 1 runs as it comes: a random tiny model almost never succeeds in 8 steps, so it
    # usually has no pairs. Round 2 pretends the first rollout succeeded, if none did, so that
    # an update on real 8-step trajectories (in chunks of 3 steps) runs as well.
    real_pairing = dpo_vla.pair_successes_with_failures
    rounds_seen: list[int] = []

    def pairing(episode_ids, success, max_pairs_per_state, rng):
        rounds_seen.append(1)
        pairs = real_pairing(episode_ids, success, max_pairs_per_state, rng)
        return torch.tensor([[0, 1]]) if len(rounds_seen) == 2 and len(pairs) == 0 else pairs

    monkeypatch.setattr(dpo_vla, "pair_successes_with_failures", pairing)
    args = dpo_vla.Args(split="ind", num_envs=2, max_episode_steps=8, image_size=56, num_states=1,
                        rollouts_per_state=2, rounds=2, chunk_size=3, eval_every=2, eval_episodes=2,
                        output_dir=str(tmp_path), exp_name="sim")
    metrics = dpo_vla.main(args)
    run = tmp_path / "sim"
    first_round_pairs = scalars(run, "data/pairs")[0]
    if first_round_pairs == 0:
        assert "round 1: no preference pairs" in capsys.readouterr().out
    assert metrics["data/pairs"] >= 1 and math.isfinite(metrics["losses/loss"])
    assert 0.0 <= metrics["eval/success"] <= 1.0
    _, state = load_checkpoint(run / "checkpoint")
    assert state["round"] == 2 and state["algorithm"] == "dpo" and state["updates"] >= 1
    assert sum(v.abs().sum().item() for k, v in adapter(run).items() if "lora_B" in k) > 0
