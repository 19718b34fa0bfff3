"""sft_warmup.py: action statistics, augmentation, the token loss, and on the twin its runs
(logs, checkpoints, resume) and its errors. Demonstrations themselves: test_demos.py."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import (
    SIZE,
    assert_one_line_error,
    run_cli,
    save_trained_checkpoint,
    scalars,
    tiny_agent,
)

import sft_warmup
from common import load_checkpoint, run_script
from demos import drop_idle_steps
from envs import make_vec_env


def twin_args(tmp_path: Path, **overrides) -> sft_warmup.Args:
    """A few SFT steps on twin demos at SIZE px, no augmentation, no evaluation."""
    args = dict(
        env="twin", image_size=SIZE, num_demos=8, val_demos=4, num_envs=4, total_steps=4, batch_size=8,
        grad_accum_steps=2, learning_rate=1e-3, image_aug=False, val_every=2, eval_every=0,
        eval_episodes=4, save_every=2, device="cpu", demo_dir=str(tmp_path / "demos"),
        output_dir=str(tmp_path / "runs"), exp_name="twin",
    )
    args.update(overrides)
    return sft_warmup.Args(**args)


def test_norm_stats_are_action_percentiles_and_leave_the_gripper_raw(agent) -> None:
    rng = np.random.default_rng(0)
    actions = rng.uniform(-0.3, 0.6, size=(5000, 7)).astype(np.float32)
    actions[:, 6] = rng.choice([-1.0, 1.0], size=5000)
    stats = sft_warmup.compute_norm_stats(actions)
    np.testing.assert_allclose(stats.q01[:6], np.quantile(actions[:, :6], 0.01, axis=0))
    np.testing.assert_allclose(stats.q99[:6], np.quantile(actions[:, :6], 0.99, axis=0))
    normalised = stats.normalize(actions)
    assert normalised[:, :6].min() == -1.0 and normalised[:, :6].max() == 1.0
    np.testing.assert_array_equal(normalised[:, 6], actions[:, 6])  # gripper raw
    # Round trip through the tokens, as the trained policy will decode them.
    decoded = stats.unnormalize(agent.action_tokenizer.decode(agent.action_tokenizer.encode(normalised)))
    inside = (actions[:, :6] > stats.q01[:6]) & (actions[:, :6] < stats.q99[:6])
    bin_width = (stats.q99[:6] - stats.q01[:6]) / 255
    assert np.all(np.abs(decoded[:, :6] - actions[:, :6])[inside] <= np.broadcast_to(bin_width, inside.shape)[inside])
    np.testing.assert_array_equal(decoded[:, 6], actions[:, 6])


def test_augmentation_keeps_shape_and_dtype_and_varies_the_image() -> None:
    images = np.random.default_rng(0).integers(0, 256, size=(4, SIZE, SIZE, 3), dtype=np.uint8)
    out = sft_warmup.augment_images(images, torch.device("cpu"))
    assert out.shape == images.shape and out.dtype == np.uint8
    assert not np.array_equal(out, images)


def test_token_loss_targets_the_expert_actions_under_the_agents_statistics() -> None:
    agent = tiny_agent(critic=None)
    envs = make_vec_env("ind", 4, SIZE, env="twin")
    obs, _ = envs.reset(options={"episode_ids": np.arange(4)})
    actions = envs.expert_action()
    with torch.no_grad():
        full, predicted, target = sft_warmup.token_loss(agent, obs["image"], obs["instruction"], actions, "full")
        action, _, same_target = sft_warmup.token_loss(agent, obs["image"], obs["instruction"], actions, "action")
        logprob, _, _ = agent.score_actions(obs["image"], obs["instruction"], target)
    np.testing.assert_array_equal(target, agent.action_tokenizer.encode(agent.norm_stats.normalize(actions)))
    np.testing.assert_array_equal(target, same_target)
    # Over the 256 action ids the loss is the policy's own log-prob; the full softmax is larger.
    assert action.item() == pytest.approx(-logprob.mean().item() / 7, rel=1e-5)
    assert full.item() > action.item()
    assert predicted.shape == (4, 7) and (predicted >= agent.action_tokenizer.first_id).all()
    metrics = sft_warmup.token_metrics(agent, target, target)
    assert metrics["token_accuracy"] == 1.0 and metrics["l1"] == 0.0 and metrics["token_accuracy_dim6"] == 1.0


def test_a_run_on_the_twin_validates_evaluates_and_saves(tmp_path: Path) -> None:
    args = twin_args(tmp_path, eval_every=4, keep_checkpoints=True)
    metrics = sft_warmup.main(args)
    run = tmp_path / "runs" / "twin"
    # --keep-checkpoints: the checkpoint of step 2 is kept beside the last one, which it is not
    snapshots = {p.name: load_checkpoint(p)[0] for p in (run / "snapshots").iterdir()}
    assert sorted(snapshots) == ["step_2", "step_4"]
    lora = {name: dict((n, v) for n, v in a.named_parameters() if "lora_B" in n) for name, a in snapshots.items()}
    assert all(torch.equal(lora["step_4"][n], v) for n, v in load_checkpoint(run / "checkpoint")[0].named_parameters()
               if "lora_B" in n)
    assert not all(torch.equal(lora["step_2"][n], v) for n, v in lora["step_4"].items())
    assert len(scalars(run, "train/loss")) == 4 and len(scalars(run, "val/token_accuracy")) == 2  # steps 2, 4
    assert scalars(run, "eval/success") == [metrics["eval/success"]] and 0 <= metrics["eval/success"] <= 1
    agent, state = load_checkpoint(run / "checkpoint")
    assert state["algorithm"] == "sft" and state["step"] == 4 and state["num_demos"] == 8
    assert state["demo_dir"] == args.demo_dir and agent.value_head is None
    # The statistics come from the training demonstrations' actions.
    records = sorted((tmp_path / "demos").glob("train-*.h5"))
    assert records and agent.norm_stats.q99[0] > agent.norm_stats.q01[0]
    assert sum(v.abs().sum().item() for n, v in agent.named_parameters() if "lora_B" in n) > 0


def test_collect_only_builds_no_model(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(sft_warmup, "init_agent", lambda *a, **kw: pytest.fail("built a model"))
    assert sft_warmup.main(twin_args(tmp_path, collect_only=True)) == {"demos": 8.0}
    assert len(list((tmp_path / "demos").glob("train-*.h5"))) == 2
    assert not (tmp_path / "runs").exists()


def test_resumed_training_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    straight = sft_warmup.main(twin_args(tmp_path, exp_name="straight"))
    sft_warmup.main(twin_args(tmp_path, exp_name="killed", total_steps=2))
    resumed = sft_warmup.main(twin_args(tmp_path, exp_name="killed", resume=True))
    assert resumed["val/loss"] == pytest.approx(straight["val/loss"], rel=1e-5)
    a, state_a = load_checkpoint(tmp_path / "runs" / "straight" / "checkpoint")
    b, state_b = load_checkpoint(tmp_path / "runs" / "killed" / "checkpoint")
    assert state_a["step"] == state_b["step"] == 4
    for p, q in zip(a.lora_parameters(), b.lora_parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(a.norm_stats.q01, b.norm_stats.q01)
    with pytest.raises(ValueError, match="the run to resume trained on 8 demonstrations"):
        sft_warmup.main(twin_args(tmp_path, exp_name="killed", resume=True, num_demos=12))


def test_init_checkpoint_keeps_the_adapter_and_recomputes_the_statistics(tmp_path: Path) -> None:
    checkpoint = save_trained_checkpoint(tmp_path / "ppo" / "checkpoint", "ppo", critic="separate")
    sft_warmup.main(twin_args(tmp_path, init_checkpoint=str(checkpoint), image_size=None, total_steps=1,
                              val_every=1, learning_rate=1e-12))
    agent, _ = load_checkpoint(tmp_path / "runs" / "twin" / "checkpoint")
    start, _ = load_checkpoint(checkpoint)
    assert agent.value_head is None and agent.critic_model is None
    started = {n: p for n, p in start.policy.named_parameters() if "lora_" in n}  # not the critic's
    for name, p in agent.policy.named_parameters():
        if "lora_" in name:  # lr 1e-12: still the adapter it started from
            torch.testing.assert_close(p, started[name], rtol=0, atol=1e-6)
    assert not np.array_equal(agent.norm_stats.q01, start.norm_stats.q01)


def test_user_mistakes_are_one_line(tmp_path: Path) -> None:
    args = twin_args(tmp_path, num_demos=4, val_demos=0)
    sft_warmup.main(twin_args(tmp_path, num_demos=4, val_demos=0, collect_only=True))
    victim = sorted((tmp_path / "demos").glob("train-*.h5"))[0]
    victim.write_bytes(b"\x89HDF\r\n\x1a\n garbage")
    result = run_cli("sft_warmup.py", "--env", "twin", "--image-size", str(SIZE), "--num-demos", "4",
                     "--val-demos", "0", "--demo-dir", args.demo_dir, "--output-dir", args.output_dir,
                     "--device", "cpu")
    assert result.returncode == 1
    assert_one_line_error(result, f"demonstration file {victim} is corrupt")
    for overrides, expected in (({"init_checkpoint": str(tmp_path / "nowhere")}, "does not exist"),
                                ({"model_path": str(tmp_path / "nowhere")}, "--model-path")):
        with pytest.raises(SystemExit) as info:
            run_script(sft_warmup.main, twin_args(tmp_path, **overrides), "sft", tmp_path)
        message = str(info.value.code)
        assert message.startswith("error:") and expected in message and "\n" not in message


@pytest.mark.slow
def test_short_run_on_maniskill_collects_real_demonstrations_and_trains(tmp_path: Path) -> None:
    args = sft_warmup.Args(split="ind", num_demos=1, val_demos=0, num_envs=1, image_size=SIZE, total_steps=2,
                           batch_size=4, grad_accum_steps=2, val_every=1, eval_every=0, save_every=1,
                           device="cpu", demo_dir=str(tmp_path / "demos"), output_dir=str(tmp_path / "runs"))
    metrics = sft_warmup.main(args)
    assert np.isfinite(metrics["train/loss"])
    (chunk,) = sorted((tmp_path / "demos").glob("train-*.h5"))
    records = sft_warmup.ensure_demos(tmp_path / "demos", {"train": 1}, "maniskill", "ind", SIZE, 80)["train"]
    assert len(records) == 1 and records[0]["file"] == chunk
    for r in records:
        assert r["success"] and r["instruction"].startswith("put ") and 5 <= r["elapsed_steps"] <= 80
        # Idle steps are gone until success: every step before it moves, turns or toggles the
        # gripper (the steps from a successful state are kept, idle or not).
        with h5py.File(r["file"], "r") as f:
            success = f[f"traj_{r['slot']}"]["success"][()]
        before = ~np.concatenate([[False], success[:-1]])
        assert len(drop_idle_steps(r["actions"][before])) == before.sum() < len(r["actions"])
    agent, state = load_checkpoint(tmp_path / "runs" / "sft_warmup" / "checkpoint")
    assert state["step"] == 2 and agent.norm_stats.q99[0] > agent.norm_stats.q01[0]
