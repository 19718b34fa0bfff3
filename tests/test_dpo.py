"""dpo_vla.py: its loss on known numbers, its chunked gradient, its pairs, and on the twin its
files (pairs reused, checked), the no-pairs case and resume."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SIZE, scalars, tiny_agent, with_move_right_bonus
from safetensors.torch import load_file

import dpo_vla
from common import load_checkpoint


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoint/adapter/adapter_model.safetensors")


def twin_args(tmp_path: Path, **overrides) -> dpo_vla.Args:
    """One small DPO round on the twin: 4 states x 4 rollouts of 5 steps, tiny model, no eval."""
    args = dict(
        env="twin", image_size=SIZE, num_envs=8, max_episode_steps=5, num_states=4, rollouts_per_state=4,
        max_pairs_per_state=2, rounds=1, epochs=1, beta=1.0, learning_rate=1e-3, pairs_per_batch=4,
        chunk_size=20, eval_every=0, device="cpu", output_dir=str(tmp_path), exp_name="twin",
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


def random_trajectories(agent, num_trajectories: int, length: int, seed: int = 0) -> dict:
    """Random images and valid action tokens, M trajectories of L steps, made-up reference log-probs."""
    rng = np.random.default_rng(seed)
    size = agent.image_size
    actions = rng.uniform(-1, 1, size=(num_trajectories, length, 7))
    colours = ["red", "green", "blue", "yellow"][:num_trajectories]
    return {
        "images": torch.as_tensor(rng.integers(0, 256, (num_trajectories, length, size, size, 3), dtype=np.uint8)),
        "instructions": [[f"move to the {c} square"] * length for c in colours],
        "tokens": torch.as_tensor(agent.action_tokenizer.encode(actions)).long(),
        "ref_logprobs": torch.as_tensor(rng.normal(-30.0, 3.0, num_trajectories), dtype=torch.float32),
        "pairs": torch.tensor([[0, 1], [2, 1], [0, 2]]),
    }


def test_chunked_two_pass_gradient_equals_direct_autograd() -> None:
    agent = tiny_agent(critic=None)  # off the zero-initialised adapter: every LoRA weight gets a gradient
    params = agent.lora_parameters()
    agent.train()
    data = random_trajectories(agent, num_trajectories=3, length=3)

    # Direct: one graph through all 9 steps, loss.backward().
    logp, _, _ = agent.score_actions(data["images"].flatten(0, 1), [s for t in data["instructions"] for s in t],
                                     data["tokens"].flatten(0, 1), temperature=1.0)
    logp = logp.view(3, 3).sum(dim=1)
    c, r = data["pairs"][:, 0], data["pairs"][:, 1]
    loss, _, _ = dpo_vla.dpo_loss(logp[c], logp[r], data["ref_logprobs"][c], data["ref_logprobs"][r], beta=0.3)
    loss.mean().backward()
    direct = [p.grad.clone() for p in params]
    assert sum(g.abs().sum().item() for g in direct) > 0

    # Two passes, chunks of 1 step, of 2 (straddling trajectory ends), and all steps at once.
    for chunk_size in (1, 2, 100):
        for p in params:
            p.grad = None
        args = dpo_vla.Args(beta=0.3, chunk_size=chunk_size)
        stats = dpo_vla.dpo_update(agent, data, data["pairs"], args, "test")
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


# ---------------------------------------------------------------- the whole script on the twin


def test_collected_pairs_are_scored_by_the_reference_and_the_first_loss_is_log_2(tmp_path: Path,
                                                                                  monkeypatch) -> None:
    with_move_right_bonus(monkeypatch, dpo_vla)  # about half the rollouts "succeed"
    metrics = dpo_vla.main(twin_args(tmp_path))
    run = tmp_path / "twin"
    data = torch.load(run / "preferences" / "round_001.pt", weights_only=True)
    pairs, m = data["pairs"], len(data["tokens"])
    assert len(pairs) > 0 and metrics["data/pairs"] == len(pairs)
    assert pairs.max() < m and data["images"].shape == (m, 5, SIZE, SIZE, 3) and data["tokens"].shape == (m, 5, 7)
    assert (data["env"], data["split"]) == ("twin", "ind")
    assert sorted(set(pairs.flatten().tolist())) == list(range(m)), "only paired trajectories are kept"
    assert scalars(run, "losses/loss")[0] == pytest.approx(math.log(2), abs=1e-4), "starts at the reference"
    _, state = load_checkpoint(run / "checkpoint")
    assert state["round"] == 1 and state["algorithm"] == "dpo" and state["updates"] == len(scalars(run, "losses/loss"))
    assert sum(v.abs().sum().item() for k, v in adapter(run).items() if "lora_B" in k) > 0


def test_no_pairs_is_reported_and_the_run_still_finishes(tmp_path: Path, capsys) -> None:
    # A random tiny policy never succeeds on the twin: no state has a success and a failure.
    metrics = dpo_vla.main(twin_args(tmp_path))
    assert metrics["data/pairs"] == 0 and metrics["rollout/success"] == 0
    assert "no state had both a success and a failure, so no pairs" in capsys.readouterr().out
    _, state = load_checkpoint(tmp_path / "twin/checkpoint")
    assert state["round"] == 1 and state["updates"] == 0
    assert sum(v.abs().sum().item() for k, v in adapter(tmp_path / "twin").items() if "lora_B" in k) == 0, \
        "without pairs the adapter must stay at its (zero) initialisation"


def test_pairs_from_another_run_train_without_collecting(tmp_path: Path, monkeypatch) -> None:
    with_move_right_bonus(monkeypatch, dpo_vla)
    first = dpo_vla.main(twin_args(tmp_path))
    assert first["data/pairs"] > 0
    path = tmp_path / "twin" / "preferences" / "round_001.pt"

    def no_collection(*_args, **_kwargs):
        raise AssertionError("the pairs of --pairs-from should have been used")

    with monkeypatch.context() as patch:
        patch.setattr(dpo_vla, "collect_preferences", no_collection)
        again = dpo_vla.main(twin_args(tmp_path, exp_name="again", pairs_from=str(path)))
    assert again["data/pairs"] == first["data/pairs"]
    trained = adapter(tmp_path / "twin")
    for k, v in adapter(tmp_path / "again").items():  # the same data, the same training
        torch.testing.assert_close(v, trained[k])


def test_pairs_files_that_do_not_fit_are_refused(tmp_path: Path, monkeypatch) -> None:
    with_move_right_bonus(monkeypatch, dpo_vla)
    dpo_vla.main(twin_args(tmp_path))
    path = tmp_path / "twin" / "preferences" / "round_001.pt"
    with pytest.raises(ValueError, match=f"holds twin/ind at {SIZE} px, not twin/unseen_table"):
        dpo_vla.load_pairs(path, twin_args(tmp_path, split="unseen_table"), SIZE)
    with pytest.raises(ValueError, match=f"not twin/ind at {2 * SIZE} px"):
        dpo_vla.load_pairs(path, twin_args(tmp_path), 2 * SIZE)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a half-written file
    with pytest.raises(ValueError, match="is not a pairs file") as info:
        dpo_vla.main(twin_args(tmp_path, exp_name="again", pairs_from=str(path)))
    assert "\n" not in str(info.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        dpo_vla.load_pairs(tmp_path / "nowhere.pt", twin_args(tmp_path), SIZE)


def test_resume_reproduces_an_uninterrupted_run_and_reuses_its_pairs(tmp_path: Path, monkeypatch) -> None:
    # "b" stops after round 1, is resumed and killed after collecting round 2's pairs, then
    # resumed again: it trains on those pairs, collecting nothing, and ends where "a" did.
    with_move_right_bonus(monkeypatch, dpo_vla)
    dpo_vla.main(twin_args(tmp_path / "a", rounds=2))
    dpo_vla.main(twin_args(tmp_path / "b", rounds=1))
    real_update = dpo_vla.dpo_update
    with monkeypatch.context() as patch:
        def killed(*_args, **_kwargs):
            raise KeyboardInterrupt

        patch.setattr(dpo_vla, "dpo_update", killed)
        with pytest.raises(KeyboardInterrupt):
            dpo_vla.main(twin_args(tmp_path / "b", rounds=2, resume=True))
        assert (tmp_path / "b/twin/preferences/round_002.pt").exists()
        patch.setattr(dpo_vla, "dpo_update", real_update)
        patch.setattr(dpo_vla, "collect_preferences", lambda *a, **kw: pytest.fail("collected again"))
        dpo_vla.main(twin_args(tmp_path / "b", rounds=2, resume=True))
    a, b = adapter(tmp_path / "a/twin"), adapter(tmp_path / "b/twin")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    _, state = load_checkpoint(tmp_path / "b/twin/checkpoint")
    assert state["round"] == 2 and state["updates"] > 0
    assert scalars(tmp_path / "b/twin", "data/pairs") == scalars(tmp_path / "a/twin", "data/pairs")
