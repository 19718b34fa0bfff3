"""Evaluate checkpoints on every out-of-distribution split: a table, a bar chart, JSON and CSV.

The last step of "What Can RL Bring to VLA Generalization?" (Liu et al., 2025; facts in
../shared/PAPER.md): each policy runs on the training distribution (`ind`) and on 15 OOD
splits in three dimensions (vision, semantics, execution), sampling at temperature 0.6, over
several seeds; an episode counts as a success when the object rests on the receptacle at the
final step. Every checkpoint plays the SAME episodes (initial states), so the columns of the
table differ by their policies, not by luckier draws.

    python evaluate_ood.py --checkpoint runs/sft_warmup --checkpoint runs/ppo_vla
    python evaluate_ood.py --checkpoint SFT=runs/sft_warmup --splits vision ind --episodes 16
    python evaluate_ood.py --checkpoint base --model-path /weights/openvla-7b   # no adapter

Writes OUTPUT_DIR/results.json (every episode's id and outcome), results.csv, success.png and,
with --video N, videos/LABEL/*.mp4.
"""

from __future__ import annotations

import csv
import json
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn, Protocol

import imageio.v2 as imageio
import matplotlib
import numpy as np
import torch
import tyro
from tqdm import tqdm

from common import CHECKPOINT_FILES, build_agent, load_checkpoint, resolve_device
from envs import SPLITS, make_vec_env

matplotlib.use("Agg")  # files only, no window: runs on headless machines
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot loads)


@dataclass
class Args:
    checkpoint: Annotated[list[str], tyro.conf.UseAppendAction]
    """checkpoint to evaluate (required, repeatable): a run directory (or its checkpoint/ folder) written by sft_warmup.py, ppo_vla.py, grpo_vla.py or dpo_vla.py, or 'base' for the model without adapter; NAME=PATH sets its column label (default: the run directory's name)"""
    splits: tuple[str, ...] = ("all",)
    """'all' (ind + 15 OOD splits), dimensions ('vision', 'semantics', 'execution'), split names, or 'toy' (the synthetic test task)"""
    episodes: int = 64
    """episodes per split and seed (64 x 3 seeds: the paper's rates are multiples of 1/192)"""
    seeds: tuple[int, ...] = (0, 1, 2)
    """evaluation seeds (paper: 3); (seed, split) fixes the episode ids and the sampling noise"""
    temperature: float = 0.6
    """action-token sampling temperature (paper: 0.6; 0 = greedy)"""
    preset: Literal["tiny", "openvla-7b"] | None = None
    """model preset; default: each checkpoint's own ('tiny' for 'base' without --model-path); when given, a checkpoint trained on another preset is an error"""
    model_path: str | None = None
    """local directory with the official OpenVLA-7B weights (implies --preset openvla-7b); overrides the path stored in the checkpoints"""
    num_envs: int = 16
    """environments stepped together, one batched policy forward per step (capped at --episodes)"""
    num_workers: int | None = None
    """env subprocesses: None = envs.py's default (one per env up to the CPU count), 0 = in this process"""
    image_size: int | None = None
    """rendered image size; default: the model's input size"""
    max_episode_steps: int = 80
    """episode horizon, no early termination (paper: 80)"""
    video: int = 0
    """save videos of the first N episodes of every split (first seed only); 0 = none"""
    output_dir: str = "results/eval_ood"
    """where results.json, results.csv, success.png and videos/ are written"""
    device: str = "auto"
    """'auto' (CUDA if available, else CPU), 'cpu', 'cuda' or 'cuda:N'"""


class Policy(Protocol):
    """Anything that maps a batch of observations to env actions, like common.ActorCritic."""

    def act(self, images: np.ndarray, instructions: list[str], temperature: float) -> Any:
        """Returns an object whose `.actions` is float32 [N, 7] in the env's action space."""
        ...


@dataclass
class EpisodeOutcomes:
    """The episodes of one (checkpoint, split, seed); arrays of length `episodes`."""

    episode_ids: np.ndarray
    success: np.ndarray  # object on the receptacle at the final step: the paper's metric
    success_once: np.ndarray  # succeeded at some step (a policy may knock the object off again)
    returns: np.ndarray
    seconds: float

    @property
    def success_rate(self) -> float:
        return 100.0 * float(np.mean(self.success))


def fail(message: str) -> NoReturn:
    """Stop with one line on stderr and exit status 1: a user's mistake deserves no traceback."""
    raise SystemExit(f"error: {message}")


# ---------------------------------------------------------------------------- splits


def dimension_of(split: str) -> str:
    """'unseen_table' -> 'vision'; a split outside the benchmark (toy) is its own dimension."""
    return SPLITS.get(split, split)


def resolve_splits(requested: tuple[str, ...]) -> list[str]:
    """Expand 'all' and dimension names; keep the benchmark's order so the table groups well."""
    benchmark = [*SPLITS, "toy"]
    dimensions = set(SPLITS.values())
    chosen: set[str] = set()
    for name in requested:
        if name == "all":
            chosen.update(SPLITS)
        elif name in dimensions:
            chosen.update(s for s, d in SPLITS.items() if d == name)
        elif name in benchmark:
            chosen.add(name)
        else:
            valid = ["all", *sorted(dimensions - set(SPLITS)), *benchmark]
            fail(f"unknown split {name!r}; valid: {', '.join(valid)}")
    if not chosen:
        fail("no split chosen: give --splits NAME ... (or all)")
    return [s for s in benchmark if s in chosen]


def episode_ids_for(seed: int, split: str, episodes: int) -> np.ndarray:
    """The episode ids of (seed, split). A pure function, so every checkpoint gets the same
    episodes; crc32 rather than hash() because Python salts string hashes per process."""
    rng = np.random.default_rng([seed, zlib.crc32(split.encode())])
    return rng.integers(0, 2**31 - 1, size=episodes)


# ---------------------------------------------------------------------------- checkpoints


def parse_checkpoint(spec: str) -> tuple[str, str]:
    """'NAME=PATH' -> (NAME, PATH); 'runs/ppo_vla/checkpoint' and 'runs/ppo_vla' -> ('ppo_vla', spec)."""
    if "=" in spec:
        label, path = spec.split("=", 1)
        return label, path
    path = Path(spec)
    label = path.parent.name if path.name == "checkpoint" else path.name
    return label or spec, spec


def checkpoint_dir(path: str) -> Path:
    """Accept a run directory as well as the checkpoint/ folder that the training scripts write."""
    if (Path(path) / "checkpoint" / "config.json").exists():
        return Path(path) / "checkpoint"
    return Path(path)


def check_checkpoints(checkpoints: list[tuple[str, str]], preset: str | None) -> None:
    """Catch bad paths and preset mismatches before an hour goes into the first checkpoint.

    Reads only config.json; corrupt weights show up when load_checkpoint reads them.
    """
    if not checkpoints:
        fail("nothing to evaluate: give --checkpoint RUN_DIR (repeatable), NAME=RUN_DIR or base")
    labels = [label for label, _ in checkpoints]
    for label, path in checkpoints:
        if labels.count(label) > 1:
            fail(f"two checkpoints are labelled {label!r}; name them with NAME=PATH")
        if path == "base":
            continue
        folder = checkpoint_dir(path)
        if not folder.is_dir():
            fail(f"checkpoint {path} does not exist")
        missing = [name for name in CHECKPOINT_FILES if not (folder / name).exists()]
        if missing:
            fail(f"{path} is not a complete checkpoint: missing {', '.join(missing)}")
        try:
            found = json.loads((folder / "config.json").read_text())["preset"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as error:
            fail(f"checkpoint {path} is corrupt: config.json unreadable ({type(error).__name__}: {error})")
        if preset is not None and found != preset:
            fail(f"checkpoint {path} was trained with preset {found!r}, not the requested {preset!r}")


def load_policy(path: str, args: Args, device: torch.device) -> Any:
    """An ActorCritic: the checkpoint's adapter, or for 'base' the bare model (LoRA B = 0)."""
    try:
        if path == "base":
            return build_agent(args.preset or "tiny", args.model_path, image_size=args.image_size,
                               device=device)
        agent, _ = load_checkpoint(checkpoint_dir(path), device=device, preset=args.preset,
                                   model_path=args.model_path)
        return agent
    except (ValueError, OSError) as error:  # CheckpointError is a ValueError
        fail(f"cannot load {path}: {str(error).splitlines()[0]}")


# ---------------------------------------------------------------------------- evaluation


def run_episodes(
    policy: Policy, envs: Any, episode_ids: np.ndarray, temperature: float, num_videos: int = 0,
    progress: tqdm | None = None,
) -> tuple[EpisodeOutcomes, list[np.ndarray]]:
    """Play the given episodes, num_envs at a time, to the end of the horizon.

    Returns the outcomes and the frames [T + 1, H, W, 3] of the first num_videos episodes.
    The last batch is padded by repeating its final id; the padding's results are dropped.
    """
    start_time = time.perf_counter()
    n = envs.num_envs
    success, success_once, returns, videos = [], [], [], []
    for start in range(0, len(episode_ids), n):
        batch = episode_ids[start:start + n]
        obs = envs.reset(episode_ids=np.concatenate([batch, np.repeat(batch[-1:], n - len(batch))]))
        frames = [obs["image"]]
        episode_return = np.zeros(n, dtype=np.float32)
        done = np.zeros(n, dtype=bool)
        while not done.all():
            actions = policy.act(obs["image"], obs["instruction"], temperature=temperature).actions
            obs, reward, done, info = envs.step(np.asarray(actions, dtype=np.float32))
            episode_return += reward
            if len(videos) < num_videos:
                frames.append(obs["image"])
        k = len(batch)
        success.append(info["success"][:k])
        success_once.append(info["success_once"][:k])
        returns.append(episode_return[:k])
        for i in range(min(num_videos - len(videos), k)):
            videos.append(np.stack([frame[i] for frame in frames]))
        if progress is not None:
            progress.update(k)
    outcomes = EpisodeOutcomes(
        episode_ids=np.asarray(episode_ids),
        success=np.concatenate(success).astype(bool),
        success_once=np.concatenate(success_once).astype(bool),
        returns=np.concatenate(returns),
        seconds=time.perf_counter() - start_time,
    )
    return outcomes, videos


def evaluate_on_splits(
    policy: Policy, label: str, splits: list[str], args: Args, image_size: int, progress: tqdm
) -> dict[str, list[EpisodeOutcomes]]:
    """split -> one EpisodeOutcomes per seed. One set of env workers for all the splits: a new
    worker costs ~10 s of imports and Vulkan start-up, switching its split ~0.4 s (measured)."""
    results: dict[str, list[EpisodeOutcomes]] = {}
    envs = None
    try:
        for split in splits:
            progress.set_description(f"{label} | {split}")
            if envs is None or "toy" in (split, envs.split):  # the toy task has no workers to reuse
                if envs is not None:
                    envs.close()
                envs = make_vec_env(split, min(args.num_envs, args.episodes), image_size=image_size,
                                    seed=args.seeds[0], max_episode_steps=args.max_episode_steps,
                                    num_workers=args.num_workers)
            else:
                envs.set_split(split)
            results[split] = []
            for i, seed in enumerate(args.seeds):
                # The sampling noise is paired too: same (seed, split), same random numbers.
                torch.manual_seed(zlib.crc32(f"{seed}/{split}".encode()))
                ids = episode_ids_for(seed, split, args.episodes)
                outcomes, videos = run_episodes(policy, envs, ids, args.temperature,
                                                num_videos=args.video if i == 0 else 0, progress=progress)
                results[split].append(outcomes)
                save_videos(videos, outcomes, Path(args.output_dir) / "videos" / label, split, seed)
    finally:
        if envs is not None:
            envs.close()
    return results


# ---------------------------------------------------------------------------- summary


def mean_std(per_seed: list[float]) -> dict[str, Any]:
    """Mean and std over seeds (population std, so that a single seed reports 0, not NaN)."""
    return {"mean": float(np.mean(per_seed)), "std": float(np.std(per_seed)), "per_seed": per_seed}


def summarise(results: dict[str, dict[str, list[EpisodeOutcomes]]]) -> dict[str, dict[str, dict]]:
    """label -> {split, or 'avg:DIMENSION' -> success rate in %: mean, std, per_seed}.

    A dimension's average is taken per seed over its splits, then mean +- std over seeds: the
    same mean as the paper's average of split means, and a std that is the seed spread of it.
    """
    summary: dict[str, dict[str, dict]] = {}
    for label, by_split in results.items():
        rows = {split: mean_std([o.success_rate for o in runs]) for split, runs in by_split.items()}
        for dimension, members in grouped_splits(list(by_split)).items():
            per_seed = np.mean([rows[s]["per_seed"] for s in members], axis=0)
            rows[f"avg:{dimension}"] = mean_std([float(x) for x in per_seed])
        summary[label] = rows
    return summary


def grouped_splits(splits: list[str]) -> dict[str, list[str]]:
    """dimension -> its splits, in the order given."""
    groups: dict[str, list[str]] = {}
    for split in splits:
        groups.setdefault(dimension_of(split), []).append(split)
    return groups


def format_table(summary: dict[str, dict[str, dict]], splits: list[str], args: Args) -> str:
    """The paper's table: split rows grouped by dimension, one column per checkpoint."""
    labels = list(summary)
    width = max(11, *(len(label) for label in labels))
    name_width = max(16, *(len(s) + 2 for s in splits))

    def row(name: str, key: str) -> str:
        cells = [f"{summary[label][key]['mean']:5.1f} ± {summary[label][key]['std']:4.1f}" for label in labels]
        return f"{name:<{name_width}}" + "".join(f"  {cell:>{width}}" for cell in cells)

    lines = [
        f"success rate (%), mean ± std over {len(args.seeds)} seed(s) x {args.episodes} episodes, "
        f"temperature {args.temperature}",
        f"{'split':<{name_width}}" + "".join(f"  {label:>{width}}" for label in labels),
        "-" * (name_width + len(labels) * (width + 2)),
    ]
    for dimension, members in grouped_splits(splits).items():
        if members == [dimension]:  # ind and toy are dimensions of one split: no heading
            lines.append(row(dimension, dimension))
            continue
        lines.append(dimension)
        lines += [row(f"  {split}", split) for split in members]
        if len(members) > 1:
            lines.append(row("  average", f"avg:{dimension}"))
    return "\n".join(lines)


# ---------------------------------------------------------------------------- files


def write_json(path: Path, results: dict[str, dict[str, list[EpisodeOutcomes]]], summary: dict,
               checkpoints: list[tuple[str, str]], splits: list[str], args: Args) -> None:
    """The arguments, the summary, and every episode's id and outcome (for paired tests later)."""
    document = {
        "unit": "percent of episodes with the object on the receptacle at the final step",
        "args": asdict(args),
        "checkpoints": dict(checkpoints),
        "splits": {split: dimension_of(split) for split in splits},
        "summary": summary,
        "episodes": {
            label: {
                split: [
                    {"seed": seed, "episode_ids": o.episode_ids.tolist(), "success": o.success.tolist(),
                     "success_once": o.success_once.tolist(), "returns": o.returns.tolist(),
                     "seconds": o.seconds}
                    for seed, o in zip(args.seeds, runs, strict=True)
                ]
                for split, runs in by_split.items()
            }
            for label, by_split in results.items()
        },
    }
    path.write_text(json.dumps(document, indent=1))


def write_csv(path: Path, summary: dict[str, dict[str, dict]], args: Args) -> None:
    """One row per (checkpoint, split or dimension average), ready for a spreadsheet."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["checkpoint", "dimension", "split", "mean", "std",
                         *(f"seed_{seed}" for seed in args.seeds)])
        for label, rows in summary.items():
            for key, stats in rows.items():
                dimension, split = (key[4:], "average") if key.startswith("avg:") else (dimension_of(key), key)
                writer.writerow([label, dimension, split, f"{stats['mean']:.2f}", f"{stats['std']:.2f}",
                                 *(f"{x:.2f}" for x in stats["per_seed"])])


def plot_chart(path: Path, summary: dict[str, dict[str, dict]], splits: list[str], args: Args) -> None:
    """Grouped bars: splits along x, grouped by dimension, checkpoints side by side, +- std.

    A narrow right panel repeats the per-dimension averages, the paper's headline numbers.
    """
    labels = list(summary)
    groups = grouped_splits(splits)
    # x positions: one slot per split, and a gap between dimensions.
    positions, x = {}, 0.0
    for members in groups.values():
        for split in members:
            positions[split] = x
            x += 1
        x += 0.6
    # Inches per x slot: room for every bar, and for its number when there are few checkpoints.
    numbers = len(labels) <= 3
    slot = 0.3 + (0.22 if numbers else 0.12) * len(labels)
    # The averages panel only says something new when some dimension has several splits.
    show_averages = any(len(members) > 1 for members in groups.values())
    average_slots = 0.6 + 0.8 * len(groups) if show_averages else 0
    fig, axes = plt.subplots(
        1, 2 if show_averages else 1, sharey=True, squeeze=False,
        figsize=(max(8.5, 1.5 + slot * (x + average_slots)), 5.2),
        gridspec_kw={"width_ratios": [x, average_slots] if show_averages else [x]})
    ax = axes[0, 0]
    draw_bars(ax, summary, splits, [positions[s] for s in splits], numbers)
    for k, (dimension, members) in enumerate(groups.items()):
        left, right = positions[members[0]] - 0.5, positions[members[-1]] + 0.5
        if k % 2 == 0:  # shaded bands tell the dimensions apart at a glance
            ax.axvspan(left - 0.05, right + 0.05, color="0.94", zorder=0)
        ax.text((left + right) / 2, 104, dimension, ha="center", va="bottom", fontsize=10, weight="bold")
    ax.set_xticks([positions[s] for s in splits], [s.replace("_", " ") for s in splits],
                  rotation=35, ha="right", fontsize=9)
    ax.set_xlim(-0.7, x - 0.9)
    ax.set_ylim(0, 112)
    ax.set_yticks(range(0, 101, 20))
    ax.set_ylabel("success rate (%)")

    if show_averages:
        ax_avg, dimensions = axes[0, 1], list(groups)
        draw_bars(ax_avg, summary, [f"avg:{d}" for d in dimensions], list(range(len(dimensions))),
                  numbers=len(labels) <= 4)
        ax_avg.set_xticks(range(len(dimensions)), dimensions, rotation=35, ha="right", fontsize=9)
        ax_avg.set_xlim(-0.6, len(dimensions) - 0.4)
        ax_avg.text((len(dimensions) - 1) / 2, 104, "average", ha="center", va="bottom", fontsize=10,
                    weight="bold")

    fig.suptitle(f"Success rate per split: mean ± std over {len(args.seeds)} seed(s) x {args.episodes} "
                 f"episodes, temperature {args.temperature}", fontsize=12)
    handles, names = ax.get_legend_handles_labels()
    fig.legend(handles, names, loc="upper center", bbox_to_anchor=(0.5, 0.94), ncol=min(len(labels), 6),
               fontsize=10, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def draw_bars(axis: plt.Axes, summary: dict[str, dict[str, dict]], keys: list[str], xs: list[float],
              numbers: bool) -> None:
    """One bar per checkpoint at each x, with its seed std as error bar and optionally its value."""
    labels = list(summary)
    colours = plt.get_cmap("tab10").colors
    bar = 0.8 / len(labels)
    for j, label in enumerate(labels):
        offset = (j - (len(labels) - 1) / 2) * bar
        means = [summary[label][k]["mean"] for k in keys]
        stds = [summary[label][k]["std"] for k in keys]
        axis.bar([p + offset for p in xs], means, bar * 0.92, yerr=stds, capsize=2,
                 color=colours[j % len(colours)], label=label, error_kw={"elinewidth": 0.8})
        for p, mean, std in zip(xs, means, stds, strict=True) if numbers else ():
            axis.text(p + offset, mean + std + 1, f"{mean:.0f}", ha="center", va="bottom", fontsize=7)
    axis.grid(axis="y", color="0.85", linewidth=0.6)
    axis.set_axisbelow(True)


def video_format() -> str:
    """mp4 when an ffmpeg binary is around (the imageio-ffmpeg package ships one), else gif."""
    try:
        import imageio_ffmpeg

        imageio_ffmpeg.get_ffmpeg_exe()
        return "mp4"
    except (ImportError, RuntimeError):
        return "gif"


def save_videos(videos: list[np.ndarray], outcomes: EpisodeOutcomes, folder: Path, split: str, seed: int) -> None:
    """One file per episode, named by split, seed, episode id and outcome."""
    if not videos:
        return
    folder.mkdir(parents=True, exist_ok=True)
    extension = video_format()
    for frames, episode_id, ok in zip(videos, outcomes.episode_ids, outcomes.success, strict=False):
        path = folder / f"{split}_seed{seed}_ep{episode_id}_{'success' if ok else 'fail'}.{extension}"
        if extension == "mp4":  # block size 1: keep the frame size instead of rescaling to 16k
            imageio.mimsave(path, list(frames), fps=10, macro_block_size=1)
        else:
            imageio.mimsave(path, list(frames), duration=100, loop=0)


# ---------------------------------------------------------------------------- main


def main(args: Args) -> dict[str, dict[str, dict]]:
    if args.model_path is not None and args.preset is None:
        args.preset = "openvla-7b"
    if args.episodes < 1 or args.num_envs < 1 or not args.seeds:
        fail("--episodes and --num-envs must be positive and --seeds non-empty")
    splits = resolve_splits(args.splits)
    checkpoints = [parse_checkpoint(spec) for spec in args.checkpoint]
    check_checkpoints(checkpoints, args.preset)
    device = resolve_device(args.device)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    # One checkpoint at a time: two 7B models would not fit in memory together.
    total = len(checkpoints) * len(splits) * len(args.seeds) * args.episodes
    results: dict[str, dict[str, list[EpisodeOutcomes]]] = {}
    with tqdm(total=total, unit="episode", dynamic_ncols=True) as progress:
        for label, path in checkpoints:
            policy = load_policy(path, args, device)
            image_size = args.image_size or policy.image_size
            results[label] = evaluate_on_splits(policy, label, splits, args, image_size, progress)
            del policy  # free its memory before the next one loads

    summary = summarise(results)
    print(format_table(summary, splits, args))
    write_json(output_dir / "results.json", results, summary, checkpoints, splits, args)
    write_csv(output_dir / "results.csv", summary, args)
    plot_chart(output_dir / "success.png", summary, splits, args)
    seconds = sum(o.seconds for by_split in results.values() for runs in by_split.values() for o in runs)
    print(f"{total / seconds:.3g} episodes/s (envs and policy, without set-up); "
          f"wrote {output_dir}/results.json, results.csv, success.png", file=sys.stderr)
    return summary


if __name__ == "__main__":
    main(tyro.cli(Args))
