"""sft_warmup.py: demonstrations on disk (resumable, checked), and LoRA SFT that learns the toy task."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import envs
import sft_warmup
from common import build_agent, evaluate_policy, load_checkpoint
from toy_env import ToyVecEnv

REPO = Path(__file__).resolve().parents[1]


def toy_args(tmp_path: Path, **overrides) -> sft_warmup.Args:
    """SFT on the toy task: one-step episodes, tiny model at 56 px, no augmentation."""
    args = dict(
        split="toy", max_episode_steps=1, image_size=56, num_demos=512, val_demos=64, num_envs=64,
        total_steps=100, batch_size=32, grad_accum_steps=1, learning_rate=1e-3, image_aug=False, val_every=50,
        eval_every=0, eval_episodes=256, save_every=1000, device="cpu",
        demo_dir=str(tmp_path / "demos"), output_dir=str(tmp_path / "runs"), exp_name="toy",
    )
    args.update(overrides)
    return sft_warmup.Args(**args)


def scalars(run_dir: Path, tag: str) -> list[float]:
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return [e.value for e in events.Scalars(tag)]


# ------------------------------------------------------------------------------ data helpers


def test_norm_stats_are_action_percentiles_and_leave_the_gripper_raw() -> None:
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
    agent = build_agent("tiny", image_size=56)
    decoded = stats.unnormalize(agent.action_tokenizer.decode(agent.action_tokenizer.encode(normalised)))
    inside = (actions[:, :6] > stats.q01[:6]) & (actions[:, :6] < stats.q99[:6])
    bin_width = (stats.q99[:6] - stats.q01[:6]) / 255
    assert np.all(np.abs(decoded[:, :6] - actions[:, :6])[inside] <= np.broadcast_to(bin_width, inside.shape)[inside])
    np.testing.assert_array_equal(decoded[:, 6], actions[:, 6])


def test_augmentation_keeps_shape_and_dtype_and_varies_the_image() -> None:
    images = np.random.default_rng(0).integers(0, 256, size=(4, 56, 56, 3), dtype=np.uint8)
    out = sft_warmup.augment_images(images, torch.device("cpu"))
    assert out.shape == images.shape and out.dtype == np.uint8
    assert not np.array_equal(out, images)


def test_full_vocabulary_loss_is_the_action_loss_plus_the_text_ids_share() -> None:
    agent = build_agent("tiny", image_size=56)
    env = ToyVecEnv(4, 56, max_episode_steps=1)
    obs = env.reset()
    tokens = agent.action_tokenizer.encode(agent.norm_stats.normalize(env.expert_action()))
    with torch.no_grad():
        full, predicted = sft_warmup.action_token_loss(agent, obs["image"], obs["instruction"], tokens, "full")
        action, _ = sft_warmup.action_token_loss(agent, obs["image"], obs["instruction"], tokens, "action")
        logprob, _, _ = agent.evaluate(obs["image"], obs["instruction"], tokens)
    # Over the 256 action ids the loss is exactly the policy's own log-prob (summed over 7 tokens);
    # the full softmax also spends probability on text ids, so its loss is larger.
    assert action.item() == pytest.approx(-logprob.mean().item() / 7, rel=1e-5)
    assert full.item() > action.item()
    assert predicted.shape == (4, 7) and bool(((predicted >= agent.action_tokenizer.first_id)).all())


def test_missing_slots_fills_holes_first() -> None:
    records = [{"slot": s} for s in (0, 1, 3, 4, 7)]
    assert sft_warmup.missing_slots(records, 4) == [2, 5, 6, 8]


# ------------------------------------------------------------------------------ demonstrations


def demo_files(demo_dir: Path) -> list[Path]:
    return sorted(demo_dir.glob("episodes_*.h5"))


def test_demonstrations_are_standard_hdf5_with_json_sidecars(tmp_path: Path) -> None:
    args = toy_args(tmp_path, num_demos=20, val_demos=4, num_envs=8)
    records = sft_warmup.collect_demonstrations(args, Path(args.demo_dir), image_size=56)
    assert [r["slot"] for r in records] == list(range(24))
    assert len(demo_files(Path(args.demo_dir))) == 3  # 24 episodes / 8 envs
    h5_path = demo_files(Path(args.demo_dir))[0]
    sidecar = json.loads(h5_path.with_suffix(".json").read_text())
    assert sidecar["env_info"]["split"] == "toy" and len(sidecar["episodes"]) == 8
    with h5py.File(h5_path, "r") as f:
        traj = f["traj_0"]
        assert traj["images"].dtype == np.uint8 and traj["images"].shape == (1, 56, 56, 3)
        assert traj["actions"].shape == (1, 7)
        assert traj.attrs["instruction"].startswith("move to the")
        assert bool(traj.attrs["success"]) and traj.attrs["episode_id"] == sidecar["episodes"][0]["episode_id"]
    # The recorded action is the toy expert's action for that episode.
    env = ToyVecEnv(1, 56, max_episode_steps=1)
    obs = env.reset([sidecar["episodes"][0]["episode_id"]])
    np.testing.assert_array_equal(records[0]["actions"][0], env.expert_action()[0])
    assert obs["instruction"][0] == sidecar["episodes"][0]["instruction"]


def test_collection_resumes_after_interruption_without_losing_episodes(tmp_path: Path, monkeypatch) -> None:
    args = toy_args(tmp_path, num_demos=28, val_demos=4, num_envs=8)  # 4 chunks of 8
    demo_dir = Path(args.demo_dir)
    real, calls = envs.collect_expert_demos, []

    def interrupted_on_third_chunk(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(sft_warmup, "collect_expert_demos", interrupted_on_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        sft_warmup.collect_demonstrations(args, demo_dir, image_size=56)
    kept = {p.name: p.read_bytes() for p in demo_files(demo_dir)}
    assert len(kept) == 2  # the two finished chunks are on disk
    # A crash in the middle of a write leaves a temp file, or an HDF5 file without its sidecar.
    (demo_dir / ".episodes_000016-000023.h5.tmp").write_bytes(b"half a file")
    (demo_dir / "episodes_000016-000023.h5").write_bytes(b"no sidecar yet")

    monkeypatch.setattr(sft_warmup, "collect_expert_demos", real)
    resumed = sft_warmup.collect_demonstrations(args, demo_dir, image_size=56)
    assert not list(demo_dir.glob(".*.tmp"))
    assert all(demo_dir.joinpath(name).read_bytes() == data for name, data in kept.items())  # not redone
    assert [r["slot"] for r in resumed] == list(range(32))

    # Same episodes, same data as a collection that was never interrupted.
    fresh = sft_warmup.collect_demonstrations(toy_args(tmp_path, num_demos=28, val_demos=4, num_envs=8,
                                                       demo_dir=str(tmp_path / "fresh")),
                                              tmp_path / "fresh", image_size=56)
    assert [r["episode_id"] for r in resumed] == [r["episode_id"] for r in fresh]
    np.testing.assert_array_equal(np.concatenate([r["actions"] for r in resumed]),
                                  np.concatenate([r["actions"] for r in fresh]))


def test_more_demonstrations_extend_the_existing_ones(tmp_path: Path) -> None:
    args = toy_args(tmp_path, num_demos=8, val_demos=0, num_envs=8)
    first = sft_warmup.collect_demonstrations(args, Path(args.demo_dir), image_size=56)
    args.num_demos = 16
    more = sft_warmup.collect_demonstrations(args, Path(args.demo_dir), image_size=56)
    assert [r["episode_id"] for r in more[:8]] == [r["episode_id"] for r in first]
    assert len(demo_files(Path(args.demo_dir))) == 2


def test_corrupt_or_mismatched_demonstrations_are_refused(tmp_path: Path) -> None:
    args = toy_args(tmp_path, num_demos=8, val_demos=8, num_envs=8)
    demo_dir = Path(args.demo_dir)
    sft_warmup.collect_demonstrations(args, demo_dir, image_size=56)
    victim = demo_files(demo_dir)[1]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # truncated
    with pytest.raises(sft_warmup.DemoError, match=f"{victim.name} is corrupt or partial"):
        sft_warmup.collect_demonstrations(args, demo_dir, image_size=56)
    assert victim.exists()  # never deleted behind the user's back

    with pytest.raises(sft_warmup.DemoError, match="image_size=56"):  # other settings, same dir
        sft_warmup.collect_demonstrations(args, demo_dir, image_size=70)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(sft_warmup.DemoError, match="is a file"):
        sft_warmup.collect_demonstrations(args, tmp_path / "a_file", image_size=56)


def test_episode_with_wrong_length_in_sidecar_is_refused(tmp_path: Path) -> None:
    args = toy_args(tmp_path, num_demos=8, val_demos=0, num_envs=8)
    demo_dir = Path(args.demo_dir)
    sft_warmup.collect_demonstrations(args, demo_dir, image_size=56)
    sidecar_path = demo_files(demo_dir)[0].with_suffix(".json")
    sidecar = json.loads(sidecar_path.read_text())
    sidecar["episodes"][3]["elapsed_steps"] = 5
    sidecar_path.write_text(json.dumps(sidecar))
    with pytest.raises(sft_warmup.DemoError, match="traj_3/images"):
        sft_warmup.collect_demonstrations(args, demo_dir, image_size=56)


def test_cli_reports_user_mistakes_in_one_line(tmp_path: Path) -> None:
    args = toy_args(tmp_path, num_demos=8, val_demos=0, num_envs=8)
    sft_warmup.collect_demonstrations(args, Path(args.demo_dir), image_size=56)
    victim = demo_files(Path(args.demo_dir))[0]
    victim.write_bytes(b"\x89HDF\r\n\x1a\n garbage")
    common = ["--split", "toy", "--image-size", "56", "--max-episode-steps", "1", "--num-demos", "8",
              "--val-demos", "0", "--demo-dir", args.demo_dir, "--output-dir", str(tmp_path / "runs")]
    for extra, expected in (([], f"demonstration file {victim} is corrupt"),
                            (["--init-checkpoint", str(tmp_path / "nowhere")], "does not exist")):
        result = subprocess.run([sys.executable, "sft_warmup.py", *common, *extra], cwd=REPO,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 1
        assert "Traceback" not in result.stderr
        assert result.stderr.strip().startswith("error:") and expected in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------------------ training


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One SFT run on the toy task; the agent passed to the last save_checkpoint is kept."""
    tmp_path = tmp_path_factory.mktemp("toy_sft")
    saved = {}
    with pytest.MonkeyPatch.context() as mp:
        real_save = sft_warmup.save_checkpoint
        mp.setattr(sft_warmup, "save_checkpoint",
                   lambda path, agent, state: (saved.update(agent=agent), real_save(path, agent, state)))
        args = toy_args(tmp_path, eval_every=100)
        metrics = sft_warmup.main(args)
    return {"args": args, "metrics": metrics, "agent": saved["agent"],
            "run_dir": Path(args.output_dir) / args.exp_name}


@pytest.mark.slow
def test_sft_learns_the_toy_task_far_above_chance(toy_run: dict) -> None:
    metrics = toy_run["metrics"]
    # Chance is 1/256 per token; dims 0-1 (where to move) depend on image AND instruction, the
    # rest is constant. Both relevant dims must be learned, not just the marginals (~0.5).
    assert metrics["val/token_accuracy"] > 0.9
    assert metrics["val/token_accuracy_dim0"] > 0.85 and metrics["val/token_accuracy_dim1"] > 0.85
    assert metrics["val/l1"] < 0.3
    losses = scalars(toy_run["run_dir"], "train/loss")
    assert np.mean(losses[-10:]) < 0.2 * np.mean(losses[:5])
    assert len(scalars(toy_run["run_dir"], "val/token_accuracy")) == 2  # steps 50 and 100


@pytest.mark.slow
def test_sft_policy_succeeds_on_the_toy_task(toy_run: dict) -> None:
    # Greedy policy in the loop; a random policy succeeds ~12% of the time.
    args = toy_run["args"]
    assert toy_run["metrics"]["eval/success"] >= 0.8
    assert scalars(toy_run["run_dir"], "eval/success") == [toy_run["metrics"]["eval/success"]]
    untrained = build_agent("tiny", image_size=56, seed=args.seed)
    untrained.norm_stats = toy_run["agent"].norm_stats
    before = evaluate_policy(untrained, ToyVecEnv(64, 56, max_episode_steps=1), args.eval_episodes, 0.0,
                             seed=args.seed + 1)
    assert toy_run["metrics"]["eval/success"] > before["success"] + 0.4


@pytest.mark.slow
def test_checkpoint_reloads_to_identical_greedy_actions(toy_run: dict) -> None:
    agent, _ = load_checkpoint(toy_run["run_dir"] / "checkpoint")
    trained = toy_run["agent"]
    np.testing.assert_array_equal(agent.norm_stats.q01, trained.norm_stats.q01)
    env = ToyVecEnv(64, 56, seed=123, max_episode_steps=1)
    obs = env.reset()
    expected = trained.act(obs["image"], obs["instruction"], temperature=0.0)
    got = agent.act(obs["image"], obs["instruction"], temperature=0.0)
    torch.testing.assert_close(got.tokens, expected.tokens, rtol=0, atol=0)
    np.testing.assert_array_equal(got.actions, expected.actions)
    # And the reloaded policy is the trained one, not the base: it mostly does what the expert does.
    agrees = np.sign(got.actions[:, :2]) == np.sign(env.expert_action()[:, :2])
    assert agrees.mean() > 0.8


@pytest.mark.slow
def test_resumed_training_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    small = dict(num_demos=32, val_demos=8, num_envs=8, total_steps=4, batch_size=8, val_every=2,
                 save_every=2, demo_dir=str(tmp_path / "demos"))
    straight = sft_warmup.main(toy_args(tmp_path, exp_name="straight", **small))
    sft_warmup.main(toy_args(tmp_path, exp_name="killed", **{**small, "total_steps": 2}))
    resumed = sft_warmup.main(toy_args(tmp_path, exp_name="killed", resume=True, **small))
    assert resumed["val/loss"] == pytest.approx(straight["val/loss"], rel=1e-5)
    a, state_a = load_checkpoint(tmp_path / "runs" / "straight" / "checkpoint")
    b, state_b = load_checkpoint(tmp_path / "runs" / "killed" / "checkpoint")
    assert state_a["step"] == state_b["step"] == 4
    for p, q in zip(a.lora_parameters(), b.lora_parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_short_run_on_maniskill_collects_real_demonstrations_and_trains(tmp_path: Path) -> None:
    args = sft_warmup.Args(split="ind", num_demos=2, val_demos=0, num_envs=2, image_size=56, total_steps=2,
                           batch_size=4, grad_accum_steps=2, val_every=1, eval_every=0, save_every=1,
                           device="cpu", demo_dir=str(tmp_path / "demos"), output_dir=str(tmp_path / "runs"))
    metrics = sft_warmup.main(args)
    assert np.isfinite(metrics["train/loss"])
    records = sft_warmup.read_demo_records(tmp_path / "demos", image_size=56)
    assert len(records) == 2 and all(r["success"] for r in records)
    for r in records:
        assert r["instruction"].startswith("put ") and 5 <= r["elapsed_steps"] <= 80
        # Idle steps are gone: every kept step moves, turns or toggles the gripper.
        assert len(envs.drop_idle_steps(r["actions"])) == len(r["actions"])
    agent, state = load_checkpoint(tmp_path / "runs" / "sft_warmup" / "checkpoint")
    assert state["step"] == 2 and agent.norm_stats.q99[0] > agent.norm_stats.q01[0]
