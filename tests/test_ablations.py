"""scripts/ablations.py at a tiny budget: every run of every ablation, then one figure per ablation
drawn from the runs' own TensorBoard logs (the numbers beside each figure are checked against them)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import ablations  # noqa: E402


@pytest.mark.slow
def test_the_driver_runs_every_setting_and_draws_each_figure_from_the_logs(tmp_path: Path) -> None:
    args = ablations.Args(output_dir=str(tmp_path), budget="tiny", nproc=1, seeds=(0, 1))
    ablations.main(args)
    runs, figures = tmp_path / "runs", tmp_path / "figures"
    for name in ablations.ABLATIONS:
        assert (figures / f"{name}.png").stat().st_size > 10_000, name
    numbers = {name: json.loads((figures / f"{name}.json").read_text()) for name in ablations.ABLATIONS}

    # The explained variance of each critic: the mean over the two seeds of what each run logged,
    # with the t-interval of two values (t = 12.71 with one degree of freedom).
    for critic, run in (("h0", "ppo"), ("separate", "critic-separate")):
        logged = [ablations.scalars(runs / f"{run}-s{seed}", "losses/explained_variance") for seed in (0, 1)]
        drawn = numbers["critic"]["explained_variance"][critic]
        assert drawn["x"] == logged[0][0].tolist() == logged[1][0].tolist()
        values = np.array([v for _, v in logged])
        np.testing.assert_allclose(drawn["mean"], values.mean(axis=0), rtol=1e-6)
        np.testing.assert_allclose(drawn["ci95_half"], 12.71 * values.std(axis=0, ddof=1) / np.sqrt(2), rtol=1e-6)
    assert set(numbers["critic"]["cost"]) == {"h0", "last", "concat", "separate"}
    assert all(c["seconds_per_iteration"] > 0 for c in numbers["critic"]["cost"].values())

    # Each setting really ran with its own flags (the last value of a flag wins over the shared ones).
    for run, flag, value in (("epochs-5", "epochs", 5), ("temperature-1.6", "temperature", 1.6),
                             ("critic-concat", "critic", "concat"), ("ppo", "epochs", 1)):
        state = torch.load(runs / f"{run}-s0" / "checkpoint" / "trainer_state.pt", weights_only=False)
        assert state["args"][flag] == value, (run, flag)

    # PPO's points are its logged env steps; DPO's are its rounds' env steps summed.
    ppo = numbers["algorithms"]["success"]["PPO"]
    assert ppo["x"] == ablations.scalars(runs / "ppo-s0", "eval/success")[0].tolist()
    rounds, spent = ablations.scalars(runs / "dpo-s0", "data/env_steps")
    assert numbers["algorithms"]["success"]["DPO"]["x"] == [0.0, *np.cumsum(spent).tolist()] and spent[0] > 0
    assert set(numbers["epochs"]["success_by_seconds"]) == {"1 epoch", "2 epochs", "5 epochs"}
    assert set(numbers["warmup"]["env_steps_to_target"]) == {"from the warm-up", "from the base"}

    # The final success and its difference from the reference, paired by seed, from the last logged points.
    last = {run: np.array([ablations.scalars(runs / f"{run}-s{seed}", "eval/success")[1][-1] for seed in (0, 1)])
            for run in ("ppo", "no-warmup")}
    final = numbers["warmup"]["final"]["from the base"]
    difference = last["no-warmup"] - last["ppo"]
    np.testing.assert_allclose(final["mean"], last["no-warmup"].mean(), rtol=1e-6)
    np.testing.assert_allclose(final["minus_from the warm-up"], difference.mean(), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(final["difference_ci95_half"], 12.71 * difference.std(ddof=1) / np.sqrt(2),
                               rtol=1e-6, atol=1e-9)
    assert numbers["warmup"]["final"]["from the warm-up"]["difference_ci95_half"] == 0.0

    # Done runs are skipped: a second call trains nothing and draws the same numbers.
    before = sorted(p.stat().st_mtime for p in runs.rglob("trainer_state.pt"))
    ablations.main(args)
    assert sorted(p.stat().st_mtime for p in runs.rglob("trainer_state.pt")) == before
    assert json.loads((figures / "critic.json").read_text()) == numbers["critic"]
