"""Evaluate checkpoints on every out-of-distribution split: a table, a bar chart, JSON and CSV.

The last step of "What Can RL Bring to VLA Generalization?" (arXiv 2505.19789, section 5 and
Table 1; docs/PAPER_NOTES.md): each policy runs on the training distribution (`ind`) and on 15
OOD splits in three dimensions (vision, semantics, execution), sampling at temperature 0.6,
over several seeds; an episode counts as a success when the object rests on the receptacle at
the final step. Every checkpoint plays the SAME episodes (initial states) with the same
sampling noise per batch, so the columns differ by their policies, not by luckier draws.

    python evaluate_ood.py --checkpoint runs/sft_warmup --checkpoint runs/ppo_vla
    python evaluate_ood.py --env twin --checkpoint SFT=runs/sft --splits vision ind --episodes 32
    python evaluate_ood.py --checkpoint base --model-path /weights/openvla-7b   # no adapter
    torchrun --nproc_per_node 4 evaluate_ood.py ...       # episodes shared out, rank 0 writes

Writes OUTPUT_DIR/results.json (every episode's id and outcome), results.csv, success.png and,
with --video N, videos/LABEL/*.mp4.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import tyro

from cli import (
    check_device,
    check_output_dir,
    check_unnorm_key,
    parse_cli,
    require_non_negative,
    require_positive,
)
from tasks import SPLITS, RenderingUnavailable, valid_splits  # numpy only: checked before torch


@dataclass
class Args:
    checkpoint: Annotated[list[str], tyro.conf.UseAppendAction]
    """checkpoint to evaluate (required, repeatable): a run directory (or its checkpoint/) of any
    training script, or 'base' for the base model without adapter; NAME=PATH sets its label, and
    NAME repeated marks training runs (seeds) of one method: rates pooled, spread over the runs"""
    env: Literal["maniskill", "twin"] = "maniskill"
    """task family: the ManiSkill3 benchmark, or its fast 2D twin"""
    splits: tuple[str, ...] = ("all",)
    """'all' (ind + 15 OOD splits), dimensions ('vision', 'semantics', 'execution'), split names"""
    episodes: int = 64
    """episodes per split and seed (64 x 3 seeds: the paper's rates are multiples of 1/192)"""
    seeds: tuple[int, ...] = (0, 1, 2)
    """evaluation seeds (paper: 3); (seed, split) fixes the episode ids and the sampling noise"""
    temperature: float = 0.6
    """action-token sampling temperature (paper: 0.6; 0 = greedy)"""
    model_path: str | None = None
    """the base model's directory now (if it moved since training), or the base of 'base'"""
    unnorm_key: str | None = None
    """which dataset's action statistics of --model-path to use, for 'base' (needed if several;
    a checkpoint keeps the statistics it was trained with)"""
    num_envs: int = 16
    """environments stepped together per rank, one batched policy forward per step"""
    num_workers: int | None = None
    """ManiSkill env subprocesses: None = one per env up to the CPU count, 0 = in this process"""
    image_size: int | None = None
    """rendered image size; default: the model's input size"""
    max_episode_steps: int | None = None
    """episode horizon, no early termination; default the env's (ManiSkill 80, twin 30)"""
    video: int = 0
    """save videos of the first N episodes of every split (first seed only); 0 = none"""
    calibration: bool = False
    """play the calibration episode ids instead of the evaluation ones (docs/STUDY_PROTOCOL.md:
    what the base and the warm-up are tuned on); the table then gives 95% Wilson intervals"""
    kl: bool = False
    """also measure each checkpoint's KL(pi_base || pi) of the action tokens on the states its
    episodes of the first seed visit, per split (forgetting; two model passes more per step there)"""
    kl_every: int = 1
    """with --kl: measure it at every Nth step of an episode only (1 = every state; the demo's 5
    costs a fifth: the states of one episode are alike, the episodes differ)"""
    reference: str | None = None
    """label of the checkpoint the others are compared with: per split and dimension, the paired
    difference in points over the same episodes, with a 95% bootstrap interval (over training runs,
    then episodes: run k of a method is paired with run k of the reference, or with its one run)"""
    exclude_from_averages: tuple[str, ...] = ()
    """OOD splits still evaluated and shown (marked *) but left out of their dimension's average and
    its paired difference (docs/STUDY_PROTOCOL.md, section 5: splits out of calibration range)"""
    paper_columns: bool = True
    """print the paper's SFT-16k and PPO rates beside ours (ManiSkill numbers: direction only)"""
    output_dir: str = "results/eval_ood"
    """where results.json, results.csv, success.png and videos/ are written"""
    device: str = "auto"
    """'auto' (CUDA if available, else CPU), 'cpu', 'cuda' or 'cuda:N'"""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """weights' dtype: auto = bf16 on CUDA, fp32 on the CPU"""


def check_args(args: Args) -> None:
    check_device(args.device)
    check_output_dir(args.output_dir)
    require_positive(args, "episodes", "num_envs", "max_episode_steps", "image_size", "kl_every")
    if args.kl_every != 1 and not args.kl:
        raise ValueError(f"--kl-every {args.kl_every} needs --kl (it says at which steps the KL is measured)")
    require_non_negative(args, "temperature", "video", "num_workers")
    if not args.seeds:
        raise ValueError("--seeds needs at least one seed")
    if len(set(args.seeds)) != len(args.seeds):
        raise ValueError(f"--seeds has repeats: {args.seeds}")
    chosen = resolve_splits(args.splits, args.env)
    for split in args.exclude_from_averages:
        if split not in chosen or SPLITS.get(split, "ind") == "ind":  # called at import: no dimension_of yet
            raise ValueError(f"--exclude-from-averages {split!r} is not an OOD split of this evaluation "
                             f"({', '.join(s for s in chosen if SPLITS.get(s, 'ind') != 'ind')})")
    labels = [parse_checkpoint(spec)[0] for spec in args.checkpoint]
    # 'base' takes --model-path's statistics; a checkpoint keeps those it was trained with.
    check_unnorm_key(args.model_path, args.unnorm_key,
                     required=any(parse_checkpoint(spec)[1] == "base" for spec in args.checkpoint))
    if not labels:
        raise ValueError("nothing to evaluate: give --checkpoint RUN_DIR (repeatable), NAME=RUN_DIR or base")
    for spec in args.checkpoint:  # a label repeated on purpose (NAME=PATH) names training runs
        label, path = parse_checkpoint(spec)
        if labels.count(label) > 1 and "=" not in spec:
            raise ValueError(f"two checkpoints are labelled {label!r}; name them with NAME=PATH (a NAME "
                             "repeated marks training runs of one method)")
        if [parse_checkpoint(other) for other in args.checkpoint].count((label, path)) > 1:
            raise ValueError(f"--checkpoint {spec} is given twice")
    methods = list(dict.fromkeys(labels))
    if args.reference is not None:
        if args.reference not in methods or len(methods) < 2:
            raise ValueError(f"--reference {args.reference!r} must name one of two or more checkpoints "
                             f"(labels: {', '.join(methods)})")
        runs = labels.count(args.reference)
        for label in methods:
            if runs > 1 and labels.count(label) not in (1, runs):
                raise ValueError(f"{label} has {labels.count(label)} training runs and the reference "
                                 f"{args.reference} {runs}: pairing needs the same number (or one)")


def resolve_splits(requested: tuple[str, ...], env: str) -> list[str]:
    """Expand 'all' and dimension names; keep the benchmark's order so the table groups well."""
    benchmark = list(valid_splits(env))
    dimensions = set(SPLITS.values()) - {"ind"}
    chosen: set[str] = set()
    for name in requested:
        if name == "all":
            chosen.update(SPLITS)
        elif name in dimensions:
            chosen.update(s for s, d in SPLITS.items() if d == name)
        elif name in benchmark:
            chosen.add(name)
        else:
            raise ValueError(f"unknown split {name!r}; valid: all, {', '.join(sorted(dimensions))}, "
                             f"{', '.join(benchmark)}")
    if not chosen:
        raise ValueError("no split chosen: give --splits NAME ... (or all)")
    return [s for s in benchmark if s in chosen]


def parse_checkpoint(spec: str) -> tuple[str, str]:
    """'NAME=PATH' -> (NAME, PATH); 'runs/ppo_vla/checkpoint' and 'runs/ppo_vla' -> ('ppo_vla', spec)."""
    if "=" in spec:
        label, path = spec.split("=", 1)
        return label, path
    path = Path(spec)
    label = path.parent.name if path.name == "checkpoint" else path.name
    return label or spec, spec


if __name__ == "__main__":
    ARGS = parse_cli(Args, check_args)  # before the heavy imports: --help answers at once

import csv
import json
import sys
import zlib
from dataclasses import asdict
from typing import Any

import matplotlib
import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from common import (
    CheckpointError,
    EpisodeOutcomes,
    NonFiniteError,
    build_agent,
    calibration_episode_ids,
    evaluate_policy,
    evaluation_episode_ids,
    init_distributed,
    load_checkpoint,
    read_checkpoint_config,
    resolve_dtype,
    save_videos,
    world_info,
)
from envs import make_vec_env

matplotlib.use("Agg")  # files only, no window: runs on headless machines
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot loads)

# arXiv 2505.19789, Table 1 (OpenVLA on ManiSkill3, success %, mean of 3 seeds): SFT-16k / PPO.
PAPER_RATES = {
    "ind": (78.1, 93.8), "unseen_table": (71.9, 84.4), "texture_weak": (71.9, 83.3),
    "texture_strong": (55.7, 63.0), "noise_weak": (70.8, 85.4), "noise_strong": (50.5, 66.7),
    "unseen_objects": (45.3, 71.4), "unseen_receptacles": (61.5, 75.0), "unseen_instructions": (67.2, 89.1),
    "multi_object_seen": (61.5, 75.0), "multi_object_unseen": (29.7, 57.8),
    "distractor_receptacle": (67.2, 81.2), "multi_receptacle": (45.8, 59.9),
    "unseen_position": (56.8, 80.7), "unseen_robot_pose": (33.9, 79.7), "reposition": (28.6, 74.5),
    "avg:vision": (64.2, 76.6), "avg:semantics": (54.0, 72.8), "avg:execution": (39.8, 78.3),
}


def dimension_of(split: str) -> str:
    """'unseen_table' -> 'vision'; a split outside the benchmark (pretrain) is its own dimension."""
    return SPLITS.get(split, split)


def checkpoint_folder(path: str) -> Path:
    """Accept a run directory as well as the checkpoint/ folder that the training scripts write."""
    return Path(path) / "checkpoint" if (Path(path) / "checkpoint" / "config.json").exists() else Path(path)


def load_policy(path: str, args: Args, device: torch.device) -> Any:
    """An agent without critic: the checkpoint's adapter, or for 'base' the bare model (LoRA B = 0)."""
    dtype = resolve_dtype(args.dtype, device)
    if path == "base":
        return build_agent(args.model_path, critic=None, image_size=args.image_size, device=device,
                           unnorm_key=args.unnorm_key, dtype=dtype)
    agent, _ = load_checkpoint(checkpoint_folder(path), device=device, model_path=args.model_path,
                               unnorm_key=args.unnorm_key, critic=None, dtype=dtype)
    return agent


# ---------------------------------------------------------------------------- evaluation


def episode_ids_of(split: str, seed: int, args: Args) -> np.ndarray:
    """The episodes of (split, seed): the evaluation ids, or with --calibration the seed's own
    block of the calibration ids (which no evaluation, demo or RL episode uses)."""
    if not args.calibration:
        return evaluation_episode_ids(seed, split, args.episodes)
    block = args.seeds.index(seed)
    return calibration_episode_ids(split, args.episodes * len(args.seeds))[block * args.episodes:][:args.episodes]



class RecordingKL:
    """The agent as a policy that also records KL(pi_base || pi) at every `every`-th state it acts
    in (steps 0, every, 2 every, ...). The KL's draws come from a fork of torch's generator: the
    actions are those of as_policy."""

    def __init__(self, agent: Any, temperature: float, every: int = 1) -> None:
        self.agent, self.temperature, self.every = agent, temperature, every
        self.steps: list[np.ndarray] = []  # one [num_envs] array per measured step
        self.step = 0

    def __call__(self, obs: dict) -> Any:
        if self.step % self.every == 0:
            with torch.random.fork_rng(devices=[self.agent.device] if self.agent.device.type == "cuda" else []):
                self.steps.append(self.agent.kl_from_base(obs["image"], obs["instruction"]).cpu().numpy())
        self.step += 1
        return self.agent.act(obs["image"], obs["instruction"], self.temperature)

    def episode_means(self, count: int) -> np.ndarray:
        """The mean KL over the measured states of the first COUNT envs' episode [COUNT]; starts afresh."""
        means, self.steps, self.step = np.stack(self.steps).mean(0)[:count], [], 0
        return means


def evaluate_on_splits(agent: Any, label: str, splits: list[str], args: Args, image_size: int,
                       progress: tqdm, render_device: str | None = None) -> dict[str, list[EpisodeOutcomes]]:
    """split -> one EpisodeOutcomes per seed, the same on every rank.

    The episodes of every (split, seed) are cut into batches of num_envs; the batches of all
    (split, seed) are dealt to the ranks in turn, each rank plays its own without waiting, and
    one gather at the end puts them back in order. torch is seeded by (seed, split, b) before
    batch b, so every episode's sampling noise, and so its outcome, is the same whatever the
    number of ranks. One set of envs for all splits: a ManiSkill worker costs ~10 s to start,
    switching its split ~0.4 s (measured)."""
    rank, world = world_info()
    batch_size = min(args.num_envs, args.episodes)
    starts = range(0, args.episodes, batch_size)
    # The KL's episodes (the first seed's) first: the adapters are merged for all the others.
    def measures_kl(seed: int) -> bool:
        return args.kl and seed == args.seeds[0]
    jobs = sorted(((split, seed, b) for split in splits for seed in args.seeds for b in range(len(starts))),
                  key=lambda job: not measures_kl(job[1]))  # stable: the order is kept within each part
    envs = make_vec_env(splits[0], batch_size, image_size, seed=args.seeds[0],
                        max_episode_steps=args.max_episode_steps, env=args.env, num_workers=args.num_workers,
                        render_device=render_device)
    played = [min(batch_size, args.episodes - start) for start in starts]  # episodes per batch
    plain, recording = agent.as_policy(args.temperature), RecordingKL(agent, args.temperature, args.kl_every)
    merged = False
    mine: dict[tuple[str, int, int], EpisodeOutcomes] = {}
    try:
        for turn, (split, seed, b) in enumerate(jobs[rank::world]):
            progress.set_description(f"{label} | {split}")
            if envs.split != split:
                envs.set_split(split)
            ids = episode_ids_of(split, seed, args)[starts[b]:starts[b] + batch_size]
            torch.manual_seed(zlib.crc32(f"{seed}/{split}/{b}".encode()))
            videos = max(0, args.video - starts[b]) if seed == args.seeds[0] else 0
            # The KL only on the first seed's episodes: at every state it made an episode ~2.5x
            # dearer (measured; 32 episodes gave a split's mean KL to about +-30%, 95%).
            kl = measures_kl(seed)
            if not kl and not merged:
                # The LoRA adapters folded into the weights they adapt (W + scale B A): the same
                # policy up to float rounding, acting 1.39x faster (benchmarks/bench_sampling.py).
                # After the KL's episodes: kl_from_base switches the adapters off.
                agent.policy.merge_adapter()
                merged = True
            mine[split, seed, b] = evaluate_policy(recording if kl else plain, envs, ids, videos)
            if kl:
                mine[split, seed, b].kl_from_base = recording.episode_means(len(ids))
            # the bar (rank 0's) counts this turn's batches of all ranks, played meanwhile
            progress.update(sum(played[job[2]] for job in jobs[turn * world:(turn + 1) * world]))
    finally:
        envs.close()
    everything = gather_batches(mine)
    results = {split: [merge_batches([everything[split, seed, b] for b in range(len(starts))])
                       for seed in args.seeds] for split in splits}
    if rank == 0:
        for split in splits:
            for seed, outcomes in zip(args.seeds, results[split], strict=True):
                save_videos(outcomes, Path(args.output_dir) / "videos" / label, f"{split}_seed{seed}_")
    return results


def gather_batches(mine: dict[tuple[str, int, int], EpisodeOutcomes]
                   ) -> dict[tuple[str, int, int], EpisodeOutcomes]:
    """Every rank's batches, keyed by (split, seed, batch), on every rank: one collective call."""
    _, world = world_info()
    if world == 1:
        return mine
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, mine)
    return {key: outcomes for part in parts for key, outcomes in part.items()}


def merge_batches(batches: list[EpisodeOutcomes]) -> EpisodeOutcomes:
    """The batches of one (split, seed), in order -> one EpisodeOutcomes."""
    kl = [o.kl_from_base for o in batches]
    return EpisodeOutcomes(*(np.concatenate([getattr(o, f) for o in batches])
                             for f in ("episode_ids", "success", "success_once", "returns")),
                           seconds=sum(o.seconds for o in batches),
                           videos=[v for o in batches for v in o.videos],
                           kl_from_base=None if kl[0] is None else np.concatenate(kl))


# ---------------------------------------------------------------------------- summary


def mean_std(per_seed: list[float]) -> dict[str, Any]:
    """Mean and std over seeds (population std; with one seed there is no spread to report)."""
    return {"mean": float(np.mean(per_seed)), "std": float(np.std(per_seed)), "per_seed": per_seed}


def rates_summary(rates: np.ndarray) -> dict[str, Any]:
    """Success rates [R training runs, S evaluation seeds] -> mean, std and per_seed (the mean over
    runs); with several runs also per_run, and the std is then the spread between training runs
    (sample std: what a new run would differ by), not the evaluation seeds'."""
    if len(rates) == 1:
        return mean_std([float(x) for x in rates[0]])
    per_run = rates.mean(axis=1)
    return {"mean": float(rates.mean()), "std": float(np.std(per_run, ddof=1)),
            "per_seed": [float(x) for x in rates.mean(axis=0)], "per_run": [float(x) for x in per_run]}


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a success rate, in %: sensible at 0 and n successes too."""
    p = successes / n
    centre, half = p + z * z / (2 * n), z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return 100 * (centre - half) / (1 + z * z / n), 100 * (centre + half) / (1 + z * z / n)


def summarise(results: dict[str, dict[str, list[EpisodeOutcomes]]],
              runs_of: dict[str, int] | None = None, excluded: tuple[str, ...] = ()) -> dict[str, dict[str, dict]]:
    """label -> {split, or 'avg:DIMENSION' -> success rate in %: mean, std, per_seed (and per_run);
    a split also 'wilson95', the 95% interval of its rate over all its episodes}. A label's list
    holds its training runs' evaluation seeds, run after run (runs_of[label] runs; default 1).

    A dimension's average is taken per (run, seed) over its splits, then mean +- std over seeds
    (over training runs when there are several): the same mean as the paper's average of split
    means, and a std that is the spread of it.
    """
    summary: dict[str, dict[str, dict]] = {}
    for label, by_split in results.items():
        count = (runs_of or {}).get(label, 1)
        rates = {split: 100 * np.array([o.success_rate for o in runs]).reshape(count, -1)
                 for split, runs in by_split.items()}  # [R, S] each
        rows = {split: rates_summary(r) for split, r in rates.items()}
        for split, runs in by_split.items():
            successes = int(sum(o.success.sum() for o in runs))
            rows[split]["wilson95"] = wilson_interval(successes, sum(len(o.success) for o in runs))
            measured = [o.kl_from_base for o in runs if o.kl_from_base is not None]  # first seeds' episodes
            if measured:  # nats per state: the mean over episodes of each episode's mean
                rows[split]["kl_from_base"] = float(np.mean(np.concatenate(measured)))
        for dimension, members in grouped_splits(list(by_split), excluded).items():
            rows[f"avg:{dimension}"] = rates_summary(np.mean([rates[s] for s in members], axis=0))
            if all("kl_from_base" in rows[s] for s in members):
                rows[f"avg:{dimension}"]["kl_from_base"] = float(np.mean([rows[s]["kl_from_base"] for s in members]))
        summary[label] = rows
    return summary


def with_dimension_averages(per_split: dict[str, Any], excluded: tuple[str, ...] = ()) -> dict[str, Any]:
    """per_split plus 'avg:DIMENSION' -> the mean of its splits' values but the excluded ones (floats
    or arrays alike)."""
    averages = {f"avg:{dimension}": np.mean([per_split[s] for s in members], axis=0)
                for dimension, members in grouped_splits(list(per_split), excluded).items()}
    return {**per_split, **averages}


def bootstrap_differences(differences: dict[str, np.ndarray], samples: int = 2000, seed: int = 0,
                          excluded: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """Bootstrap distribution [SAMPLES] of the mean paired difference, per split and 'avg:DIMENSION'.

    differences[split]: [R, N] the per-episode differences (checkpoint minus reference, in points)
    of R training runs on the same N episodes. Hierarchical: runs are drawn with replacement, then
    episodes within each drawn run (with R = 1, a plain bootstrap over episodes). A dimension's
    average is the mean of its splits' resampled means, each split resampled on its own."""
    rng = np.random.default_rng(seed)
    drawn: dict[str, np.ndarray] = {}
    for split, diff in differences.items():
        runs, episodes = diff.shape
        run = rng.integers(0, runs, size=(samples, runs))  # [S, R]
        episode = rng.integers(0, episodes, size=(samples, runs, episodes))  # [S, R, N]
        drawn[split] = diff[run[:, :, None], episode].mean(axis=(1, 2))
    return with_dimension_averages(drawn, excluded)


def success_by_run(outcomes: list[EpisodeOutcomes], runs: int) -> np.ndarray:
    """The runs' evaluation seeds, run after run -> success [R, N] (every seed's episodes per run)."""
    seeds = len(outcomes) // runs
    return np.stack([np.concatenate([o.success for o in outcomes[k * seeds:(k + 1) * seeds]])
                     for k in range(runs)]).astype(float)


def paired_differences(results: dict[str, dict[str, list[EpisodeOutcomes]]], reference: str,
                       runs_of: dict[str, int] | None = None,
                       excluded: tuple[str, ...] = ()) -> dict[str, dict[str, dict]]:
    """label -> {split or 'avg:DIMENSION' -> {'difference': the mean paired difference in points
    (label minus reference, over the same episodes), 'ci95': its 95% bootstrap interval}} for every
    checkpoint but the reference. With several training runs (runs_of, as in summarise) run k is
    paired with the reference's run k (or one side's only run with each of the other's), and the
    interval is over runs, then episodes (bootstrap_differences)."""
    runs_of = runs_of or {}
    compared: dict[str, dict[str, dict]] = {}
    for label, by_split in results.items():
        if label == reference:
            continue
        differences = {}
        for split, runs in by_split.items():
            theirs = results[reference][split]
            ours_ids, their_ids = (np.concatenate([o.episode_ids for o in r[:len(r) // runs_of.get(name, 1)]])
                                   for name, r in ((label, runs), (reference, theirs)))
            if not np.array_equal(ours_ids, their_ids):  # every run of a label plays its first run's episodes
                raise ValueError(f"{label} and {reference} played different episodes of {split}")
            success = [success_by_run(r, runs_of.get(name, 1)) for name, r in ((label, runs), (reference, theirs))]
            differences[split] = 100 * (success[0] - success[1])  # [R, N]: a one-run side broadcasts
        observed = with_dimension_averages({split: float(d.mean()) for split, d in differences.items()}, excluded)
        drawn = bootstrap_differences(differences, excluded=excluded)
        compared[label] = {key: {"difference": float(observed[key]),
                                 "ci95": [float(x) for x in np.percentile(drawn[key], [2.5, 97.5])]}
                           for key in observed}
    return compared


def grouped_splits(splits: list[str], excluded: tuple[str, ...] = ()) -> dict[str, list[str]]:
    """dimension -> its splits but the excluded ones, in the order given."""
    groups: dict[str, list[str]] = {}
    for split in splits:
        if split not in excluded:
            groups.setdefault(dimension_of(split), []).append(split)
    return groups


def format_table(summary: dict[str, dict[str, dict]], splits: list[str], args: Args) -> str:
    """The paper's table: split rows grouped by dimension, one column per checkpoint, and the
    paper's SFT-16k / PPO rates at the right (ManiSkill with OpenVLA-7B: for direction only)."""
    labels = list(summary)
    runs = max(len(rows[next(iter(rows))].get("per_run", [None])) for rows in summary.values())
    spread = len(args.seeds) > 1 or runs > 1
    width = max(13 if spread else 7, *(len(label) for label in labels))
    name_width = max(16, *(len(s) + 2 for s in splits))
    paper = args.paper_columns

    intervals = args.calibration
    width = max(width, 19) if intervals else width

    def cell(stats: dict) -> str:
        if intervals and "wilson95" in stats:
            return f"{stats['mean']:5.1f} [{stats['wilson95'][0]:4.1f}, {stats['wilson95'][1]:5.1f}]"
        return f"{stats['mean']:5.1f}" + (f" ± {stats['std']:4.1f}" if spread else "")

    compared = [label for label in labels if "vs_reference" in summary[label][next(iter(summary[label]))]]
    versus = [f"{label} - {args.reference}" for label in compared]
    versus_width = max([22, *(len(v) for v in versus)])

    def difference(stats: dict) -> str:
        d = stats["vs_reference"]
        return f"{d['difference']:+5.1f} [{d['ci95'][0]:+5.1f}, {d['ci95'][1]:+5.1f}]"

    def row(name: str, key: str) -> str:
        cells = [cell(summary[label][key]) for label in labels]
        line = f"{name:<{name_width}}" + "".join(f"  {cell:>{width}}" for cell in cells)
        line += "".join(f"  {difference(summary[label][key]):>{versus_width}}" for label in compared)
        if paper and key in PAPER_RATES:
            line += "   | " + "  ".join(f"{x:7.1f}" for x in PAPER_RATES[key])
        return line

    header = f"{'split':<{name_width}}" + "".join(f"  {label:>{width}}" for label in labels)
    header += "".join(f"  {v:>{versus_width}}" for v in versus)
    if paper:
        header += "   | " + "  ".join(f"{x:>7}" for x in ("SFT-16k", "PPO"))
    seeds = f"mean ± std over {len(args.seeds)} seeds" if spread else "1 seed, so no spread is shown"
    if runs > 1:
        seeds = (f"mean ± std over training runs (up to {runs} per method; the spread between them), each "
                 f"on {len(args.seeds)} evaluation seed(s)")
    if intervals:
        seeds = f"CALIBRATION ids, mean [95% Wilson interval] of each split's {len(args.seeds) * args.episodes} episodes"
    lines = [f"success rate (%): {seeds}, {args.episodes} episodes each, temperature {args.temperature}, "
             f"env {args.env}" + ("; right: the paper's OpenVLA-7B on ManiSkill3 (Table 1)" if paper else ""),
             header, "-" * len(header)]
    if versus:
        over = "training runs, then episodes" if runs > 1 else "episodes"
        lines.insert(1, f"{', '.join(versus)}: paired difference in points over the same episodes, "
                        f"[95% bootstrap interval over {over}]")
    for dimension, members in grouped_splits(splits).items():
        if members == [dimension]:  # ind is a dimension of one split: no heading
            lines.append(row(dimension, dimension))
            continue
        lines.append(dimension)
        lines += [row(f"  {split}" + (" *" if split in args.exclude_from_averages else ""), split) for split in members]
        if len(members) > 1:
            lines.append(row("  average", f"avg:{dimension}"))
    if args.exclude_from_averages:
        lines.append("* left out of its dimension's average (--exclude-from-averages; docs/STUDY_PROTOCOL.md)")
    return "\n".join(lines)


def format_kl_table(summary: dict[str, dict[str, dict]], splits: list[str], args: Args) -> str:
    """KL(pi_base || pi) per split and dimension average, one column per checkpoint (--kl);
    splits left out of the averages marked * as in the success table."""
    labels = list(summary)
    width, name_width = max(8, *(len(label) for label in labels)), max(16, *(len(s) + 4 for s in splits))
    header = f"{'split':<{name_width}}" + "".join(f"  {label:>{width}}" for label in labels)
    every = "" if args.kl_every == 1 else f" (every {args.kl_every}th step)"
    lines = ["KL(pi_base || pi) of the action tokens at temperature 1, nats per state, mean over the states"
             f"{every} of each checkpoint's own episodes of the first seed (forgetting: 0 = the base's policy)",
             header, "-" * len(header)]
    for dimension, members in grouped_splits(splits).items():
        keys = [(dimension, dimension)]
        if members != [dimension]:
            lines.append(dimension)
            keys = [(split, f"  {split}" + (" *" if split in args.exclude_from_averages else ""))
                    for split in members] + ([(f"avg:{dimension}", "  average")] if len(members) > 1 else [])
        for key, name in keys:
            lines.append(f"{name:<{name_width}}" + "".join(f"  {summary[label][key]['kl_from_base']:>{width}.4f}"
                                                            for label in labels))
    if args.exclude_from_averages:
        lines.append("* left out of its dimension's average (--exclude-from-averages)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- files


def paths_of(checkpoints: list[tuple[str, str]]) -> dict[str, list[str]]:
    """label -> its paths, in the order given (several: training runs of one method)."""
    paths: dict[str, list[str]] = {}
    for label, path in checkpoints:
        paths.setdefault(label, []).append(path)
    return paths


def write_json(path: Path, results: dict[str, dict[str, list[EpisodeOutcomes]]], summary: dict,
               checkpoints: list[tuple[str, str]], splits: list[str], args: Args) -> None:
    """The arguments, the summary, and every episode's id and outcome (for paired tests later)."""
    document = {
        "unit": "percent of episodes with the object on the receptacle at the final step",
        "args": asdict(args),
        "checkpoints": {label: paths[0] if len(paths) == 1 else paths
                        for label, paths in paths_of(checkpoints).items()},
        "splits": {split: dimension_of(split) for split in splits},
        "summary": summary,
        "paper_sft16k_ppo": {k: v for k, v in PAPER_RATES.items() if k in summary[next(iter(summary))]},
        "episodes": {
            label: {
                split: [
                    {"run": i // len(args.seeds), "seed": args.seeds[i % len(args.seeds)],
                     "episode_ids": o.episode_ids.tolist(), "success": o.success.tolist(),
                     "success_once": o.success_once.tolist(), "returns": o.returns.tolist(),
                     "seconds": o.seconds,
                     **({} if o.kl_from_base is None else {"kl_from_base": o.kl_from_base.tolist()})}
                    for i, o in enumerate(runs)
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
                         *(f"seed_{seed}" for seed in args.seeds), "wilson95_low", "wilson95_high",
                         "reference", "difference", "difference95_low", "difference95_high", "kl_from_base"])
        for label, rows in summary.items():
            for key, stats in rows.items():
                dimension, split = (key[4:], "average") if key.startswith("avg:") else (dimension_of(key), key)
                interval = [f"{x:.2f}" for x in stats["wilson95"]] if "wilson95" in stats else ["", ""]
                versus = stats.get("vs_reference")
                paired = ([versus["reference"], f"{versus['difference']:.2f}", *(f"{x:.2f}" for x in versus["ci95"])]
                          if versus else ["", "", "", ""])
                writer.writerow([label, dimension, split, f"{stats['mean']:.2f}", f"{stats['std']:.2f}",
                                 *(f"{x:.2f}" for x in stats["per_seed"]), *interval, *paired,
                                 f"{stats['kl_from_base']:.4f}" if "kl_from_base" in stats else ""])


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

    spread = f"mean ± std over {len(args.seeds)} seeds" if len(args.seeds) > 1 else "1 seed"
    if any("per_run" in next(iter(rows.values())) for rows in summary.values()):
        spread = f"mean ± std over training runs, {len(args.seeds)} seed(s) each"
    fig.suptitle(f"Success rate per split ({args.env}): {spread} x {args.episodes} episodes, "
                 f"temperature {args.temperature}", fontsize=12)
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


# ---------------------------------------------------------------------------- main


def main(args: Args) -> dict[str, dict[str, dict]]:
    rank, world, device = init_distributed(args.device)
    splits = resolve_splits(args.splits, args.env)
    checkpoints = [parse_checkpoint(spec) for spec in args.checkpoint]
    for _, path in checkpoints:  # every path checked before an hour goes into the first one
        if path != "base":
            read_checkpoint_config(checkpoint_folder(path))
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    # One checkpoint at a time: two 7B models would not fit in memory together.
    total = len(checkpoints) * len(splits) * len(args.seeds) * args.episodes
    results: dict[str, dict[str, list[EpisodeOutcomes]]] = {}
    with tqdm(total=total, unit="episode", dynamic_ncols=True, disable=rank > 0) as progress:
        for label, path in checkpoints:
            policy = load_policy(path, args, device)
            image_size = args.image_size or policy.image_size
            played = evaluate_on_splits(policy, label, splits, args, image_size, progress, render_device=str(device))
            for split, outcomes in played.items():  # a training run of a method seen before joins its runs
                results.setdefault(label, {}).setdefault(split, []).extend(outcomes)
            del policy  # free its memory before the next one loads

    runs_of = {label: len(paths) for label, paths in paths_of(checkpoints).items()}
    summary = summarise(results, runs_of, args.exclude_from_averages)
    if args.reference is not None:
        for label, rows in paired_differences(results, args.reference, runs_of, args.exclude_from_averages).items():
            for key, paired in rows.items():
                summary[label][key]["vs_reference"] = {"reference": args.reference, **paired}
    if rank == 0:
        print(format_table(summary, splits, args))
        if args.kl:
            print("\n" + format_kl_table(summary, splits, args))
        write_json(output_dir / "results.json", results, summary, checkpoints, splits, args)
        write_csv(output_dir / "results.csv", summary, args)
        plot_chart(output_dir / "success.png", summary, splits, args)
        seconds = sum(o.seconds for by_split in results.values() for runs in by_split.values() for o in runs)
        print(f"{total / seconds:.3g} episodes/s per rank (envs and policy, without set-up); wrote "
              f"{output_dir}/results.json, results.csv, success.png", file=sys.stderr)
    return summary


if __name__ == "__main__":
    try:
        main(ARGS)
    except KeyboardInterrupt:
        sys.exit("interrupted: nothing was written (results are written at the end)")
    except (CheckpointError, NonFiniteError, RenderingUnavailable, ValueError, FileNotFoundError) as error:
        sys.exit(f"error: {str(error).splitlines()[0] if str(error) else type(error).__name__}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
