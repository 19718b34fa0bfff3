"""Flags given with --resume: each is applied from the next step (and the change printed) or
refused in one line, and the trainer state records what ran. And a file named where a directory
belongs (--output-dir, --init-checkpoint, evaluate_ood's --checkpoint) is one line saying so."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import SIZE, assert_one_line_error, run_cli

import evaluate_ood
import ppo_vla
import sft_warmup
from common import CheckpointError, load_checkpoint, run_script

PPO_FLAGS = ["paper", "--env", "twin", "--image-size", str(SIZE), "--num-envs", "2", "--num-steps", "10",
             "--minibatch-size", "10", "--grad-accum-steps", "1", "--total-iterations", "1",
             "--eval-every", "0", "--save-every", "1", "--device", "cpu", "--exp-name", "twin"]


def ppo_args(tmp_path: Path, **overrides) -> ppo_vla.Args:
    """One small PPO iteration on the twin (two optimizer steps), as PPO_FLAGS say."""
    args = dict(env="twin", image_size=SIZE, num_envs=2, num_steps=10, minibatch_size=10,
                grad_accum_steps=1, total_iterations=1, eval_every=0, save_every=1, device="cpu",
                output_dir=str(tmp_path), exp_name="twin")
    return ppo_vla.Args(**{**args, **overrides})


def sft_args(tmp_path: Path, **overrides) -> sft_warmup.Args:
    """Two SFT steps on 8 twin demonstrations at SIZE px."""
    args = dict(env="twin", image_size=SIZE, num_demos=8, val_demos=0, num_envs=4, total_steps=2,
                batch_size=8, grad_accum_steps=2, learning_rate=1e-3, image_aug=False, eval_every=0,
                save_every=2, device="cpu", demo_dir=str(tmp_path / "demos"),
                output_dir=str(tmp_path / "runs"), exp_name="twin")
    return sft_warmup.Args(**{**args, **overrides})


def record_learning_rates(monkeypatch: pytest.MonkeyPatch) -> list[list[float]]:
    """The learning rates of every AdamW step taken from now on (every script's optimizer)."""
    rates: list[list[float]] = []
    real_step = torch.optim.AdamW.step

    def recording_step(optimizer, *args, **kwargs):
        rates.append([group["lr"] for group in optimizer.param_groups])
        return real_step(optimizer, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    return rates


# ---------------------------------------------------------------------------- applied


def test_resumed_ppo_trains_at_the_new_learning_rates_and_says_so(tmp_path: Path, monkeypatch,
                                                                   capsys) -> None:
    ppo_vla.main(ppo_args(tmp_path))
    capsys.readouterr()
    rates = record_learning_rates(monkeypatch)
    # --image-size not given: the run's own, and recorded as such.
    ppo_vla.main(ppo_args(tmp_path, resume=True, total_iterations=2, image_size=None,
                          learning_rate=2e-4, value_learning_rate=1e-3))
    assert rates and all(step == [2e-4, 1e-3] for step in rates), rates
    err = capsys.readouterr().err
    for change in ("--learning-rate 0.0001 -> 0.0002", "--value-learning-rate 0.003 -> 0.001",
                   "--total-iterations 1 -> 2"):
        assert err.count(f"--resume: {change}\n") == 1, err
    _, state = load_checkpoint(tmp_path / "twin" / "checkpoint")
    assert state["iteration"] == 2
    assert [group["lr"] for group in state["optimizer"]["param_groups"]] == [2e-4, 1e-3]
    ran = state["args"]
    assert (ran["learning_rate"], ran["value_learning_rate"], ran["image_size"]) == (2e-4, 1e-3, SIZE)


def test_resumed_sft_applies_its_learning_rate_and_memory_knob(tmp_path: Path, monkeypatch,
                                                               capsys) -> None:
    sft_warmup.main(sft_args(tmp_path))
    capsys.readouterr()
    rates = record_learning_rates(monkeypatch)
    # SFT's --grad-accum-steps only splits the same batch: a memory knob, changed freely.
    sft_warmup.main(sft_args(tmp_path, resume=True, total_steps=4, learning_rate=5e-4, grad_accum_steps=1))
    assert rates == [[5e-4], [5e-4]]
    err = capsys.readouterr().err
    assert "--resume: --learning-rate 0.001 -> 0.0005\n" in err
    assert "--resume: --grad-accum-steps 2 -> 1\n" in err
    _, state = load_checkpoint(tmp_path / "runs" / "twin" / "checkpoint")
    assert state["step"] == 4 and state["optimizer"]["param_groups"][0]["lr"] == 5e-4
    assert (state["args"]["learning_rate"], state["args"]["grad_accum_steps"]) == (5e-4, 1)


# ---------------------------------------------------------------------------- refused


def test_flags_that_make_another_run_are_refused_in_one_line_naming_each(tmp_path: Path) -> None:
    ppo_vla.main(ppo_args(tmp_path))
    before = (tmp_path / "twin" / "checkpoint" / "trainer_state.pt").read_bytes()
    with pytest.raises(CheckpointError) as info:
        ppo_vla.main(ppo_args(tmp_path, resume=True, num_envs=4, gamma=0.9))
    message = str(info.value)
    assert message.startswith("--resume: ") and "\n" not in message
    assert "--num-envs 4 (the run's: 2)" in message and "--gamma 0.9 (the run's: 0.99)" in message
    # PPO's --grad-accum-steps sets the optimizer step's size: not a memory knob there.
    with pytest.raises(CheckpointError, match=r"--grad-accum-steps 2 \(the run's: 1\)"):
        ppo_vla.main(ppo_args(tmp_path, resume=True, grad_accum_steps=2))
    assert (tmp_path / "twin" / "checkpoint" / "trainer_state.pt").read_bytes() == before


def test_a_changed_flag_is_refused_from_the_command_line(tmp_path: Path) -> None:
    ppo_vla.main(ppo_args(tmp_path))
    result = run_cli("ppo_vla.py", *PPO_FLAGS, "--output-dir", str(tmp_path), "--resume",
                     "--env", "twin", "--seed", "1")
    assert result.returncode == 1
    assert_one_line_error(result, "--resume: --seed 1 (the run's: 0)", "another --exp-name")
    result = run_cli("ppo_vla.py", *PPO_FLAGS, "--output-dir", str(tmp_path), "--resume",
                     "--lora-rank", "4")
    assert_one_line_error(result, "--lora-rank 4 (checkpoint: 32)")


# ---------------------------------------------------------------------------- files for directories


def test_an_output_dir_that_is_a_file_is_one_line_before_torch(tmp_path: Path) -> None:
    file = tmp_path / "runs"
    file.write_text("not a directory")
    result = run_cli("ppo_vla.py", "--output-dir", str(file), without_torch=True)
    assert_one_line_error(result, f"--output-dir {file} is a file, not a directory")
    result = run_cli("sft_warmup.py", "--output-dir", str(file / "deeper"), without_torch=True)
    assert_one_line_error(result, f"--output-dir {file / 'deeper'}: {file} is a file, not a directory")
    run = tmp_path / "out" / "grpo_vla"  # the run directory itself
    run.parent.mkdir()
    run.write_text("")
    result = run_cli("grpo_vla.py", "--output-dir", str(run.parent), without_torch=True)
    assert_one_line_error(result, f"{run} is a file, not a directory")


def test_a_file_given_as_a_checkpoint_is_not_reported_missing(tmp_path: Path) -> None:
    file = tmp_path / "checkpoint.pt"
    file.write_text("")
    result = run_cli("ppo_vla.py", *PPO_FLAGS, "--output-dir", str(tmp_path), "--init-checkpoint", str(file))
    assert_one_line_error(result, f"--init-checkpoint {file} is a file, not a checkpoint directory")
    with pytest.raises(SystemExit) as info:  # SFT checks it before collecting demonstrations
        run_script(sft_warmup.main, sft_args(tmp_path, init_checkpoint=str(file)), "sft", tmp_path)
    assert str(info.value.code) == f"error: --init-checkpoint {file} is a file, not a checkpoint directory"
    assert not (tmp_path / "demos").exists()
    args = evaluate_ood.Args(checkpoint=[str(file)], env="twin", splits=("ind",), episodes=2, seeds=(0,),
                             num_envs=2, output_dir=str(tmp_path / "eval"), device="cpu")
    with pytest.raises(CheckpointError, match="is a file, not a checkpoint directory"):
        evaluate_ood.main(args)
