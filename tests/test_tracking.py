"""CleanRL's --track (Weights & Biases, offline here: no network) and --capture-video, in every
training script: the W&B run gets the flags and the TensorBoard curves, a resumed run continues
the same W&B run, videos of evaluation episodes are written, and without wandb --track is a
one-line error."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import imageio.v2 as imageio
import pytest
from conftest import SIZE

import common
import dpo_vla
import grpo_vla
import ppo_vla
import sft_warmup
from twin_env import TWIN_HORIZON


def ppo_args(tmp_path: Path, **overrides) -> ppo_vla.Args:
    """Two tiny PPO iterations on the twin, evaluated after each on 2 episodes."""
    args = dict(env="twin", image_size=SIZE, num_envs=2, num_steps=10, minibatch_size=10, grad_accum_steps=1,
                total_iterations=2, eval_every=1, eval_episodes=2, save_every=1, device="cpu",
                output_dir=str(tmp_path), exp_name="tracked")
    return ppo_vla.Args(**{**args, **overrides})


def offline_runs(run_path: Path) -> list[Path]:
    return sorted((run_path / "wandb").glob("offline-run-*"))


def written_log(run: Path, patience_s: float = 60.0) -> bytes:
    """The run's .wandb file (what a `wandb sync` would upload), once wandb's writer process has
    flushed past the header: on a loaded machine it lagged the end of main() (a CI run, 2026-12-03)."""
    deadline = time.monotonic() + patience_s
    while True:
        log = next(run.glob("*.wandb")).read_bytes()
        if b"exp_name" in log and b"eval/success" in log or time.monotonic() > deadline:
            return log
        time.sleep(0.5)


def test_track_mirrors_flags_and_curves_to_an_offline_wandb_run_that_a_resume_continues(
        tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    ppo_vla.main(ppo_args(tmp_path, track=True))
    run_path = tmp_path / "tracked"
    run_id = (run_path / "wandb_id").read_text()
    [first] = offline_runs(run_path)
    assert first.name.endswith(run_id)
    log = written_log(first)
    assert b"total_iterations" in log and b"exp_name" in log, "the flags are the W&B run's config"
    assert b"rollout/success" in log and b"eval/success" in log, "the TensorBoard scalars reach W&B"
    assert "wandb" in sys.modules and sys.modules["wandb"].run is None, "the W&B run was finished"

    ppo_vla.main(ppo_args(tmp_path, track=True, resume=True, total_iterations=3))
    runs = offline_runs(run_path)
    assert len(runs) == 2 and all(run.name.endswith(run_id) for run in runs), "the same W&B run, continued"


def test_no_track_no_wandb(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now fails
    ppo_vla.main(ppo_args(tmp_path, total_iterations=1))
    assert not (tmp_path / "tracked" / "wandb").exists()
    with pytest.raises(SystemExit) as info:
        common.run_script(ppo_vla.main, ppo_args(tmp_path, exp_name="other", track=True), "ppo",
                          tmp_path / "other")
    assert str(info.value.code) == "error: --track logs to Weights & Biases: pip install wandb (or drop --track)"


def test_capture_video_saves_the_first_evaluation_episodes_at_each_evaluation(tmp_path: Path) -> None:
    ppo_vla.main(ppo_args(tmp_path, capture_video=True))
    folders = sorted((tmp_path / "tracked" / "videos").iterdir())
    assert [f.name for f in folders] == ["iteration_0", "iteration_1", "iteration_2"]
    for folder in folders:
        videos = sorted(folder.iterdir())
        assert len(videos) == common.VIDEOS_PER_EVALUATION
        frames = imageio.mimread(videos[0])
        assert len(frames) == TWIN_HORIZON + 1 and frames[0].shape[:2] == (SIZE, SIZE)
    ppo_vla.main(ppo_args(tmp_path, exp_name="plain"))
    assert not (tmp_path / "plain" / "videos").exists()


def test_every_training_script_offers_track_and_capture_video() -> None:
    for module in (ppo_vla, grpo_vla, dpo_vla, sft_warmup):
        args = module.Args()
        assert (args.track, args.wandb_project_name, args.wandb_entity, args.capture_video) == (
            False, "cleanvla", None, False), module.__name__
        source = Path(module.__file__).read_text()
        for use in ("args.track", "args.wandb_project_name", "args.wandb_entity", "args.capture_video"):
            assert use in source, f"{module.__name__} ignores --{use[5:].replace('_', '-')}"
