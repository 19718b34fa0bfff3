"""Supervised fine-tuning (LoRA) of a Vision-Language-Action model on scripted demonstrations.

Two uses in "What Can RL Bring to VLA Generalization?" (Liu et al., 2025; facts in
../shared/PAPER.md):
  * the warm-up: LoRA SFT on 140 expert demonstrations before RL (then
    `ppo_vla.py --init-checkpoint runs/sft_warmup/checkpoint`); the paper reaches the same final
    return with ~50% fewer environment steps this way;
  * the SFT-16k baseline: the same recipe on 16,384 demonstrations (SFT saturates around 16k),
    the policy every RL result is compared with.

    python sft_warmup.py                                          # warm-up, tiny preset, CPU
    python sft_warmup.py --split toy --max-episode-steps 1 --image-size 56 --num-demos 512 \\
        --total-steps 100 --learning-rate 1e-3 --no-image-aug --eval-every 100   # 1 CPU minute
    python sft_warmup.py --model-path /weights/openvla-7b         # warm-up of OpenVLA-7B (GPU)
    python sft_warmup.py --model-path /weights/openvla-7b --num-demos 16384 --total-steps 60000 \\
        --no-image-aug --exp-name sft16k                          # the SFT-16k baseline

Reads top to bottom in three parts:
  1. demonstrations: the scripted expert (envs.py) runs on the split in parallel env workers;
     every finished chunk of episodes goes to disk at once (HDF5 + JSON sidecar, like
     ManiSkill's RecordEpisode), so an interrupted collection continues where it stopped and
     later runs (a longer SFT, another seed of training) reuse what is there;
  2. data: normalisation statistics from the demonstrations, frames -> action tokens, and
     OpenVLA-style image augmentation;
  3. training: cross-entropy on the 7 action tokens, validation on held-out demonstrations,
     success rate with the policy in the loop, and a checkpoint every other script can load.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import h5py
import numpy as np
import torch
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter
from torchvision.transforms import v2
from tqdm import tqdm, trange

from common import (
    ACTION_DIM,
    NUM_ACTION_BINS,
    TINY_IMAGE_SIZE,
    ActorCritic,
    CheckpointError,
    NormStats,
    build_agent,
    evaluate_policy,
    load_checkpoint,
    peak_memory_gb,
    resolve_device,
    restore_rng_state,
    rng_state,
    save_checkpoint,
)
from envs import RenderingUnavailable, collect_expert_demos, make_vec_env


@dataclass
class Args:
    # --- experiment
    exp_name: str = "sft_warmup"
    """name of the run; its directory is OUTPUT_DIR/EXP_NAME (fixed, so --resume finds it)"""
    output_dir: str = "runs"
    """where run directories (TensorBoard logs, checkpoints) are written"""
    seed: int = 0
    """seed of torch, numpy and python: LoRA init, batch order, augmentation, evaluation episodes"""
    device: str = "auto"
    """'auto' (CUDA if available, else CPU), 'cpu', 'cuda' or 'cuda:N'"""
    resume: bool = False
    """continue a killed run from OUTPUT_DIR/EXP_NAME/checkpoint (step, optimizer, RNG)"""
    # --- model
    preset: Literal["tiny", "openvla-7b"] = "tiny"
    """model size: 'tiny' (random-init, offline, CPU-friendly) or 'openvla-7b' (needs --model-path)"""
    model_path: str | None = None
    """local directory with the official OpenVLA-7B checkpoint; implies --preset openvla-7b"""
    init_checkpoint: str | None = None
    """start from this checkpoint's adapter instead of a fresh one (the paper trains SFT-16k from the warm-up)"""
    critic: Literal["h0", "last", "concat", "separate"] = "h0"
    """value head saved with the checkpoint for RL later (SFT does not train it)"""
    lora_rank: int = 32
    """LoRA rank on every linear layer (paper: 32)"""
    lora_alpha: int = 16
    """LoRA alpha (paper: 16)"""
    image_size: int | None = None
    """image size of the model and the renderer; default: the preset's (tiny 112, openvla-7b 224)"""
    # --- demonstrations
    split: str = "ind"
    """split the expert demonstrates ('ind': the training distribution; 'toy': the synthetic test task)"""
    num_demos: int = 140
    """successful demonstrations to train on (paper: 140 for the warm-up; 16384 for the SFT-16k baseline)"""
    val_demos: int = 8
    """further successful demonstrations held out for validation (not counted in --num-demos)"""
    demo_dir: str | None = None
    """where demonstrations are stored and reused; default: demos/SPLIT-IMAGE_SIZEpx-seedDEMO_SEED"""
    demo_seed: int = 0
    """fixes which episodes the demonstrations show (apart from --seed: training seeds share one data set)"""
    num_envs: int = 8
    """environments the expert runs in parallel (one worker process each); also episodes per file"""
    max_episode_steps: int = 80
    """episode horizon (paper: 80; the toy task has 1-step episodes)"""
    steps_after_success: int = 6
    """cut a demonstration once it has been successful this many steps in a row (paper: 6)"""
    collect_only: bool = False
    """stop after collecting the demonstrations (no model, no training)"""
    # --- training (paper's warm-up: OpenVLA's LoRA fine-tuning recipe)
    total_steps: int = 2000
    """optimizer steps (paper: 2000 for the warm-up, 60000 for SFT-16k)"""
    batch_size: int = 32
    """frames per optimizer step, drawn uniformly from the training demonstrations (paper: 8 x 4 GPUs)"""
    grad_accum_steps: int = 2
    """split each batch into this many forward/backward passes: same gradient, less memory (16 frames
    per pass fit OpenVLA-7B on an 80 GB GPU)"""
    learning_rate: float = 5e-4
    """AdamW learning rate of the LoRA adapters, constant (paper: 5e-4)"""
    loss_vocab: Literal["full", "action"] = "full"
    """cross-entropy over the full vocabulary (OpenVLA's SFT) or over the 256 action ids only (what RL samples)"""
    image_aug: bool = True
    """random resized crop + colour jitter, as OpenVLA trains (paper: on for the warm-up, off for SFT-16k)"""
    # --- evaluation, logging, checkpoints
    val_every: int = 100
    """validation loss, token accuracy and L1 on the held-out demonstrations every K steps (and at the end)"""
    eval_every: int = 500
    """success rate with the policy in the loop every K steps (and at the end); 0 disables"""
    eval_episodes: int = 32
    """episodes per success-rate evaluation, on --split, with ids the demonstrations do not use"""
    eval_temperature: float = 0.0
    """sampling temperature of that evaluation (0: greedy; the paper evaluates RL policies at 0.6)"""
    save_every: int = 500
    """write the checkpoint every K steps (and at the end)"""


OPENVLA_IMAGE_SIZE = 224  # both towers of OpenVLA-7B take 224 px images


class DemoError(Exception):
    """Demonstrations on disk that cannot be used as they are; the message says what to do."""


# =============================================================================================
# 1. Demonstrations
# =============================================================================================
# A demonstration directory holds one HDF5 file + one JSON sidecar per chunk of episodes:
#   manifest.json                  how the demonstrations were collected (checked on reuse)
#   episodes_000000-000007.h5      traj_{slot}/images uint8 [T, H, W, 3], traj_{slot}/actions [T, 7]
#   episodes_000000-000007.json    env_info + one record per episode (episode_id, instruction,
#                                  elapsed_steps, success), as ManiSkill's RecordEpisode writes
# A "slot" numbers the episodes of a collection, and slot k always shows the same episode id, so
# an interrupted or extended collection fills exactly the slots that are missing.


def episode_ids_of(slots: list[int], seed: int) -> np.ndarray:
    """The env episode id each demonstration slot shows: a pure function of (seed, slot)."""
    return np.array([np.random.default_rng([seed, s]).integers(0, 2**31 - 1) for s in slots])


def default_demo_dir(args: Args, image_size: int) -> Path:
    return Path("demos") / f"{args.split}-{image_size}px-seed{args.demo_seed}"


def check_manifest(demo_dir: Path, settings: dict[str, Any]) -> None:
    """Refuse to mix demonstrations collected under other settings into one data set."""
    if demo_dir.exists() and not demo_dir.is_dir():
        raise DemoError(f"--demo-dir {demo_dir} is a file, not a directory")
    demo_dir.mkdir(parents=True, exist_ok=True)
    manifest = demo_dir / "manifest.json"
    if not manifest.exists():
        manifest.write_text(json.dumps(settings, indent=2))
        return
    try:
        found = json.loads(manifest.read_text())
    except json.JSONDecodeError:
        raise DemoError(f"{manifest} is not valid JSON; delete the directory to collect again") from None
    changed = [f"{k}={found.get(k)!r} (now {v!r})" for k, v in settings.items() if found.get(k) != v]
    if changed:
        raise DemoError(f"demonstrations in {demo_dir} were collected with {', '.join(changed)}; "
                        f"pass another --demo-dir")


def write_chunk(demo_dir: Path, slots: list[int], demos: list, env_info: dict[str, Any]) -> None:
    """One chunk to HDF5 + JSON. The sidecar is renamed into place last: a chunk whose sidecar
    exists is complete, and a crash leaves only temp files or an HDF5 file with no sidecar."""
    name = f"episodes_{slots[0]:06d}-{slots[-1]:06d}"
    h5_tmp, json_tmp = demo_dir / f".{name}.h5.tmp", demo_dir / f".{name}.json.tmp"
    with h5py.File(h5_tmp, "w") as f:
        for slot, demo in zip(slots, demos, strict=True):
            group = f.create_group(f"traj_{slot}")
            # One compressed HDF5 chunk per frame: training reads single frames at random.
            group.create_dataset("images", data=demo.images, chunks=(1, *demo.images.shape[1:]),
                                 compression="gzip")
            group.create_dataset("actions", data=demo.actions.astype(np.float32))
            group.attrs.update(episode_id=demo.episode_id, instruction=demo.instruction,
                               success=demo.success)
    episodes = [{"slot": slot, "episode_id": d.episode_id, "instruction": d.instruction,
                 "elapsed_steps": len(d.actions), "success": d.success}
                for slot, d in zip(slots, demos, strict=True)]
    json_tmp.write_text(json.dumps({
        "env_info": env_info, "source_type": "motionplanning",
        "source_desc": "sft_warmup.py: envs.py's scripted expert; idle steps dropped, cut after success",
        "episodes": episodes}, indent=2))
    os.replace(h5_tmp, demo_dir / f"{name}.h5")
    os.replace(json_tmp, demo_dir / f"{name}.json")


def read_demo_records(demo_dir: Path, image_size: int) -> list[dict[str, Any]]:
    """Every episode on disk as its sidecar record plus "file" and "actions" [T, 7].

    Leftovers of an interrupted write (temp files, an HDF5 file without its sidecar) are
    deleted, so their slots are collected again; a chunk that does not match its sidecar is an
    error: it is never used, and never deleted without the user looking at it."""
    for leftover in demo_dir.glob(".*.tmp"):
        leftover.unlink()
    records = []
    for h5_path in sorted(demo_dir.glob("episodes_*.h5")):
        json_path = h5_path.with_suffix(".json")
        if not json_path.exists():
            h5_path.unlink()
            continue
        try:
            sidecar = json.loads(json_path.read_text())
            with h5py.File(h5_path, "r") as f:
                for record in sidecar["episodes"]:
                    images, actions = f[f"traj_{record['slot']}/images"], f[f"traj_{record['slot']}/actions"][()]
                    steps = record["elapsed_steps"]
                    if images.shape != (steps, image_size, image_size, 3) or images.dtype != np.uint8:
                        raise ValueError(f"traj_{record['slot']}/images is {images.dtype} {images.shape}, "
                                         f"expected uint8 ({steps}, {image_size}, {image_size}, 3)")
                    if actions.shape != (steps, ACTION_DIM) or not np.isfinite(actions).all():
                        raise ValueError(f"traj_{record['slot']}/actions is not {steps} finite 7-D actions")
                    records.append({**record, "file": h5_path, "actions": actions})
        except (OSError, KeyError, ValueError, TypeError) as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise DemoError(f"demonstration file {h5_path} is corrupt or partial ({reason}); "
                            f"delete it and {json_path.name} to collect those episodes again") from None
    return records


def missing_slots(records: list[dict[str, Any]], count: int) -> list[int]:
    """The `count` lowest slots that are not on disk yet (holes left by an interruption first)."""
    done = {r["slot"] for r in records}
    slots, candidate = [], 0
    while len(slots) < count:
        if candidate not in done:
            slots.append(candidate)
        candidate += 1
    return slots


def collect_demonstrations(args: Args, demo_dir: Path, image_size: int) -> list[dict[str, Any]]:
    """Make sure num_demos + val_demos successful demonstrations are on disk and return their
    records, ordered by slot. Each chunk is written the moment it finishes: an interruption loses
    at most the chunk in flight, and the next run continues from there."""
    env_info = {"split": args.split, "image_size": image_size, "max_episode_steps": args.max_episode_steps,
                "steps_after_success": args.steps_after_success, "demo_seed": args.demo_seed}
    check_manifest(demo_dir, env_info)
    wanted = args.num_demos + args.val_demos
    records = read_demo_records(demo_dir, image_size)
    have = sum(r["success"] for r in records)
    if have < wanted:
        envs = make_vec_env(split=args.split, num_envs=args.num_envs, image_size=image_size,
                            seed=args.demo_seed, max_episode_steps=args.max_episode_steps)
        # Success can only be held for as many steps as the horizon has (the toy task has one).
        success_steps = min(args.steps_after_success, args.max_episode_steps)
        attempts, successes, frames, start = 0, 0, 0, time.perf_counter()  # this run's own
        bar = tqdm(total=wanted, initial=have, desc=f"demonstrations ({args.split})", unit="demo")
        try:
            while have < wanted:
                # Failed episodes stay on disk (success=False), so a round may not be enough.
                for_round = missing_slots(records, wanted - have)
                for first in range(0, len(for_round), envs.num_envs):
                    slots = for_round[first:first + envs.num_envs]
                    ids = np.resize(episode_ids_of(slots, args.demo_seed), envs.num_envs)  # pad a short chunk
                    demos = collect_expert_demos(envs, ids, success_steps)[:len(slots)]
                    write_chunk(demo_dir, slots, demos, env_info)
                    records += [{"slot": s, "success": d.success} for s, d in zip(slots, demos, strict=True)]
                    new = sum(d.success for d in demos)
                    have, successes, attempts = have + new, successes + new, attempts + len(demos)
                    frames += sum(len(d.actions) for d in demos)
                    bar.update(min(new, wanted - bar.n))
                    bar.set_postfix(expert_success=f"{successes / attempts:.0%}")
                if have < wanted and attempts >= 20 and successes < 0.1 * attempts:
                    raise DemoError(f"the expert succeeded in only {successes} of {attempts} "
                                    f"episodes on split {args.split!r}")
        finally:
            bar.close()
            envs.close()
        seconds = time.perf_counter() - start
        tqdm.write(f"collected {attempts} episodes ({frames} frames kept) in {seconds:.1f} s "
                   f"({attempts / seconds:.2f} episodes/s) into {demo_dir}")
        records = read_demo_records(demo_dir, image_size)
    successful = sorted((r for r in records if r["success"]), key=lambda r: r["slot"])
    return successful[:wanted]


# =============================================================================================
# 2. Data: normalisation, action tokens, frames, augmentation
# =============================================================================================


def compute_norm_stats(actions: np.ndarray) -> NormStats:
    """q01 / q99 per dimension of the training actions [F, 7] (OpenVLA's normalisation); the
    gripper is left raw (NormStats' mask), so its q01 / q99 are never used."""
    return NormStats(q01=np.quantile(actions, 0.01, axis=0), q99=np.quantile(actions, 0.99, axis=0))


@dataclass
class Frames:
    """Every step of a set of demonstrations, flattened; images stay on disk until read."""

    files: list[Path]  # [F] the HDF5 file of each frame
    groups: list[str]  # [F] its trajectory group, e.g. "traj_12"
    steps: np.ndarray  # int [F] its index in the trajectory
    instructions: list[str]  # [F]
    actions: np.ndarray  # float32 [F, 7] env action space
    tokens: np.ndarray  # int64 [F, 7] target action token ids

    def __len__(self) -> int:
        return len(self.steps)

    def read_images(self, index: np.ndarray) -> np.ndarray:
        """uint8 [B, H, W, 3] for frames `index`, one HDF5 read per frame."""
        images = []
        for i in index:
            with h5py.File(self.files[i], "r") as f:
                images.append(f[self.groups[i]]["images"][self.steps[i]])
        return np.stack(images)


def frames_of(records: list[dict[str, Any]], agent: ActorCritic) -> Frames:
    """Flatten episodes into frames; actions become tokens under the agent's norm stats."""
    actions = np.concatenate([r["actions"] for r in records] or [np.zeros((0, ACTION_DIM))])
    actions = actions.astype(np.float32)  # [F, 7]
    tokens = agent.action_tokenizer.encode(agent.norm_stats.normalize(actions))  # [F, 7]
    return Frames(
        files=[r["file"] for r in records for _ in range(len(r["actions"]))],
        groups=[f"traj_{r['slot']}" for r in records for _ in range(len(r["actions"]))],
        steps=np.concatenate([np.arange(len(r["actions"])) for r in records] or [np.zeros(0, dtype=int)]),
        instructions=[r["instruction"] for r in records for _ in range(len(r["actions"]))],
        actions=actions,
        tokens=tokens,
    )


def augment_images(images: np.ndarray, device: torch.device) -> np.ndarray:
    """uint8 [B, H, W, 3] -> uint8 [B, H, W, 3], an independent random view of each image.

    OpenVLA's augmentation: a random crop of 90% of the area resized back, brightness 0.2,
    contrast and saturation 0.8-1.2, hue 0.05. OpenVLA then evaluates on a 90% centre crop;
    our act() sees whole images, so the crop scale here reaches up to the whole image.
    """
    augment = v2.Compose([
        v2.RandomResizedCrop(size=images.shape[1:3], scale=(0.9, 1.0), ratio=(1.0, 1.0), antialias=True),
        v2.ColorJitter(brightness=0.2, contrast=(0.8, 1.2), saturation=(0.8, 1.2), hue=0.05),
    ])
    x = torch.from_numpy(images).to(device).permute(0, 3, 1, 2)  # [B, 3, H, W]; hue is slow on a CPU
    return torch.stack([augment(image) for image in x]).permute(0, 2, 3, 1).cpu().numpy()


# =============================================================================================
# 3. Training
# =============================================================================================


def action_token_loss(agent: ActorCritic, images: np.ndarray, instructions: list[str],
                      tokens: np.ndarray, loss_vocab: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced cross-entropy on the 7 action tokens -> (loss, argmax tokens [B, 7]).

    loss_vocab "full": softmax over the whole vocabulary, as OpenVLA's SFT (the model also learns
    that text ids are wrong here); "action": over the 256 action ids, the distribution RL
    samples from. Predictions are always the argmax over the action ids, i.e. greedy act()'s
    choice given the correct previous tokens.
    """
    target = agent.check_action_tokens(tokens)  # long [B, 7] on the model's device
    inputs = agent.prepare_inputs(images, instructions)
    hidden = agent.predicting_hidden_states(agent.vla, inputs, target)  # [B, 7, D]
    logits = agent.vla.language_model.lm_head(hidden).float()  # [B, 7, V]
    first = agent.action_tokenizer.first_id
    action_logits = logits[..., first:first + NUM_ACTION_BINS]  # [B, 7, 256]
    if loss_vocab == "full":
        loss = F.cross_entropy(logits.flatten(0, 1), target.flatten())
    else:
        loss = F.cross_entropy(action_logits.flatten(0, 1), (target - first).flatten())
    return loss, action_logits.argmax(-1) + first


def token_metrics(agent: ActorCritic, predicted: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """Accuracy of predicted action tokens [B, 7] overall and per dimension, and the L1 distance
    of the decoded actions in the normalised [-1, 1] space (as OpenVLA logs it)."""
    correct = predicted == target
    l1 = np.abs(agent.action_tokenizer.decode(predicted) - agent.action_tokenizer.decode(target))
    return {"token_accuracy": float(correct.mean()), "l1": float(l1.mean()),
            **{f"token_accuracy_dim{d}": float(correct[:, d].mean()) for d in range(ACTION_DIM)}}


@torch.no_grad()
def validate(agent: ActorCritic, frames: Frames, batch_size: int, loss_vocab: str) -> dict[str, float]:
    """Loss and token metrics over every held-out frame (no augmentation)."""
    agent.eval()
    losses, predicted = [], []
    for start in range(0, len(frames), batch_size):
        index = np.arange(start, min(start + batch_size, len(frames)))
        loss, pred = action_token_loss(agent, frames.read_images(index),
                                       [frames.instructions[i] for i in index], frames.tokens[index], loss_vocab)
        losses.append(loss.item() * len(index))
        predicted.append(pred.cpu().numpy())
    metrics = token_metrics(agent, np.concatenate(predicted), frames.tokens)
    return {"loss": sum(losses) / len(frames), **metrics}


def main(args: Args) -> dict[str, float]:
    # ---------------------------------------------------------------- set-up
    if args.model_path is not None:
        args.preset = "openvla-7b"
    if args.num_demos < 1 or args.val_demos < 0:
        raise ValueError("--num-demos must be >= 1 and --val-demos >= 0")
    run_dir = Path(args.output_dir) / args.exp_name
    checkpoint_dir = run_dir / "checkpoint"
    # Fail now rather than after an hour of collecting demonstrations.
    for what, path in (("--model-path", args.model_path), ("--init-checkpoint", args.init_checkpoint),
                       ("--resume: checkpoint", checkpoint_dir if args.resume else None)):
        if path is not None and not Path(path).is_dir():
            raise FileNotFoundError(f"{what} {path} does not exist")
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = resolve_device(args.device)

    # ---------------------------------------------------------------- demonstrations
    # They come before the model: collecting needs no model (--collect-only needs no GPU).
    image_size = args.image_size or (TINY_IMAGE_SIZE if args.preset == "tiny" else OPENVLA_IMAGE_SIZE)
    demo_dir = Path(args.demo_dir) if args.demo_dir else default_demo_dir(args, image_size)
    records = collect_demonstrations(args, demo_dir, image_size)
    if args.collect_only:
        return {"demos": float(len(records))}

    # ---------------------------------------------------------------- model
    state: dict[str, Any] = {}
    if args.resume:
        agent, state = load_checkpoint(checkpoint_dir, device=device, preset=args.preset)
    elif args.init_checkpoint is not None:
        agent, _ = load_checkpoint(args.init_checkpoint, device=device)
    else:
        agent = build_agent(args.preset, args.model_path, critic=args.critic, lora_rank=args.lora_rank,
                            lora_alpha=args.lora_alpha, image_size=image_size, device=device, seed=args.seed)
    if agent.image_size != image_size:
        raise ValueError(f"the model takes {agent.image_size}px images; pass --image-size {agent.image_size}")
    train_records, val_records = records[:args.num_demos], records[args.num_demos:]
    if args.resume and (state["demo_dir"], state["num_demos"]) != (str(demo_dir), len(train_records)):
        raise ValueError(f"the run to resume trained on {state['num_demos']} demonstrations from "
                         f"{state['demo_dir']}, not {len(train_records)} from {demo_dir}")
    # New statistics even from --init-checkpoint: the paper's SFT-16k normalises with its own data.
    # A resumed run keeps the statistics its tokens were trained under.
    if not args.resume:
        agent.norm_stats = compute_norm_stats(np.concatenate([r["actions"] for r in train_records]))
    train_frames, val_frames = frames_of(train_records, agent), frames_of(val_records, agent)
    tqdm.write(f"{len(train_records)} training demonstrations ({len(train_frames)} frames), "
               f"{len(val_records)} held out ({len(val_frames)} frames), from {demo_dir}")

    # ---------------------------------------------------------------- optimizer, logging
    optimizer = torch.optim.AdamW(agent.lora_parameters(), lr=args.learning_rate)
    # Our own generator draws the batches, so that a resumed run draws the same ones.
    batch_rng = np.random.default_rng(args.seed)
    start_step = 0
    if args.resume:
        optimizer.load_state_dict(state["optimizer"])
        restore_rng_state(state["rng"])
        batch_rng.bit_generator.state = state["batch_rng"]
        start_step = state["step"]
    eval_envs = None
    if args.eval_every > 0:
        eval_envs = make_vec_env(split=args.split, num_envs=min(args.num_envs, args.eval_episodes),
                                 image_size=agent.image_size, seed=args.seed,
                                 max_episode_steps=args.max_episode_steps)
    writer = SummaryWriter(str(run_dir))
    if start_step == 0:
        writer.add_text("args", "\n".join(f"{k}: {v}" for k, v in asdict(args).items()))
    metrics: dict[str, float] = {}
    micro_batch = -(-args.batch_size // args.grad_accum_steps)  # ceil
    t0 = time.perf_counter()

    for step in trange(start_step, args.total_steps, desc="SFT", initial=start_step, total=args.total_steps):
        # ------------------------------------------------------------ one optimizer step
        agent.train()
        index = batch_rng.integers(0, len(train_frames), size=args.batch_size)  # [B]
        images = train_frames.read_images(index)  # uint8 [B, H, W, 3]
        if args.image_aug:
            images = augment_images(images, device)
        losses, predicted = [], []
        for start in range(0, args.batch_size, micro_batch):
            part = slice(start, start + micro_batch)
            loss, pred = action_token_loss(agent, images[part], [train_frames.instructions[i] for i in index[part]],
                                           train_frames.tokens[index[part]], args.loss_vocab)
            # Weight each part by its share of the batch: the sum is the whole batch's mean.
            (loss * len(index[part]) / args.batch_size).backward()
            losses.append(loss.item() * len(index[part]))
            predicted.append(pred.cpu().numpy())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        # ------------------------------------------------------------ logging
        done = step + 1
        last = done == args.total_steps
        train = token_metrics(agent, np.concatenate(predicted), train_frames.tokens[index])
        metrics = {"train/loss": sum(losses) / args.batch_size,
                   "train/token_accuracy": train["token_accuracy"], "train/l1": train["l1"]}
        if len(val_frames) and (done % args.val_every == 0 or last):
            metrics.update({f"val/{k}": v for k, v in validate(agent, val_frames, args.batch_size,
                                                                  args.loss_vocab).items()})
            tqdm.write(f"step {done}: val loss {metrics['val/loss']:.3f}, token accuracy "
                       f"{metrics['val/token_accuracy']:.3f}, L1 {metrics['val/l1']:.3f}")
        if eval_envs is not None and (done % args.eval_every == 0 or last):
            agent.eval()
            # Episode ids from another stream than the demonstrations' (episode_ids_of).
            result = evaluate_policy(agent, eval_envs, args.eval_episodes, args.eval_temperature,
                                     seed=args.seed + 1)
            metrics.update({f"eval/{k}": v for k, v in result.items()})
            tqdm.write(f"step {done}: success rate {result['success']:.3f} on {args.split}")
        metrics["time/steps_per_s"] = (done - start_step) / (time.perf_counter() - t0)
        metrics["memory/peak_gb"] = peak_memory_gb(device)
        for k, v in metrics.items():
            writer.add_scalar(k, v, done)

        # ------------------------------------------------------------ checkpoint
        if done % args.save_every == 0 or last:
            save_checkpoint(checkpoint_dir, agent, state={
                "optimizer": optimizer.state_dict(), "step": done, "rng": rng_state(),
                "batch_rng": batch_rng.bit_generator.state, "args": asdict(args), "algorithm": "sft",
                "demo_dir": str(demo_dir), "num_demos": len(train_records),
            })

    if eval_envs is not None:
        eval_envs.close()
    writer.close()
    print(f"checkpoint: {checkpoint_dir}\nTensorBoard: tensorboard --logdir {run_dir}")
    return metrics


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except (DemoError, CheckpointError, RenderingUnavailable, ValueError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")
    except KeyboardInterrupt:
        sys.exit("interrupted: finished demonstration chunks and the last checkpoint are kept; "
                 "run the same command again (with --resume for training) to continue")
