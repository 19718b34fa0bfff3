"""evaluate_ood.py and common.evaluate_policy: success accounting, paired episodes, the table and
the files it writes, its errors. On the twin (and a fake env) at SIZE px."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from conftest import SIZE, FakeVecEnv, assert_one_line_error, perturb, run_cli, tiny_agent

import evaluate_ood
from common import (
    CheckpointError,
    EpisodeOutcomes,
    calibration_episode_ids,
    evaluate_policy,
    evaluation_episode_ids,
    expert_policy,
    random_policy,
    save_checkpoint,
)
from envs import make_vec_env
from evaluate_ood import Args
from model import build_tiny_vla, save_openvla_dir


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> list[Path]:
    """Two tiny checkpoints (SIZE px) whose policies differ: the second's LoRA is perturbed."""
    root = tmp_path_factory.mktemp("runs")
    paths = []
    for seed in (0, 1):
        agent = tiny_agent(critic="h0", seed=seed, perturbed=seed == 1)
        path = root / f"run_{seed}" / "checkpoint"
        save_checkpoint(path, agent, state={"iteration": 0, "algorithm": "ppo"})
        paths.append(path)
    return paths


def outcomes(successes: list[bool]) -> EpisodeOutcomes:
    n = len(successes)
    return EpisodeOutcomes(np.arange(n), np.array(successes), np.array(successes), np.zeros(n), 1.0)


def quick(tmp_path: Path, **overrides) -> Args:
    return Args(**{"checkpoint": ["base"], "env": "twin", "splits": ("ind",), "episodes": 2, "seeds": (0,),
                   "num_envs": 2, "max_episode_steps": 2, "output_dir": str(tmp_path / "eval"),
                   "device": "cpu", "image_size": SIZE, **overrides})


# ---------------------------------------------------------------------------- accounting


def test_expert_scores_100_and_random_0_on_the_twin() -> None:
    envs = make_vec_env("ind", 16, SIZE, env="twin")
    ids = evaluation_episode_ids(seed=0, split="ind", count=40)  # batches of 16, 16, 8
    expert = evaluate_policy(expert_policy(envs), envs, ids)
    random = evaluate_policy(random_policy(np.random.default_rng(0)), envs, ids)
    assert expert.success_rate == 1.0 and (expert.returns >= 1.1 - 1e-6).all()  # grasp + success
    assert random.success_rate == 0.0
    assert len(random.success) == 40 and list(random.episode_ids) == list(ids)


def test_last_batch_is_padded_and_the_padding_ignored() -> None:
    envs = FakeVecEnv(num_envs=4, max_episode_steps=2)
    ids = evaluation_episode_ids(seed=3, split="ind", count=10)  # batches of 4, 4, 2
    counted = []
    result = evaluate_policy(lambda obs: expert_like(obs, envs), envs, ids, num_videos=6,
                             on_batch=counted.append)
    assert counted == [4, 4, 2]
    assert envs.reset_ids[-1] == [ids[8], ids[9], ids[9], ids[9]], "padded with the last id"
    assert len(result.success) == 10 and result.success.all()
    assert result.returns.tolist() == [2.0] * 10  # dx > 0 at both steps
    assert len(result.videos) == 6 and result.videos[5].shape == (3, SIZE, SIZE, 3)  # reset + 2 steps


def expert_like(obs: dict, envs: FakeVecEnv):
    """The fake env's best policy: always dx > 0."""
    from common import ActOutput

    actions = np.zeros((envs.num_envs, 7), np.float32)
    actions[:, 0] = 1.0
    return ActOutput(actions)


def test_an_evaluation_plays_the_same_episodes_every_time(agent) -> None:
    ids = evaluation_episode_ids(seed=4, split="ind", count=5)
    first, again = FakeVecEnv(max_episode_steps=2), FakeVecEnv(max_episode_steps=2)
    torch.manual_seed(0)
    a = evaluate_policy(agent.as_policy(0.0), first, ids)
    torch.manual_seed(1)  # greedy: the sampling noise does not matter
    b = evaluate_policy(agent.as_policy(0.0), again, ids)
    assert again.reset_ids == first.reset_ids and len(first.reset_ids) == 2  # ceil(5 / 3) batches
    for field in ("episode_ids", "success", "success_once", "returns"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))


def test_success_is_counted_at_the_final_step_only() -> None:
    """A policy that succeeds at step 1 and not at step 2 fails the episode."""
    from common import ActOutput

    envs = FakeVecEnv(num_envs=8, max_episode_steps=2)

    def reach_then_leave(obs: dict) -> ActOutput:
        actions = np.zeros((8, 7), np.float32)
        actions[:, 0] = 1.0 if envs.steps == 0 else -1.0
        return ActOutput(actions)

    ids = evaluation_episode_ids(seed=0, split="ind", count=16)
    result = evaluate_policy(reach_then_leave, envs, ids)
    assert result.success_rate == 0.0 and result.success_once.all()
    assert result.returns.tolist() == [1.0] * 16


def test_episode_ids_depend_only_on_seed_and_split() -> None:
    ids = evaluation_episode_ids(0, "ind", 8)
    assert list(ids) == list(evaluation_episode_ids(0, "ind", 8))
    assert list(ids) != list(evaluation_episode_ids(1, "ind", 8))
    assert list(ids) != list(evaluation_episode_ids(0, "unseen_table", 8))
    assert list(evaluation_episode_ids(0, "ind", 4)) == list(ids[:4]), "more episodes extend the list"


# ---------------------------------------------------------------------------- the summary


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
    # 3 of 4 episodes: the 95% Wilson interval is [30.06, 95.44] (the textbook value).
    np.testing.assert_allclose(summary["ppo"]["ind"].pop("wilson95"), (30.06, 95.44), atol=0.01)
    assert summary["ppo"]["ind"] == {"mean": 75.0, "std": 25.0, "per_seed": [50.0, 100.0]}
    # vision per seed: (0 + 100) / 2 = 50 and (50 + 100) / 2 = 75 -> 62.5 +- 12.5.
    assert summary["ppo"]["avg:vision"] == {"mean": 62.5, "std": 12.5, "per_seed": [50.0, 75.0]}

    table = evaluate_ood.format_table(summary, splits, args).splitlines()
    assert "ppo" in table[1] and "mean ± std over 2 seeds" in table[0]
    assert table[3].split()[:4] == ["ind", "75.0", "±", "25.0"]
    assert table[3].split()[-2:] == ["78.1", "93.8"], "the paper's SFT-16k and PPO rates"
    assert table[4].strip() == "vision"
    assert table[5].split()[:4] == ["unseen_table", "25.0", "±", "25.0"]
    assert table[7].split()[:4] == ["average", "62.5", "±", "12.5"]

    evaluate_ood.write_csv(tmp_path / "r.csv", summary, args)
    rows = list(csv.DictReader(open(tmp_path / "r.csv")))
    assert [(r["dimension"], r["split"], r["mean"]) for r in rows] == [
        ("ind", "ind", "75.00"), ("vision", "unseen_table", "25.00"), ("vision", "noise_weak", "100.00"),
        ("ind", "average", "75.00"), ("vision", "average", "62.50")]
    assert rows[1]["seed_0"] == "0.00" and rows[1]["seed_1"] == "50.00"


def test_calibration_plays_ids_no_evaluation_plays_and_shows_intervals() -> None:
    args = Args(checkpoint=["ppo"], seeds=(1, 2), episodes=8, calibration=True, paper_columns=False)
    first, second = (evaluate_ood.episode_ids_of("ind", seed, args) for seed in (1, 2))
    np.testing.assert_array_equal(np.concatenate([first, second]), calibration_episode_ids("ind", 16))
    evaluation = {int(i) for seed in range(10) for i in evaluation_episode_ids(seed, "ind", 64)}
    assert not evaluation & {int(i) for i in np.concatenate([first, second])}
    summary = evaluate_ood.summarise({"ppo": {"ind": [outcomes([True] * 8), outcomes([False] * 8)]}})
    row = evaluate_ood.format_table(summary, ["ind"], args).splitlines()[3]
    low, high = evaluate_ood.wilson_interval(8, 16)
    assert row.split() == ["ind", "50.0", f"[{low:.1f},", f"{high:.1f}]"], row
    plain = evaluate_ood.format_table(summary, ["ind"], Args(checkpoint=["ppo"], seeds=(1, 2), episodes=8,
                                                             paper_columns=False))
    assert "[" not in plain


def test_paired_differences_and_their_bootstrap_intervals_on_known_answers(tmp_path: Path) -> None:
    # 400 paired episodes: PPO alone succeeds on 40, SFT alone on 20, both or neither on the rest:
    # PPO - SFT = +5 points; per-episode sd sqrt(0.15 * 100^2 - 5^2) = 38.4, so the normal 95%
    # interval is 5 +- 1.96 * 38.4 / 20 = [1.24, 8.76]; the bootstrap's must be close to it.
    sft = [True] * 200 + [False] * 200
    ppo = [True] * 180 + [False] * 20 + [True] * 40 + [False] * 160
    vision_sft, vision_ppo = [True] * 10 + [False] * 90, [False] * 10 + [True] * 10 + [False] * 80
    results = {"SFT": {"ind": [outcomes(sft)], "unseen_table": [outcomes(vision_sft)], "noise_weak": [outcomes(vision_ppo)]},
               "PPO": {"ind": [outcomes(ppo)], "unseen_table": [outcomes(vision_ppo)], "noise_weak": [outcomes(vision_sft)]},
               "same": {"ind": [outcomes(sft)], "unseen_table": [outcomes(vision_sft)], "noise_weak": [outcomes(vision_ppo)]}}
    compared = evaluate_ood.paired_differences(results, "SFT")
    assert set(compared) == {"PPO", "same"}
    assert compared["PPO"]["ind"]["difference"] == pytest.approx(5.0)
    np.testing.assert_allclose(compared["PPO"]["ind"]["ci95"], (1.24, 8.76), atol=0.6)
    assert compared["same"]["ind"] == {"difference": 0.0, "ci95": [0.0, 0.0]}
    # vision: unseen_table +0 (10 vs 10, other episodes), noise_weak +0 the other way round: each
    # split's difference is 0, their average 0, and the interval covers the swaps' noise on both sides.
    assert compared["PPO"]["avg:vision"]["difference"] == pytest.approx(0.0)
    low, high = compared["PPO"]["avg:vision"]["ci95"]
    assert low < -2 and high > 2

    # Hierarchical: 4 training runs, two at +0 and two at +20 on every episode. Pooled as one run,
    # the episodes say 10 +- nothing; drawn run first, the interval spans the runs: [0, 20].
    runs = np.array([[0.0] * 50, [0.0] * 50, [20.0] * 50, [20.0] * 50])
    np.testing.assert_allclose(np.percentile(evaluate_ood.bootstrap_differences({"ind": runs})["ind"], [2.5, 97.5]),
                               (0.0, 20.0))
    pooled = np.percentile(evaluate_ood.bootstrap_differences({"ind": runs.reshape(1, -1)})["ind"], [2.5, 97.5])
    assert 7 < pooled[0] < pooled[1] < 13

    other = {"SFT": results["SFT"], "PPO": {**results["PPO"], "ind": [EpisodeOutcomes(
        np.arange(400) + 1, np.array(ppo), np.array(ppo), np.zeros(400), 1.0)]}}
    with pytest.raises(ValueError, match="played different episodes of ind"):
        evaluate_ood.paired_differences(other, "SFT")

    args = Args(checkpoint=["SFT", "PPO"], seeds=(0,), episodes=400, reference="SFT", paper_columns=False)
    summary = evaluate_ood.summarise(results)
    for label, rows in compared.items():
        for key, paired in rows.items():
            summary[label][key]["vs_reference"] = {"reference": "SFT", **paired}
    table = evaluate_ood.format_table(summary, ["ind", "unseen_table", "noise_weak"], args)
    assert "PPO - SFT" in table and "same - SFT" in table
    ind_row = next(line for line in table.splitlines() if line.startswith("ind"))
    assert "+5.0 [" in ind_row and "+0.0 [ +0.0,  +0.0]" in ind_row
    evaluate_ood.write_csv(tmp_path / "r.csv", summary, args)
    rows = {(r["checkpoint"], r["split"]): r for r in csv.DictReader(open(tmp_path / "r.csv"))}
    assert rows[("PPO", "ind")]["difference"] == "5.00" and rows[("PPO", "ind")]["reference"] == "SFT"
    assert rows[("SFT", "ind")]["difference"] == ""
    with pytest.raises(ValueError, match="--reference 'RL' must name one of"):
        evaluate_ood.check_args(Args(checkpoint=["SFT=a", "PPO=b"], reference="RL", output_dir=str(tmp_path / "o")))


def test_an_excluded_split_is_shown_but_left_out_of_its_dimension_average(tmp_path: Path) -> None:
    # unseen_table 10%, noise_strong 30% (SFT) and 40%, 10% (PPO): with noise_strong excluded the
    # vision average is unseen_table's alone, for the rates and the paired difference alike.
    def rate(k: int) -> list[EpisodeOutcomes]:
        return [outcomes([True] * k + [False] * (100 - k))]
    results = {"SFT": {"ind": rate(50), "unseen_table": rate(10), "noise_strong": rate(30)},
               "PPO": {"ind": rate(60), "unseen_table": rate(40), "noise_strong": rate(10)}}
    kept = evaluate_ood.summarise(results)
    left_out = evaluate_ood.summarise(results, excluded=("noise_strong",))
    assert kept["SFT"]["avg:vision"]["mean"] == pytest.approx(20.0)
    assert left_out["SFT"]["avg:vision"]["mean"] == pytest.approx(10.0)
    assert left_out["PPO"]["noise_strong"]["mean"] == pytest.approx(10.0)  # still reported
    compared = evaluate_ood.paired_differences(results, "SFT", excluded=("noise_strong",))
    assert compared["PPO"]["avg:vision"]["difference"] == pytest.approx(30.0)
    args = Args(checkpoint=["SFT", "PPO"], seeds=(0,), episodes=100, paper_columns=False,
                exclude_from_averages=("noise_strong",))
    table = evaluate_ood.format_table(left_out, ["ind", "unseen_table", "noise_strong"], args)
    assert "noise_strong *" in table and "left out of its dimension's average" in table
    with pytest.raises(ValueError, match="'ind' is not an OOD split of this evaluation"):
        evaluate_ood.check_args(Args(checkpoint=["SFT=a", "PPO=b"], exclude_from_averages=("ind",),
                                     output_dir=str(tmp_path / "o")))
    with pytest.raises(ValueError, match="'noise_strong' is not an OOD split of this evaluation"):
        evaluate_ood.check_args(Args(checkpoint=["SFT=a", "PPO=b"], splits=("ind", "semantics"),
                                     exclude_from_averages=("noise_strong",), output_dir=str(tmp_path / "o")))
    result = run_cli("evaluate_ood.py", "--checkpoint", "base", "--env", "twin", "--splits", "ind",
                     "--exclude-from-averages", "ind", "--output-dir", str(tmp_path / "cli"), without_torch=True)
    assert result.returncode == 2  # the command line checks it before torch, as a one-line usage error
    assert_one_line_error(result, "--exclude-from-averages 'ind' is not an OOD split")


def test_the_kl_table_marks_excluded_splits_and_kl_every_measures_every_nth_step(tmp_path: Path) -> None:
    # The KL table leaves noise_strong out of the vision average and marks it, as the success table does.
    def measured(kl: float) -> list[EpisodeOutcomes]:
        run = outcomes([True, False])
        run.kl_from_base = np.full(2, kl)
        return [run]
    results = {"PPO": {"ind": measured(1.0), "unseen_table": measured(2.0), "noise_strong": measured(6.0)}}
    summary = evaluate_ood.summarise(results, excluded=("noise_strong",))
    assert summary["PPO"]["avg:vision"]["kl_from_base"] == pytest.approx(2.0)
    args = Args(checkpoint=["PPO"], kl=True, kl_every=5, exclude_from_averages=("noise_strong",))
    table = evaluate_ood.format_kl_table(summary, ["ind", "unseen_table", "noise_strong"], args)
    assert "noise_strong *" in table and "unseen_table *" not in table and "every 5th step" in table
    assert "left out of its dimension's average" in table

    # --kl-every 3 over a 7-step episode: the KL of steps 0, 3 and 6 only, the actions of every step.
    class Agent:  # kl_from_base gives the step's index, act counts its calls
        def __init__(self) -> None:
            self.calls, self.acts = 0, 0
        def kl_from_base(self, images, instructions) -> torch.Tensor:
            self.calls += 1
            return torch.full((len(images),), float(self.acts))
        def act(self, images, instructions, temperature):
            self.acts += 1
        device = torch.device("cpu")
    agent = Agent()
    recording = evaluate_ood.RecordingKL(agent, 0.6, every=3)
    for _ in range(7):
        recording({"image": np.zeros((2, 1)), "instruction": ["a", "b"]})
    assert agent.acts == 7 and agent.calls == 3
    assert recording.episode_means(2).tolist() == [3.0, 3.0]  # mean of 0, 3, 6
    recording({"image": np.zeros((2, 1)), "instruction": ["a", "b"]})  # a new episode: step 0 again
    assert agent.calls == 4

    with pytest.raises(ValueError, match="--kl-every 5 needs --kl"):
        evaluate_ood.check_args(Args(checkpoint=["base"], kl_every=5, output_dir=str(tmp_path / "o")))
    result = run_cli("evaluate_ood.py", "--checkpoint", "base", "--env", "twin", "--kl-every", "0", "--kl",
                     "--output-dir", str(tmp_path / "cli"), without_torch=True)
    assert_one_line_error(result, "--kl-every must be")


def test_training_runs_of_a_method_pool_their_rates_and_pair_run_by_run(tmp_path: Path) -> None:
    # NAME repeated: 3 training runs of PPO and of SFT, one evaluation seed of 10 episodes each.
    # PPO's runs succeed on 6 / 8 / 10 episodes, SFT's on 5 / 5 / 5: PPO 80 +- 20 (sample std over
    # runs), and PPO - SFT = +10 / +30 / +50 run by run, +30 on average; drawn run first, the 95%
    # interval spans the runs' differences, far wider than pooling the 30 episodes would give.
    ppo = [outcomes([True] * k + [False] * (10 - k)) for k in (6, 8, 10)]
    sft = [outcomes([True] * 5 + [False] * 5)] * 3
    results = {"SFT": {"ind": sft}, "PPO": {"ind": ppo}, "base": {"ind": [outcomes([False] * 10)]}}
    runs_of = {"SFT": 3, "PPO": 3, "base": 1}
    summary = evaluate_ood.summarise(results, runs_of)
    assert summary["PPO"]["ind"]["mean"] == pytest.approx(80.0) and summary["PPO"]["ind"]["std"] == pytest.approx(20.0)
    assert summary["PPO"]["ind"]["per_run"] == pytest.approx([60.0, 80.0, 100.0])
    assert summary["PPO"]["avg:ind"]["std"] == pytest.approx(20.0)
    assert "per_run" not in summary["base"]["ind"]
    compared = evaluate_ood.paired_differences(results, "SFT", runs_of)
    assert compared["PPO"]["ind"]["difference"] == pytest.approx(30.0)
    low, high = compared["PPO"]["ind"]["ci95"]
    assert low < 12 and high > 48, (low, high)
    pooled = 100 * (evaluate_ood.success_by_run(ppo, 3) - evaluate_ood.success_by_run(sft, 3)).reshape(1, -1)
    pooled_low, pooled_high = np.percentile(evaluate_ood.bootstrap_differences({"ind": pooled})["ind"], [2.5, 97.5])
    assert low < pooled_low and pooled_high < high
    assert compared["base"]["ind"]["difference"] == pytest.approx(-50.0)  # one run, paired with each of SFT's
    args = Args(checkpoint=["SFT=a", "SFT=b", "SFT=c", "PPO=d", "PPO=e", "PPO=f"], seeds=(0,), episodes=10,
                reference="SFT", paper_columns=False)
    table = evaluate_ood.format_table(summary, ["ind"], args)
    assert "over training runs" in table and "interval over training runs, then episodes" not in table
    for label, rows in compared.items():
        for key, paired in rows.items():
            summary[label][key]["vs_reference"] = {"reference": "SFT", **paired}
    table = evaluate_ood.format_table(summary, ["ind"], args)
    assert "interval over training runs, then episodes" in table
    assert next(line for line in table.splitlines() if line.startswith("ind")).split()[4:7] == ["80.0", "±", "20.0"]
    # Pairing needs the same number of runs (or one); a label repeated by accident is refused.
    out = str(tmp_path / "o")
    with pytest.raises(ValueError, match="pairing needs the same number"):
        evaluate_ood.check_args(Args(checkpoint=["SFT=a", "SFT=b", "PPO=c", "PPO=d", "PPO=e"], reference="SFT",
                                     output_dir=out))
    evaluate_ood.check_args(Args(checkpoint=["SFT=a", "SFT=b", "PPO=c", "PPO=d", "base"], reference="SFT",
                                 output_dir=out))
    with pytest.raises(ValueError, match="is given twice"):
        evaluate_ood.check_args(Args(checkpoint=["SFT=a", "SFT=a"], output_dir=out))


def test_one_seed_shows_no_spread_and_several_do() -> None:
    one = {"ppo": {"ind": [outcomes([True, False])], "noise_weak": [outcomes([True, True])]}}
    splits = ["ind", "noise_weak"]
    table = evaluate_ood.format_table(evaluate_ood.summarise(one), splits,
                                      Args(checkpoint=["ppo"], seeds=(0,), episodes=2, paper_columns=False))
    assert "±" not in table and "1 seed, so no spread is shown" in table
    assert table.splitlines()[3].split() == ["ind", "50.0"]
    two = {"ppo": {"ind": [outcomes([True, False])] * 2, "noise_weak": [outcomes([True, True])] * 2}}
    table = evaluate_ood.format_table(evaluate_ood.summarise(two), splits,
                                      Args(checkpoint=["ppo"], seeds=(0, 1), episodes=2, paper_columns=False))
    assert table.splitlines()[3].split() == ["ind", "50.0", "±", "0.0"]


def test_split_names_expand_in_benchmark_order() -> None:
    assert evaluate_ood.resolve_splits(("vision",), "maniskill") == [
        "unseen_table", "texture_weak", "texture_strong", "noise_weak", "noise_strong"]
    assert evaluate_ood.resolve_splits(("noise_weak", "ind", "pretrain"), "twin") == ["ind", "noise_weak", "pretrain"]
    everything = evaluate_ood.resolve_splits(("all",), "twin")
    assert len(everything) == 16 and everything[0] == "ind" and "pretrain" not in everything
    assert [evaluate_ood.dimension_of(s) for s in everything].count("semantics") == 7
    with pytest.raises(ValueError, match="unknown split 'pretrain'"):
        evaluate_ood.resolve_splits(("pretrain",), "maniskill")


def test_checkpoint_labels() -> None:
    assert evaluate_ood.parse_checkpoint("runs/ppo_vla/checkpoint") == ("ppo_vla", "runs/ppo_vla/checkpoint")
    assert evaluate_ood.parse_checkpoint("runs/ppo_vla") == ("ppo_vla", "runs/ppo_vla")
    assert evaluate_ood.parse_checkpoint("PPO=runs/x=1") == ("PPO", "runs/x=1")
    with pytest.raises(ValueError, match="labelled 'run'"):
        evaluate_ood.check_args(Args(checkpoint=["a/run", "b/run"]))
    with pytest.raises(ValueError, match="repeats"):
        evaluate_ood.check_args(Args(checkpoint=["base"], seeds=(1, 1)))


# ---------------------------------------------------------------------------- the script


def test_two_checkpoints_on_two_splits(checkpoints, tmp_path, monkeypatch, capsys) -> None:
    """The whole script: paired episodes, and a table, JSON, CSV, PNG and videos that agree."""
    first_images: list[tuple[str, np.ndarray]] = []  # (split, images at reset), in call order

    def recording_make_env(split, *args, **kwargs):
        envs = make_vec_env(split, *args, **kwargs)
        reset = envs.reset

        def recording_reset(**reset_kwargs):
            obs, info = reset(**reset_kwargs)
            first_images.append((envs.split, obs["image"].copy()))
            return obs, info

        envs.reset = recording_reset
        return envs

    monkeypatch.setattr(evaluate_ood, "make_vec_env", recording_make_env)
    out = tmp_path / "eval"
    args = Args(checkpoint=[str(checkpoints[0].parent), f"perturbed={checkpoints[1]}"], env="twin",
                splits=("pretrain", "ind"), episodes=2, seeds=(0, 1), num_envs=2, max_episode_steps=2,
                video=1, output_dir=str(out), device="cpu", reference="run_0")
    summary = evaluate_ood.main(args)
    printed = capsys.readouterr().out

    # Paired: both checkpoints saw the same initial images, batch by batch; seeds differ.
    half = len(first_images) // 2
    assert half == 2 * 2  # splits x seeds, one batch of 2 episodes each
    for (split_a, a), (split_b, b) in zip(first_images[:half], first_images[half:], strict=True):
        assert split_a == split_b and np.array_equal(a, b)
    assert [split for split, _ in first_images[:half]] == ["ind", "ind", "pretrain", "pretrain"]
    assert not np.array_equal(first_images[0][1], first_images[1][1])  # ind seed 0 vs seed 1

    # JSON: the summary follows from the recorded episodes, whose ids are shared.
    document = json.loads((out / "results.json").read_text())
    assert document["checkpoints"] == {"run_0": str(checkpoints[0].parent), "perturbed": str(checkpoints[1])}
    assert document["splits"] == {"ind": "ind", "pretrain": "pretrain"}
    assert document["summary"] == json.loads(json.dumps(summary))
    for split in ("pretrain", "ind"):
        for i, seed in enumerate((0, 1)):
            runs = [document["episodes"][label][split][i] for label in ("run_0", "perturbed")]
            expected_ids = evaluation_episode_ids(seed, split, 2).tolist()
            assert runs[0]["episode_ids"] == runs[1]["episode_ids"] == expected_ids
            for label, run in zip(("run_0", "perturbed"), runs, strict=True):
                assert len(run["success"]) == 2
                rate = 100 * np.mean(run["success"])
                assert document["summary"][label][split]["per_seed"][i] == pytest.approx(rate)
        # --reference run_0: perturbed's paired difference over both seeds' episodes, in points.
        paired = [np.subtract(*(np.array(document["episodes"][label][split][i]["success"], float)
                                for label in ("perturbed", "run_0"))) for i in (0, 1)]
        versus = document["summary"]["perturbed"][split]["vs_reference"]
        assert versus["reference"] == "run_0" and versus["difference"] == pytest.approx(100 * np.mean(paired))
        assert versus["ci95"][0] <= versus["difference"] <= versus["ci95"][1]
        assert "vs_reference" not in document["summary"]["run_0"][split]

    # CSV: one row per checkpoint and split or dimension average, with the JSON's numbers.
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 2 * 4
    for row in rows:
        key = row["split"] if row["split"] != "average" else f"avg:{row['dimension']}"
        assert float(row["mean"]) == pytest.approx(summary[row["checkpoint"]][key]["mean"], abs=0.005)

    # Printed table: a header with both labels, then one row per split with the summary's numbers.
    lines = printed.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("split"))
    assert lines[header].split()[:3] == ["split", "run_0", "perturbed"]
    for offset, split in ((2, "ind"), (3, "pretrain")):
        expected = [split]
        for label in ("run_0", "perturbed"):
            expected += [f"{summary[label][split]['mean']:.1f}", "±", f"{summary[label][split]['std']:.1f}"]
        assert lines[header + offset].split()[:len(expected)] == expected

    # Chart and videos: real files of the expected shapes.
    chart = imageio.imread(out / "success.png")
    assert chart.ndim == 3 and chart.shape[0] > 400 and chart.shape[1] > 800
    videos = sorted((out / "videos").rglob("*.*"))
    assert len(videos) == 2 * 2  # checkpoints x splits, 1 episode each, first seed only
    frames = imageio.mimread(videos[0])
    assert len(frames) == 3 and frames[0].shape == (SIZE, SIZE, 3)  # reset + 2 steps

    # The two checkpoints as two training runs of one method: their episodes, run after run, and
    # rates pooled with the spread between the runs.
    pooled = evaluate_ood.main(Args(checkpoint=[f"P={checkpoints[0].parent}", f"P={checkpoints[1]}"], env="twin",
                                    splits=("ind",), episodes=2, seeds=(0, 1), num_envs=2, max_episode_steps=2,
                                    output_dir=str(tmp_path / "runs"), device="cpu"))
    assert pooled["P"]["ind"]["per_run"] == pytest.approx([summary[label]["ind"]["mean"] for label in ("run_0", "perturbed")])
    document = json.loads((tmp_path / "runs" / "results.json").read_text())
    assert document["checkpoints"] == {"P": [str(checkpoints[0].parent), str(checkpoints[1])]}
    assert [(e["run"], e["seed"]) for e in document["episodes"]["P"]["ind"]] == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_the_base_model_is_evaluated_without_an_adapter(tmp_path: Path) -> None:
    summary = evaluate_ood.main(quick(tmp_path, seeds=(0,)))
    assert set(summary) == {"base"} and 0 <= summary["base"]["ind"]["mean"] <= 100


# ---------------------------------------------------------------------------- errors


def test_bad_checkpoints_are_clear_errors(checkpoints, tmp_path: Path) -> None:
    def error_of(args: Args, kind=CheckpointError) -> str:
        with pytest.raises(kind) as info:
            evaluate_ood.main(args)
        assert "\n" not in str(info.value)
        return str(info.value)

    missing = error_of(quick(tmp_path, checkpoint=[str(tmp_path / "nowhere")]))
    assert missing == f"checkpoint {tmp_path / 'nowhere'} does not exist"

    # --model-path at other base weights than the checkpoint was trained on.
    vla, tokenizer = build_tiny_vla(SIZE)
    perturb(list(vla.projector.parameters()), seed=3)
    save_openvla_dir(tmp_path / "other_base", vla, tokenizer)
    mismatch = error_of(quick(tmp_path, checkpoint=[str(checkpoints[0])], model_path=str(tmp_path / "other_base")))
    assert "different base weights" in mismatch

    corrupt = tmp_path / "corrupt"
    shutil.copytree(checkpoints[0], corrupt / "checkpoint")
    (corrupt / "checkpoint" / "adapter" / "adapter_model.safetensors").write_bytes(b"not safetensors")
    message = error_of(quick(tmp_path, checkpoint=[str(corrupt)]))
    assert "adapter_model.safetensors is corrupt" in message

    (corrupt / "checkpoint" / "config.json").write_text("{ half a json")
    assert "config.json is corrupt" in error_of(quick(tmp_path, checkpoint=[str(corrupt)]))
    assert not (tmp_path / "eval" / "results.json").exists(), "nothing written"


def test_a_diverged_checkpoint_is_one_line_from_the_command_line(checkpoints, tmp_path: Path) -> None:
    # Finite but huge adapter weights: loads, then its logits overflow when it acts.
    diverged = tmp_path / "diverged" / "checkpoint"
    shutil.copytree(checkpoints[1], diverged)
    from safetensors.torch import load_file, save_file

    tensors = load_file(diverged / "adapter" / "adapter_model.safetensors")
    save_file({k: v * 1e30 if "lora_B" in k else v for k, v in tensors.items()},
              diverged / "adapter" / "adapter_model.safetensors")
    assert all(torch.isfinite(v).all() for v in load_file(diverged / "adapter" / "adapter_model.safetensors").values())
    result = run_cli("evaluate_ood.py", "--checkpoint", str(diverged), "--env", "twin", "--splits", "ind",
                     "--episodes", "2", "--seeds", "0", "--num-envs", "2", "--max-episode-steps", "2",
                     "--output-dir", str(tmp_path / "eval"), "--device", "cpu")
    assert result.returncode == 1
    assert_one_line_error(result, "action_logits is", progress_bars=True)


def test_kl_from_the_base_is_zero_for_the_base_and_leaves_the_outcomes_alone(checkpoints, tmp_path, capsys) -> None:
    # --kl: every checkpoint's KL(pi_base || pi) on the states of its first seed's episodes. run_0's
    # adapters are B = 0 (the base itself): 0 up to rounding (the base's logits come from the cached
    # decode, the checkpoint's from one full forward); the perturbed one's is positive. The KL draws
    # from a fork of torch's generator, so every episode ends as it does without --kl.
    common = dict(checkpoint=[str(checkpoints[0].parent), f"perturbed={checkpoints[1]}"], env="twin",
                  splits=("ind", "noise_weak"), episodes=3, seeds=(0, 1), num_envs=2, max_episode_steps=3,
                  device="cpu", paper_columns=False)
    plain = evaluate_ood.main(Args(**common, output_dir=str(tmp_path / "plain")))
    measured = evaluate_ood.main(Args(**common, output_dir=str(tmp_path / "kl"), kl=True))
    printed = capsys.readouterr().out
    for name in ("plain", "kl"):
        document = json.loads((tmp_path / name / "results.json").read_text())
        episodes = {(label, split, seed["seed"]): seed["success"] for label, by_split in document["episodes"].items()
                    for split, runs in by_split.items() for seed in runs}
        if name == "plain":
            expected = episodes
        assert episodes == expected
    first, second = ({label: document["episodes"][label]["ind"][i] for label in ("run_0", "perturbed")} for i in (0, 1))
    kl = {label: seed["kl_from_base"] for label, seed in first.items()}
    assert "kl_from_base" not in second["perturbed"] and "kl_from_base" not in second["run_0"]
    assert max(map(abs, kl["run_0"])) < 1e-5 and min(kl["perturbed"]) > 1e-3 and len(kl["perturbed"]) == 3
    assert measured["perturbed"]["ind"]["kl_from_base"] == pytest.approx(np.mean(kl["perturbed"]))
    assert measured["perturbed"]["avg:vision"]["kl_from_base"] == measured["perturbed"]["noise_weak"]["kl_from_base"]
    assert "kl_from_base" not in plain["perturbed"]["ind"]
    assert "KL(pi_base || pi)" in printed
    rows = {(r["checkpoint"], r["split"]): r for r in csv.DictReader(open(tmp_path / "kl" / "results.csv"))}
    assert float(rows[("perturbed", "ind")]["kl_from_base"]) == pytest.approx(np.mean(kl["perturbed"]), abs=1e-4)
