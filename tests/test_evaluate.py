"""evaluate_ood.py: success accounting, paired episodes, the files it writes, its errors."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import imageio.v2 as imageio
import numpy as np
import pytest
import torch

import evaluate_ood
from common import build_agent, save_checkpoint
from envs import make_vec_env
from evaluate_ood import Args, EpisodeOutcomes
from toy_env import ToyVecEnv

REPO = Path(__file__).resolve().parents[1]


class RandomPolicy:
    """Uniform actions in the env's [-1, 1] box; images and instructions ignored."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)

    def act(self, images: np.ndarray, instructions: list[str], temperature: float) -> SimpleNamespace:
        return SimpleNamespace(actions=self.rng.uniform(-1.0, 1.0, size=(len(images), 7)).astype(np.float32))


class ExpertPolicy:
    """The env's scripted expert behind the act() interface (it reads the simulator's state)."""

    def __init__(self, envs) -> None:
        self.envs = envs

    def act(self, images: np.ndarray, instructions: list[str], temperature: float) -> SimpleNamespace:
        return SimpleNamespace(actions=self.envs.expert_action())


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> list[Path]:
    """Two tiny-preset checkpoints (56 px) whose policies differ: the second's LoRA is perturbed."""
    root = tmp_path_factory.mktemp("runs")
    paths = []
    for seed in (0, 1):
        agent = build_agent(preset="tiny", image_size=56, device="cpu", seed=seed)
        if seed == 1:
            torch.manual_seed(1)
            with torch.no_grad():
                for p in agent.lora_parameters():
                    p.add_(0.05 * torch.randn_like(p))
        path = root / f"run_{seed}" / "checkpoint"
        save_checkpoint(path, agent, state={"iteration": 0})
        paths.append(path)
    return paths


def outcomes(successes: list[bool]) -> EpisodeOutcomes:
    n = len(successes)
    return EpisodeOutcomes(np.arange(n), np.array(successes), np.array(successes), np.zeros(n), 1.0)


# ---------------------------------------------------------------------------- accounting


def test_toy_expert_scores_100_and_random_about_12_percent() -> None:
    envs = ToyVecEnv(num_envs=200, image_size=16, max_episode_steps=1)
    ids = evaluate_ood.episode_ids_for(seed=0, split="toy", episodes=2000)
    expert, _ = evaluate_ood.run_episodes(ExpertPolicy(envs), envs, ids, temperature=0.6)
    random, _ = evaluate_ood.run_episodes(RandomPolicy(), envs, ids, temperature=0.6)
    assert expert.success_rate == 100.0
    # p = (0.5 * 0.7)^2 = 12.25%; with 2000 episodes the standard error is 0.7 points.
    assert 9.5 < random.success_rate < 15.0
    assert len(random.success) == 2000 and list(random.episode_ids) == list(ids)


def test_last_batch_is_padded_and_the_padding_ignored() -> None:
    envs = ToyVecEnv(num_envs=4, image_size=16, max_episode_steps=2)
    ids = evaluate_ood.episode_ids_for(seed=3, split="toy", episodes=10)  # batches of 4, 4, 2
    result, videos = evaluate_ood.run_episodes(ExpertPolicy(envs), envs, ids, 0.6, num_videos=6)
    assert len(result.success) == 10 and result.success.all()
    assert result.returns.tolist() == [1.0] * 10  # reached the target once, then stayed there
    assert len(videos) == 6 and videos[5].shape == (3, 16, 16, 3)  # reset frame + 2 steps


def test_success_is_counted_at_the_final_step_only() -> None:
    """A policy that reaches the target at step 1 and leaves it at step 2 fails the episode."""
    envs = ToyVecEnv(num_envs=8, image_size=16, max_episode_steps=2)
    moves: list[np.ndarray] = []

    class ReachThenLeave:
        def act(self, images, instructions, temperature):
            moves.append(envs.expert_action() if len(moves) % 2 == 0 else -moves[-1])
            return SimpleNamespace(actions=moves[-1])

    ids = evaluate_ood.episode_ids_for(seed=0, split="toy", episodes=16)
    result, _ = evaluate_ood.run_episodes(ReachThenLeave(), envs, ids, temperature=0.6)
    assert result.success_rate == 0.0 and result.success_once.all()
    assert result.returns.tolist() == [0.0] * 16  # +1 on arrival, -1 on leaving


@pytest.mark.slow
def test_expert_scores_100_and_random_0_on_ind() -> None:
    envs = make_vec_env("ind", num_envs=2, image_size=32, max_episode_steps=80, num_workers=0)
    try:
        ids = evaluate_ood.episode_ids_for(seed=0, split="ind", episodes=2)
        expert, _ = evaluate_ood.run_episodes(ExpertPolicy(envs), envs, ids, temperature=0.6)
        random, _ = evaluate_ood.run_episodes(RandomPolicy(), envs, ids, temperature=0.6)
    finally:
        envs.close()
    assert expert.success_rate == 100.0 and expert.returns.min() > 1.0  # grasp bonuses + success
    assert random.success_rate == 0.0


def test_episode_ids_depend_only_on_seed_and_split() -> None:
    ids = evaluate_ood.episode_ids_for(0, "ind", 8)
    assert list(ids) == list(evaluate_ood.episode_ids_for(0, "ind", 8))
    assert list(ids) != list(evaluate_ood.episode_ids_for(1, "ind", 8))
    assert list(ids) != list(evaluate_ood.episode_ids_for(0, "unseen_table", 8))


def test_summary_table_and_csv_on_hand_computed_numbers(tmp_path: Path) -> None:
    # Two seeds of 2 episodes: per-seed rates ind 50/100, unseen_table 0/50, noise_weak 100/100.
    results = {"ppo": {
        "ind": [outcomes([True, False]), outcomes([True, True])],
        "unseen_table": [outcomes([False, False]), outcomes([True, False])],
        "noise_weak": [outcomes([True, True]), outcomes([True, True])],
    }}
    splits = ["ind", "unseen_table", "noise_weak"]
    args = Args(checkpoint=["ppo"], seeds=(0, 1), episodes=2)
    summary = evaluate_ood.summarise(results)
    assert summary["ppo"]["ind"] == {"mean": 75.0, "std": 25.0, "per_seed": [50.0, 100.0]}
    # vision per seed: (0 + 100) / 2 = 50 and (50 + 100) / 2 = 75 -> 62.5 +- 12.5.
    assert summary["ppo"]["avg:vision"] == {"mean": 62.5, "std": 12.5, "per_seed": [50.0, 75.0]}

    table = evaluate_ood.format_table(summary, splits, args).splitlines()
    assert "ppo" in table[1]
    assert table[3].split() == ["ind", "75.0", "±", "25.0"]
    assert table[4].strip() == "vision"
    assert table[5].split() == ["unseen_table", "25.0", "±", "25.0"]
    assert table[7].split() == ["average", "62.5", "±", "12.5"]

    evaluate_ood.write_csv(tmp_path / "r.csv", summary, args)
    rows = list(csv.DictReader(open(tmp_path / "r.csv")))
    assert [(r["dimension"], r["split"], r["mean"]) for r in rows] == [
        ("ind", "ind", "75.00"), ("vision", "unseen_table", "25.00"), ("vision", "noise_weak", "100.00"),
        ("ind", "average", "75.00"), ("vision", "average", "62.50")]
    assert rows[1]["seed_0"] == "0.00" and rows[1]["seed_1"] == "50.00"


def test_split_names_expand_in_benchmark_order() -> None:
    assert evaluate_ood.resolve_splits(("vision",)) == [
        "unseen_table", "texture_weak", "texture_strong", "noise_weak", "noise_strong"]
    assert evaluate_ood.resolve_splits(("noise_weak", "ind", "toy")) == ["ind", "noise_weak", "toy"]
    everything = evaluate_ood.resolve_splits(("all",))
    assert len(everything) == 16 and everything[0] == "ind" and "toy" not in everything
    assert [evaluate_ood.dimension_of(s) for s in everything].count("semantics") == 7


# ---------------------------------------------------------------------------- the script


@pytest.mark.slow
def test_two_checkpoints_on_toy_and_ind(checkpoints, tmp_path, monkeypatch, capsys) -> None:
    """The whole script: paired episodes, and a table, JSON, CSV, PNG and videos that agree."""
    first_images: list[tuple[str, np.ndarray]] = []  # (split, images at reset), in call order

    def recording_make_env(split, *args, **kwargs):
        envs = make_vec_env(split, *args, **kwargs)
        reset = envs.reset

        def recording_reset(episode_ids=None):
            obs = reset(episode_ids=episode_ids)
            first_images.append((split, obs["image"].copy()))
            return obs

        envs.reset = recording_reset
        return envs

    monkeypatch.setattr(evaluate_ood, "make_vec_env", recording_make_env)
    out = tmp_path / "eval"
    args = Args(checkpoint=[str(checkpoints[0].parent), f"perturbed={checkpoints[1]}"],
                splits=("toy", "ind"), episodes=2, seeds=(0, 1), num_envs=2, num_workers=0,
                max_episode_steps=2, video=1, output_dir=str(out), device="cpu")
    summary = evaluate_ood.main(args)
    printed = capsys.readouterr().out

    # Paired: both checkpoints saw the same initial images, batch by batch; seeds differ.
    half = len(first_images) // 2
    assert half == 2 * 2  # splits x seeds, one batch of 2 episodes each
    for (split_a, a), (split_b, b) in zip(first_images[:half], first_images[half:], strict=True):
        assert split_a == split_b and np.array_equal(a, b)
    assert not np.array_equal(first_images[0][1], first_images[1][1])  # ind seed 0 vs seed 1

    # JSON: the summary follows from the recorded episodes, whose ids are shared.
    document = json.loads((out / "results.json").read_text())
    assert document["checkpoints"] == {"run_0": str(checkpoints[0].parent), "perturbed": str(checkpoints[1])}
    assert document["splits"] == {"toy": "toy", "ind": "ind"}
    assert document["summary"] == json.loads(json.dumps(summary))
    for split in ("toy", "ind"):
        for i, seed in enumerate((0, 1)):
            runs = [document["episodes"][label][split][i] for label in ("run_0", "perturbed")]
            expected_ids = evaluate_ood.episode_ids_for(seed, split, 2).tolist()
            assert runs[0]["episode_ids"] == runs[1]["episode_ids"] == expected_ids
            for label, run in zip(("run_0", "perturbed"), runs, strict=True):
                assert len(run["success"]) == 2
                rate = 100 * np.mean(run["success"])
                assert document["summary"][label][split]["per_seed"][i] == pytest.approx(rate)

    # CSV: one row per checkpoint and split or average, with the JSON's numbers.
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 2 * 4
    for row in rows:
        key = row["split"] if row["split"] != "average" else f"avg:{row['dimension']}"
        assert float(row["mean"]) == pytest.approx(summary[row["checkpoint"]][key]["mean"], abs=0.005)

    # Printed table: a header with both labels, then one row per split with the summary's numbers.
    lines = printed.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("split"))
    assert lines[header].split() == ["split", "run_0", "perturbed"]
    for offset, split in ((2, "ind"), (3, "toy")):
        expected = [split]
        for label in ("run_0", "perturbed"):
            expected += [f"{summary[label][split]['mean']:.1f}", "±", f"{summary[label][split]['std']:.1f}"]
        assert lines[header + offset].split() == expected

    # Chart and videos: real files of the expected shapes.
    chart = imageio.imread(out / "success.png")
    assert chart.ndim == 3 and chart.shape[0] > 400 and chart.shape[1] > 800
    videos = sorted((out / "videos").rglob("*.*"))
    assert len(videos) == 2 * 2  # checkpoints x splits, 1 episode each, first seed only
    frames = imageio.mimread(videos[0])
    assert len(frames) == 3 and frames[0].shape == (56, 56, 3)  # reset + 2 steps


# ---------------------------------------------------------------------------- errors


def test_unknown_split_is_one_line_without_traceback() -> None:
    result = subprocess.run([sys.executable, "evaluate_ood.py", "--checkpoint", "base", "--splits", "visoin"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: unknown split 'visoin'; valid: all,")
    assert "vision" in message and "unseen_table" in message and "reposition" in message


def error_of(args: Args) -> str:
    with pytest.raises(SystemExit) as exit_info:
        evaluate_ood.main(args)
    return str(exit_info.value.code)


def test_bad_checkpoints_are_clear_errors(checkpoints, tmp_path: Path) -> None:
    quick = dict(splits=("toy",), episodes=1, seeds=(0,), output_dir=str(tmp_path / "eval"), device="cpu")
    missing = error_of(Args(checkpoint=[str(tmp_path / "nowhere")], **quick))
    assert missing == f"error: checkpoint {tmp_path / 'nowhere'} does not exist"

    mismatch = error_of(Args(checkpoint=[str(checkpoints[0])], preset="openvla-7b", **quick))
    assert "preset 'tiny', not the requested 'openvla-7b'" in mismatch

    twice = error_of(Args(checkpoint=[str(checkpoints[0]), str(checkpoints[0])], **quick))
    assert "labelled 'run_0'" in twice

    corrupt = tmp_path / "corrupt"
    (corrupt / "checkpoint").parent.mkdir()
    subprocess.run(["cp", "-r", str(checkpoints[0]), str(corrupt / "checkpoint")], check=True)
    (corrupt / "checkpoint" / "adapter" / "adapter_model.safetensors").write_bytes(b"not safetensors")
    message = error_of(Args(checkpoint=[str(corrupt)], **quick))
    assert message.startswith(f"error: cannot load {corrupt}:") and "corrupt" in message
    assert "\n" not in message

    (corrupt / "checkpoint" / "config.json").write_text("{ half a json")
    assert "config.json unreadable" in error_of(Args(checkpoint=[str(corrupt)], **quick))
