"""The paper's ablations (arXiv 2505.19789, section 4) at toy scale on the 2D twin, each a figure with
95% intervals over training seeds, drawn from the runs' own TensorBoard logs:

  1. critic      value head on h0 / the last action position / all 7 concatenated / a separate
                 backbone: success and explained variance against env steps, time and memory per
                 iteration (the paper: h0 best and most stable; separate ~35% slower, ~83% more VRAM)
  2. epochs      PPO epochs per batch 1 / 2 / 5, against env steps and wall-clock (the paper: more
                 epochs, no gain, more time)
  3. warmup      PPO from the SFT warm-up and from the base (the paper: ~50% fewer env steps to
                 the same success with a warm-up)
  4. temperature rollout temperature 0.6 / 1.0 / 1.6 (the paper: 1.0 best, above 1.5 diverges)
  5. algorithms  PPO, GRPO and DPO from the same warm-up, against env steps

One reference run (PPO from the warm-up: h0, 1 epoch, temperature 1.0, the paper's) is shared by
every ablation. A finished run is skipped and an interrupted one resumed, so the command can be
re-run after an interruption:

    python scripts/ablations.py --figures-dir docs/ablations   # `make ablations`: 3 seeds, 2 ranks per run (hours)
    python scripts/ablations.py --only critic --seeds 0 1 2
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only, no window
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repo's modules, from anywhere

from cli import parse_cli  # noqa: E402
from tasks import PRETRAINED_TWIN  # noqa: E402

ABLATIONS = ("critic", "epochs", "warmup", "temperature", "algorithms")
# t quantiles (97.5%) for a 95% interval of a mean over n seeds, by n - 1 (3 seeds: 4.30)
T_975 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}
# Each ablation: its settings (label -> run name) and the paper's setting, the reference of the differences
SETTINGS = {
    "critic": ({"h0": "ppo", "last": "critic-last", "concat": "critic-concat", "separate": "critic-separate"}, "h0"),
    "epochs": ({"1 epoch": "ppo", "2 epochs": "epochs-2", "5 epochs": "epochs-5"}, "1 epoch"),
    "warmup": ({"from the warm-up": "ppo", "from the base": "no-warmup"}, "from the warm-up"),
    "temperature": ({"0.6": "temperature-0.6", "1.0": "ppo", "1.6": "temperature-1.6"}, "1.0"),
    "algorithms": ({"PPO": "ppo", "GRPO": "grpo", "DPO": "dpo"}, "PPO"),
}


@dataclass
class Args:
    """Run the paper's ablations on the twin and draw one figure per ablation."""

    output_dir: str = "ablations"
    """where the runs (OUTPUT_DIR/runs) and their demonstrations go"""
    figures_dir: str | None = None
    """where each ablation's PNG and its numbers (JSON) go; default OUTPUT_DIR/figures"""
    only: tuple[Literal["critic", "epochs", "warmup", "temperature", "algorithms"], ...] = ABLATIONS
    """which ablations to run and draw"""
    seeds: tuple[int, ...] = (0, 1, 2)
    """training seeds of every setting (each run its own --seed; the intervals are over them)"""
    nproc: int = 2
    """ranks per run (torchrun); 1 runs every script in this process"""
    budget: Literal["full", "tiny"] = "full"
    """full: the README's twin recipes; tiny: a random 32 px model and a few env steps (plumbing only)"""
    eval_every: int = 2
    """PPO / GRPO evaluation every K iterations (the curves' points)"""
    success_target: float = 0.58
    """the `ind` success whose first crossing the warm-up figure marks (env steps to reach it): between
    the shipped base's warm-up (50.8%) and PPO at its end (64.5%) (docs/STUDY_PROTOCOL.md, 22nd entry)"""


def runs_of(only: tuple[str, ...]) -> dict[str, tuple[str, list[str]]]:
    """run name -> (script, the setting's own flags, after the twin recipe and the shared flags: the last
    value of a flag wins). '{warmup}' stands for the seed's warm-up checkpoint."""
    runs = {"ppo": ("ppo_vla.py", ["--init-checkpoint", "{warmup}"])}
    if "critic" in only:
        runs |= {f"critic-{c}": ("ppo_vla.py", ["--init-checkpoint", "{warmup}", "--critic", c])
                 for c in ("last", "concat", "separate")}
    if "epochs" in only:
        runs |= {f"epochs-{e}": ("ppo_vla.py", ["--init-checkpoint", "{warmup}", "--epochs", str(e)])
                 for e in (2, 5)}
    if "warmup" in only:
        runs["no-warmup"] = ("ppo_vla.py", ["--model-path", PRETRAINED_TWIN])
    if "temperature" in only:
        runs |= {f"temperature-{t}": ("ppo_vla.py", ["--init-checkpoint", "{warmup}", "--temperature", t])
                 for t in ("0.6", "1.6")}
    if "algorithms" in only:
        runs |= {"grpo": ("grpo_vla.py", ["--init-checkpoint", "{warmup}"]),
                 "dpo": ("dpo_vla.py", ["--init-checkpoint", "{warmup}"])}
    return runs


def budget_flags(script: str, args: Args) -> list[str]:
    """The flags every run of a script gets: the paper's PPO flags, evaluation points, the budget."""
    flags = {"ppo_vla.py": ["--epochs", "1", "--temperature", "1.0", "--eval-every", str(args.eval_every)],
             "grpo_vla.py": ["--eval-every", str(args.eval_every)], "dpo_vla.py": [], "sft_warmup.py": []}[script]
    if args.budget == "tiny":
        flags += {"ppo_vla.py": ["--num-envs", "2", "--num-steps", "4", "--total-iterations", "2", "--minibatch-size",
                                 "4", "--grad-accum-steps", "1", "--eval-episodes", "2", "--max-episode-steps", "4"],
                  "grpo_vla.py": ["--num-envs", "4", "--group-size", "2", "--total-iterations", "2", "--minibatch-size",
                                  "8", "--grad-accum-steps", "1", "--eval-episodes", "2", "--max-episode-steps", "4"],
                  "dpo_vla.py": ["--num-envs", "4", "--num-states", "2", "--rollouts-per-state", "2", "--rounds", "2",
                                 "--eval-episodes", "2", "--max-episode-steps", "4", "--chunk-size", "8"],
                  "sft_warmup.py": ["--model-path", "None", "--image-size", "32", "--num-demos", "4", "--val-demos",
                                    "2", "--total-steps", "2", "--batch-size", "4", "--eval-every", "0"]}[script]
    return flags


def run(script: str, flags: list[str], path: Path, nproc: int) -> None:
    """One training run, skipped when done and resumed when interrupted; its wall-clock in DONE."""
    if (path / "DONE").exists():
        return
    flags = [*flags, "--output-dir", str(path.parent), "--exp-name", path.name, "--device", "cpu"]
    if (path / "checkpoint").exists():
        flags.append("--resume")
    print(f"[{time.strftime('%H:%M:%S')}] {script} {' '.join(flags)}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    if nproc > 1:
        torchrun = Path(sys.executable).with_name("torchrun")
        done = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", str(nproc), script, *flags], cwd=ROOT)
        if done.returncode != 0:  # the script said why on stderr; the finished runs are kept
            sys.exit(f"error: {script} for {path.name} failed (exit {done.returncode}); re-run to resume")
    else:  # in this process: the script's own CLI parsing and main()
        module = __import__(script.removesuffix(".py"))
        module.main(parse_cli(module.Args, module.check_args, getattr(module, "RECIPES", None), argv=flags))
    (path / "DONE").write_text(f"{time.perf_counter() - start:.1f}\n")


# ---------------------------------------------------------------------------- reading the logs


def scalars(path: Path, tag: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of one tag in a run's TensorBoard logs."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(path), size_guidance={"scalars": 0})
    events.Reload()
    if tag not in events.Tags()["scalars"]:
        return np.zeros(0), np.zeros(0)
    points = {e.step: e.value for e in events.Scalars(tag)}  # a resumed run's repeats: the last value
    steps = np.array(sorted(points))
    return steps, np.array([points[s] for s in steps])


def env_steps_and_success(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """eval/success against env steps; DPO logs it per round, so its x is the rounds' env steps summed."""
    steps, success = scalars(path, "eval/success")
    if path.name.startswith("dpo"):
        rounds, spent = scalars(path, "data/env_steps")
        total = dict(zip(rounds.tolist(), np.cumsum(spent).tolist(), strict=True)) | {0: 0.0}
        steps = np.array([total[int(r)] for r in steps])
    return steps, success


def half_width(values: np.ndarray) -> np.ndarray:
    """Half-width of the 95% t-interval of the mean over seeds (axis 0); 0 for one seed."""
    n = len(values)
    return T_975.get(n - 1, 1.96) * values.std(axis=0, ddof=1) / np.sqrt(n) if n > 1 else np.zeros(values.shape[1:])


def mean_interval(curves: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeds' curves on the x they share -> x, mean, half-width of the 95% t-interval (0 for one seed)."""
    shared = sorted(set.intersection(*(set(x.tolist()) for x, _ in curves)))
    values = np.array([[dict(zip(x.tolist(), y.tolist(), strict=True))[s] for s in shared] for x, y in curves])
    return np.array(shared), values.mean(axis=0), half_width(values)


# ---------------------------------------------------------------------------- figures


def draw_curves(ax: plt.Axes, settings: dict[str, list[tuple[np.ndarray, np.ndarray]]], xlabel: str,
                ylabel: str) -> dict[str, dict[str, list[float]]]:
    """One line per setting, mean over seeds with its 95% band -> the numbers drawn."""
    drawn = {}
    for label, curves in settings.items():
        x, mean, half = mean_interval(curves)
        ax.plot(x, mean, marker="o", markersize=3, label=label)
        ax.fill_between(x, mean - half, mean + half, alpha=0.2)
        drawn[label] = {"x": x.tolist(), "mean": mean.tolist(), "ci95_half": half.tolist()}
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(color="0.85", linewidth=0.6)
    ax.legend(fontsize=8)
    return drawn


def final_success(settings: dict[str, list[tuple[np.ndarray, np.ndarray]]],
                  reference: str) -> dict[str, dict[str, float]]:
    """Each setting's success at its last evaluation (mean over seeds, 95% t-interval) and its difference
    from the reference setting's, paired by training seed (the same seed's warm-up and episode ids)."""
    last = {label: np.array([y[-1] for _, y in curves]) for label, curves in settings.items()}
    return {label: {"mean": float(values.mean()), "ci95_half": float(half_width(values)),
                    f"minus_{reference}": float((values - last[reference]).mean()),
                    "difference_ci95_half": float(half_width(values - last[reference]))}
            for label, values in last.items()}


def seconds_at(path: Path, env_steps: np.ndarray) -> np.ndarray:
    """A run's rollout + update seconds summed up to each of these env steps (0 at step 0)."""
    steps, rollout = scalars(path, "time/rollout_s")
    spent = dict(zip(steps.tolist(), np.cumsum(rollout + scalars(path, "time/update_s")[1]).tolist(), strict=True))
    return np.array([spent.get(int(s), 0.0) for s in env_steps])


def per_iteration(paths: list[Path], tag: str) -> tuple[float, float]:
    """Mean over seeds of a per-iteration metric's mean -> (mean, 95% half-width)."""
    values = np.array([scalars(p, tag)[1].mean() for p in paths])
    return float(values.mean()), float(half_width(values))


def figure(name: str, runs: Path, seeds: tuple[int, ...], args: Args, out: Path) -> dict:
    """Draw ablation NAME from the logs under RUNS -> the numbers drawn (also written as JSON)."""
    def paths(run_name: str) -> list[Path]:
        return [runs / f"{run_name}-s{seed}" for seed in seeds]

    settings, reference = SETTINGS[name]
    success = {label: [env_steps_and_success(p) for p in paths(r)] for label, r in settings.items()}
    panels = {"critic": 3, "epochs": 2}.get(name, 1)
    fig, axes = plt.subplots(1, panels, figsize=(4.6 * panels, 3.8), squeeze=False)
    ax = axes[0]
    numbers: dict = {"success": draw_curves(ax[0], success, "env steps", "ind success (eval, at 0.6)"),
                     "final": final_success(success, reference)}
    if name == "critic":
        numbers["explained_variance"] = draw_curves(
            ax[1], {label: [scalars(p, "losses/explained_variance") for p in paths(r)] for label, r in settings.items()},
            "env steps", "explained variance")
        cost = {label: {"seconds_per_iteration": per_iteration(paths(r), "time/rollout_s")[0]
                        + per_iteration(paths(r), "time/update_s")[0],
                        "peak_gb": per_iteration(paths(r), "memory/peak_gb")[0]} for label, r in settings.items()}
        xs = np.arange(len(cost))
        ax[2].bar(xs - 0.2, [c["seconds_per_iteration"] for c in cost.values()], 0.4, label="s / iteration")
        twin = ax[2].twinx()
        twin.bar(xs + 0.2, [c["peak_gb"] for c in cost.values()], 0.4, color="tab:orange", label="peak GB")
        ax[2].set_xticks(xs, list(cost))
        ax[2].set_ylabel("seconds per iteration")
        twin.set_ylabel("peak memory (GB)")
        numbers["cost"] = cost
    elif name == "epochs":
        by_time = {}  # the same points, at the seeds' mean wall-clock (rollout + update seconds, summed)
        for label, r in settings.items():
            x, mean, half = mean_interval(success[label])
            seconds = np.mean([seconds_at(p, x) for p in paths(r)], axis=0)
            ax[1].plot(seconds, mean, marker="o", markersize=3, label=label)
            ax[1].fill_between(seconds, mean - half, mean + half, alpha=0.2)
            by_time[label] = {"seconds": seconds.tolist(), "mean": mean.tolist(), "ci95_half": half.tolist()}
        ax[1].set_xlabel("wall-clock seconds (rollout + update)")
        ax[1].set_ylabel("ind success (eval, at 0.6)")
        ax[1].grid(color="0.85", linewidth=0.6)
        numbers["success_by_seconds"] = by_time
    elif name == "warmup":
        ax[0].axhline(args.success_target, color="0.5", linestyle="--", linewidth=0.8)
        numbers["env_steps_to_target"] = {
            label: [next((float(x) for x, y in zip(*curve, strict=True) if y >= args.success_target), None)
                    for curve in curves] for label, curves in success.items()}
    fig.suptitle(f"{name}: mean of {len(seeds)} training seed(s), 95% t-interval band", fontsize=10)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / f"{name}.png", dpi=120)
    plt.close(fig)
    (out / f"{name}.json").write_text(json.dumps(numbers, indent=1))
    return numbers


def main(args: Args) -> None:
    runs = Path(args.output_dir) / "runs"
    started = time.perf_counter()
    for seed in args.seeds:
        warmup = runs / f"warmup-s{seed}"
        run("sft_warmup.py", ["twin-warmup", "--seed", str(seed), "--demo-dir", str(runs.parent / "demos"),
                              *budget_flags("sft_warmup.py", args)], warmup, args.nproc)
        for name, (script, flags) in runs_of(args.only).items():
            flags = [f.replace("{warmup}", str(warmup / "checkpoint")) for f in flags]
            if args.budget == "tiny" and name == "no-warmup":  # the tiny budget's base: a random 32 px model
                flags = ["--model-path", "None", "--image-size", "32"]
            run(script, ["twin", "--seed", str(seed), *budget_flags(script, args), *flags], runs / f"{name}-s{seed}",
                args.nproc)
    figures = Path(args.figures_dir or runs.parent / "figures")
    for name in args.only:
        figure(name, runs, args.seeds, args, figures)
    print(f"ablations done in {(time.perf_counter() - started) / 60:.1f} min; figures in {figures}", file=sys.stderr)


if __name__ == "__main__":
    main(parse_cli(Args))
