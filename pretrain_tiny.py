"""Pretrain the tiny OpenVLA on the 2D twin's `pretrain` split and write it in the official
OpenVLA layout: the laptop-sized stand-in for the pretrained OpenVLA-7B that the study starts from.

OpenVLA was pretrained on web data and ~1M robot episodes before arXiv 2505.19789 fine-tuned it;
the twin's `pretrain` split plays that part: broad, every factor the OOD splits vary and none of
their exact combinations (docs/STUDY_PROTOCOL.md, twin_env.py). Every weight is trained (a random
base learns far too slowly through LoRA), with OpenVLA's loss: cross-entropy on the 7 action
tokens, by behaviour cloning of an expert whose moves get DART noise, on demonstrations streamed
fresh into each rank's memory (a fixed set is overfitted). One cycle of 50,000 steps: half of
every batch is drawn from the name pairs (each frame where an object's or a receptacle's name alone
decides the move, beside its twin: the same image with the other one named and the expert's move
to it, so that only reading the name is right), streamed with the demonstrations they come from;
the rest from all frames. The older recipe, two cycles of two phases (grounding frames, then a
mix; then the pairs, then a mix), stays behind flags: it made the previous base, which the one
cycle beat by 23 points (docs/PRETRAINING.md, "One cycle"); 50,000 steps rather than 25,000 took
it from 77.4% to 86.1% (docs/PRETRAINING.md, "A 50,000-step cycle"). The result loads like the 7B
checkpoint:

    make pretrain   # = torchrun --standalone --nproc_per_node 2 pretrain_tiny.py (writes assets/tiny-openvla-twin/)
    python ppo_vla.py --env twin --model-path assets/tiny-openvla-twin ...

The directory holds config.json (with the norm_stats of the pretraining actions under
"twin_pretrain"), the safetensors shard and its index, the tokenizer files and pretrain_config.json (these flags
and the measured held-out success), so a test can check the shipped model against its recipe.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from cli import TINY_PATCH_SIZE, parse_cli, require_finite_positive, require_positive


@dataclass
class Args:
    output: str = "assets/tiny-openvla-twin"
    """model directory to write (official OpenVLA layout)"""
    run_dir: str = "runs/pretrain_tiny"
    """where the resumable training state and TensorBoard logs go"""
    resume: bool = False
    """continue an interrupted pretraining from RUN_DIR/state.pt"""
    seed: int = 0
    """seed of the weights' training order (the random init itself is fixed, see model.py)"""
    image_size: int = 64
    """image size of the model and the renderer"""
    num_demos: int = 6000
    """expert demonstrations each rank holds at a time (with --fresh-demos 0: one fixed set on disk)"""
    fresh_demos: int = 400
    """stream: every --fresh-every steps each rank collects this many new demonstrations in memory and
    drops its oldest as many (0: one fixed set on disk, shared by the ranks). The broad split overfits
    a fixed set of 16,000 (validation loss flat from step 12,000: docs/PRETRAINING.md)"""
    fresh_every: int = 250
    """optimizer steps between two fresh batches of demonstrations (with --fresh-demos)"""
    heldout_demos: int = 64
    """held-out demonstrations for the validation loss"""
    action_noise: float = 0.2
    """std of the noise the expert's executed moves get on 30% of the steps (DART,
    demos.collect_expert_demos); 0.3 cost the SFT baseline 15 points on `ind` (docs/HISTORY.md)"""
    keep_success_steps: bool = True
    """keep the expert's steps taken from an already successful state, idle or not (demos.py);
    the first shipped model dropped them and then re-grasped placed objects"""
    demo_dir: str = "demos/twin-pretrain"
    """where the pretraining demonstrations are stored and reused"""
    base_steps: int = 50000
    """optimizer steps of the first cycle, the grounding phase and the mix (25,000: 77.4% on
    `pretrain`, 50,000: 86.1%; docs/PRETRAINING.md)"""
    batch_size: int = 64
    """frames per step"""
    learning_rate: float = 1e-3
    """AdamW peak learning rate (linear warm-up, then cosine decay to 10%); at 2e-3 the names
    bound later in a probe of the grounding phase (docs/PRETRAINING.md)"""
    warmup_steps: int = 200
    """steps of linear learning-rate warm-up"""
    eval_every: int = 2000
    """held-out success rate every K steps (and at the end)"""
    eval_episodes: int = 128
    """episodes per evaluation, at temperature 0.6, on pretrain and on multi_object_seen"""
    save_every: int = 250
    """write the resumable state every K steps"""
    grounding_steps: int = 0
    """first optimizer steps drawn only from the grounding frames (see grounding_frames), where
    nothing but the instruction's names tells the move; 0: none"""
    grounding_share: float = 0.5
    """share of every later batch still drawn from the grounding frames (0: all frames alike)"""
    grounding_window: int = 3
    """grounding frames of a two-object scene: its first K steps (towards the named object)"""
    carry_window: int = 12
    """grounding frames of a two-receptacle scene: its first K carrying steps (12 covers the whole
    carry, 4-7 steps in the expert's demos; neither 3 nor 12 bound the receptacle names: the second
    cycle's pairs do, docs/PRETRAINING.md)"""
    jump_share: float = 0.0
    """share of every batch drawn from the frames after a jump of the target (see jump_frames): the
    shipped base succeeds in 32% of the episodes with a jump, 62% without (docs/PRETRAINING.md)"""
    pairs_from_start: bool = True
    """the recipe: the first cycle's grounding frames are the name pairs of the demonstrations held
    (see name_pairs), streamed with them, instead of grounding_frames; needs --fresh-demos. With
    --grounding-steps 0 --pair-steps 0 --pair-mix-steps 0: one cycle, --grounding-share of every
    batch pairs (the binding probe: pairs bind faster from random init, docs/PRETRAINING.md)"""
    pair_steps: int = 0
    """second cycle (a fresh AdamW): steps on the name pairs only (see name_pairs: the frames where
    an object's or a receptacle's name decides the move, each with its twin, the same image with the
    other one named and the expert's move to it); 0 and 0 mix steps: no second cycle"""
    pair_mix_steps: int = 0
    """then steps with --grounding-share of every batch from the pairs, the rest from all frames
    (without them the model forgets the rest of the task)"""
    pair_learning_rate: float = 5e-4
    """peak learning rate of the second cycle (warm-up, then cosine decay to 10%)"""


def check_args(args: Args) -> None:
    require_positive(args, "image_size", "num_demos", "heldout_demos", "base_steps", "batch_size",
                     "warmup_steps", "eval_every", "eval_episodes", "save_every", "grounding_window",
                     "carry_window")
    require_finite_positive(args, "learning_rate", "pair_learning_rate")
    if args.fresh_demos < 0 or args.fresh_every < 1:
        raise ValueError(f"--fresh-demos must be >= 0 and --fresh-every >= 1, got {args.fresh_demos} "
                         f"and {args.fresh_every}")
    if args.fresh_demos and args.num_demos % args.fresh_demos:
        raise ValueError(f"--num-demos ({args.num_demos}) must be a multiple of --fresh-demos "
                         f"({args.fresh_demos}): a rank holds whole batches of demonstrations")
    for name in ("grounding_steps", "pair_steps", "pair_mix_steps"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.pairs_from_start and not args.fresh_demos:
        raise ValueError("--pairs-from-start streams the pairs with the demonstrations: it needs --fresh-demos > 0")
    if not 0.0 <= args.grounding_share < 1.0:
        raise ValueError(f"--grounding-share must be in [0, 1), got {args.grounding_share}")
    if not 0.0 <= args.jump_share < 1.0 - args.grounding_share:
        raise ValueError(f"--jump-share must be in [0, 1 - --grounding-share), got {args.jump_share}")
    if args.resume and not os.path.exists(os.path.join(args.run_dir, "state.pt")):
        raise ValueError(f"--resume: no {args.run_dir}/state.pt to continue from (run without --resume)")
    if args.image_size % TINY_PATCH_SIZE:
        raise ValueError(f"--image-size must be a multiple of {TINY_PATCH_SIZE} (the tiny model's patch), "
                         f"got {args.image_size}")


if __name__ == "__main__":
    ARGS = parse_cli(Args, check_args)  # before the heavy imports: --help answers at once

import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from common import (
    ActorCritic,
    all_reduce_gradients,
    calibration_episode_ids,
    check_finite,
    evaluate_policy,
    init_distributed,
    seed_everything,
    wait_for_rank_zero,
)
from demos import collect_expert_demos, ensure_demos, episode_ids_of, frames_of
from envs import default_horizon, make_vec_env
from model import (
    ActionTokenizer,
    NormStats,
    action_token_loss,
    build_tiny_vla,
    prepare_inputs,
    save_openvla_dir,
    weights_fingerprint,
)
from twin_env import decode_episode

UNNORM_KEY = "twin_pretrain"


@dataclass
class Demonstrations:
    """The frames of demonstrations held in memory: a rank's share of the stream (--fresh-demos)."""

    images: np.ndarray  # uint8 [F, H, W, 3]
    actions: np.ndarray  # float32 [F, 7]
    instructions: list[str]  # [F]
    records: list[dict]  # one per demonstration: episode_seed, actions and the decoded episode (grounding_frames)
    pairs: int = 0  # the last PAIRS frames are name pairs (--pairs-from-start), after every demonstration's

    def __len__(self) -> int:
        return len(self.actions)

    def read_images(self, index: np.ndarray) -> np.ndarray:
        return self.images[index]


def stream_ids(number: int, rank: int, args: Args) -> np.ndarray:
    """The episode ids of batch NUMBER of rank RANK's stream [--fresh-demos]."""
    slots = [rank * 10**9 + number * args.fresh_demos + i for i in range(args.fresh_demos)]
    return episode_ids_of(slots, args.seed, "train")


def fresh_demonstrations(envs, number: int, rank: int, args: Args) -> list[Demonstrations]:
    """Batch NUMBER of rank RANK's stream: --fresh-demos episodes of the expert (the failed ones left
    out), and with --pairs-from-start their name pairs as one more entry; a pure function of (seed,
    rank, number), so a resumed run rebuilds what it held."""
    ids, demos = stream_ids(number, rank, args), []
    for first in range(0, len(ids), envs.num_envs):
        chunk = ids[first:first + envs.num_envs]
        rng = np.random.default_rng([args.seed, rank, number, first])
        demos += collect_expert_demos(envs, np.resize(chunk, envs.num_envs), action_noise=args.action_noise,
                                      rng=rng, keep_success_steps=args.keep_success_steps)[:len(chunk)]
    demos = [d for d in demos if d.succeeded]
    held = [Demonstrations(d.images[:-1], d.actions.astype(np.float32), [d.instruction] * len(d.actions),
                           [{"episode_seed": d.episode_id, "actions": d.actions,
                             "episode": decode_episode("pretrain", d.episode_id)}]) for d in demos]
    if args.pairs_from_start:
        images, instructions, actions, _ = name_pairs(ids, args.image_size, args.grounding_window)
        held.append(Demonstrations(images, actions, instructions, [], pairs=len(actions)))
    return held


def pool_of(held: list[list[Demonstrations]]) -> Demonstrations:
    """One set of frames from the batches a rank holds, oldest first: every demonstration's
    frames, then every name pair's (--pairs-from-start)."""
    demos = [d for batch in held for d in batch if not d.pairs] + [d for batch in held for d in batch if d.pairs]
    return Demonstrations(np.concatenate([d.images for d in demos]), np.concatenate([d.actions for d in demos]),
                          [t for d in demos for t in d.instructions], [r for d in demos for r in d.records],
                          pairs=sum(d.pairs for d in demos))


def total_steps(args: Args) -> int:
    return args.base_steps + args.pair_steps + args.pair_mix_steps


def learning_rate_at(step: int, args: Args) -> float:
    """Two cycles (the base, then the name pairs'), each a linear warm-up, then cosine decay to
    10% of its peak."""
    peak, start, length = args.learning_rate, 0, args.base_steps
    if step >= args.base_steps:
        peak, start, length = args.pair_learning_rate, args.base_steps, total_steps(args) - args.base_steps
    step -= start
    if step < args.warmup_steps:
        return peak * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, length - args.warmup_steps)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))


def grounding_frames(records: list[dict], window: int, carry_window: int) -> np.ndarray:
    """Indices of the frames where only the instruction's names tell the expert's move: the first
    WINDOW steps of a two-object scene (towards the named one, before its grasp, the first close:
    action[6] < 0) and the first CARRY_WINDOW steps that carry it closed in a two-receptacle scene.

    Trained on all frames alike, the model learns a name-blind policy that is right in ~70% of
    two-object first steps (it goes to one object whatever the instruction says) and never leaves
    it; a random model trained first on these frames alone does bind the names, and keeps them
    when the other frames join (docs/PRETRAINING.md)."""
    chosen, start = [], 0
    for record in records:
        episode = record.get("episode") or decode_episode("pretrain", record["episode_seed"])  # ~1 ms to decode
        closed = record["actions"][:, 6] < 0
        grasp = int(np.argmax(closed)) if closed.any() else len(closed)
        steps = np.arange(len(closed))
        picks = (len(episode.objects) > 1) & (steps < min(grasp, window))
        carries = (len(episode.receptacles) > 1) & (steps > grasp) & (steps <= grasp + carry_window) & closed
        chosen.append(start + np.flatnonzero(picks | carries))
        start += len(closed)
    return np.concatenate(chosen)


def jump_frames(records: list[dict]) -> np.ndarray:
    """Indices of the frames after the target's jump (the observation before the jump's step
    action still shows it where it was), in the episodes whose target jumps."""
    chosen, start = [], 0
    for record in records:
        episode = record.get("episode") or decode_episode("pretrain", record["episode_seed"])
        if episode.reposition_xy is not None:
            chosen.append(start + np.arange(episode.reposition_step + 1, len(record["actions"])))
        start += len(record["actions"])
    return np.concatenate(chosen) if chosen else np.zeros(0, dtype=int)


def name_pairs(episode_ids: np.ndarray, image_size: int, window: int
               ) -> tuple[np.ndarray, list[str], np.ndarray, dict[str, int]]:
    """The expert replayed from these episodes' initial states; every frame where a name decides
    the move, twice: as demonstrated, and as its twin, the same image with the other thing named
    and the expert's move towards that one. Object pairs: the first WINDOW steps of a two-object
    scene, before the grasp; receptacle pairs: every frame that carries the target closed in a
    two-receptacle scene. Returns images uint8 [2P, H, W, 3], instructions [2P], actions float32
    [2P, 7] and the number of pairs of each kind.

    On the demonstrated frames a name-blind policy is already right often (it goes to one object:
    the base of 2026-12-04 grasps the other object in half its two-object scenes; it carries to
    where it is right in 79% of the receptacle frames where the name decides), and the model
    never learns to read the names; among the pairs any such guess is right half the time
    (docs/PRETRAINING.md)."""
    scenes = {int(i): decode_episode("pretrain", int(i)) for i in episode_ids}
    ids = np.array([i for i, ep in scenes.items() if len(ep.objects) > 1 or len(ep.receptacles) > 1])
    images, instructions, actions, counts = [], [], [], {"object_pairs": 0, "receptacle_pairs": 0}
    for start in range(0, len(ids), 64):
        envs = make_vec_env("pretrain", len(ids[start:start + 64]), image_size, env="twin")
        obs, _ = envs.reset(options={"episode_ids": ids[start:start + 64]})
        two_objects = np.array([len(ep.objects) > 1 for ep in envs.episodes])
        two_receptacles = np.array([len(ep.receptacles) > 1 for ep in envs.episodes])
        other_receptacle_xy = np.array([ep.receptacle_xy[-1] for ep in envs.episodes])  # receptacles stay put
        for step in range(envs.max_episode_steps):
            expert, object_xy, receptacle_xy = envs.expert_action(), envs.object_xy.copy(), envs.receptacle_xy
            envs.object_xy[two_objects, 0] = object_xy[two_objects, 1]  # the other object as the target
            envs.receptacle_xy = other_receptacle_xy
            twin = envs.expert_action()  # picking: towards the other object; carrying: to the other receptacle
            envs.object_xy, envs.receptacle_xy = object_xy, receptacle_xy
            picking = two_objects & (step < window) & (envs.held < 0) & (expert[:, 6] >= 0)
            carrying = two_receptacles & (envs.held == 0) & (expert[:, 6] < 0)
            for i in np.flatnonzero(picking | carrying):
                ep = envs.episodes[i]
                other = (dict(object=ep.objects[1], receptacle=ep.receptacles[0]) if picking[i]
                         else dict(object=ep.objects[0], receptacle=ep.receptacles[1]))
                images += [obs["image"][i]] * 2
                instructions += [ep.instruction, ep.template.format(**other)]
                actions += [expert[i], twin[i]]
                counts["object_pairs" if picking[i] else "receptacle_pairs"] += 1
            obs, *_ = envs.step(expert)
        envs.close()
    if not images:
        return np.zeros((0, image_size, image_size, 3), np.uint8), [], np.zeros((0, 7), np.float32), counts
    return np.stack(images), instructions, np.stack(actions).astype(np.float32), counts


def batch_indices(rng: np.random.Generator, step: int, size: int, num_frames: int, grounding: np.ndarray,
                  pairs: np.ndarray, jumps: np.ndarray, args: Args) -> np.ndarray:
    """One rank's frame indices [SIZE]. First cycle: grounding frames only for the first
    --grounding-steps, then --grounding-share of them, --jump-share from the JUMPS frames and the
    rest from the NUM_FRAMES demonstration frames (indices 0..NUM_FRAMES-1). Second cycle: the
    same with the name PAIRS (indices past the frames) and --pair-steps."""
    first_cycle = step < args.base_steps
    chosen = grounding if first_cycle else pairs
    alone = step < args.grounding_steps if first_cycle else step < args.base_steps + args.pair_steps
    num_chosen = round((1.0 if alone else args.grounding_share) * size)
    num_jumps = 0 if alone or not len(jumps) else round(args.jump_share * size)
    drawn = [rng.choice(chosen, size=num_chosen)] + ([rng.choice(jumps, size=num_jumps)] if num_jumps else [])
    return np.concatenate(drawn + [rng.integers(0, num_frames, size=size - num_chosen - num_jumps)])


def success_rates(vla, tokenizer, stats: NormStats, args: Args) -> dict[str, float]:
    """Held-out success at temperature 0.6 on the pretraining split and `multi_object_seen` (where
    the instruction decides which of two objects to move: chance is at most 50%)."""
    agent = ActorCritic(vla, tokenizer, stats, model_path=None, base_fingerprint="", critic=None)
    rates = {}
    for split in ("pretrain", "multi_object_seen"):
        envs = make_vec_env(split, 64, args.image_size, seed=1, env="twin")
        ids = calibration_episode_ids(split, args.eval_episodes)  # a study split's evaluation ids stay unseen
        rates[split] = evaluate_policy(agent.as_policy(0.6), envs, ids).success_rate
        envs.close()
    agent.policy.unload()  # take the (untrained, B = 0) adapters out again: vla is as before,
    vla.requires_grad_(True)  # except that peft froze it
    return rates


def main(args: Args) -> dict[str, float]:
    rank, world, _ = init_distributed("cpu")  # `make pretrain` runs 2 ranks: one per core
    if args.batch_size % world:
        sys.exit(f"error: --batch-size ({args.batch_size}) must be a multiple of the number of ranks ({world})")
    seed_everything(args.seed + rank)
    run_dir, output = Path(args.run_dir), Path(args.output)
    state = torch.load(run_dir / "state.pt", map_location="cpu", weights_only=False) if args.resume else None
    start_step = state["step"] if state else 0
    wanted = {"train": 0 if args.fresh_demos else args.num_demos, "heldout": args.heldout_demos}
    settings = dict(num_envs=64, action_noise=args.action_noise, keep_success_steps=args.keep_success_steps)
    if rank == 0:  # rank 0 collects, the others read what it wrote
        ensure_demos(Path(args.demo_dir), wanted, "twin", "pretrain", args.image_size, default_horizon("twin"),
                     **settings)
    wait_for_rank_zero()
    records = ensure_demos(Path(args.demo_dir), wanted, "twin", "pretrain", args.image_size,
                           default_horizon("twin"), **settings)
    heldout = frames_of(records["heldout"]).load()
    if args.fresh_demos:  # each rank its own stream, held in memory: the batches since start_step's last refresh
        stream_envs = make_vec_env("pretrain", 64, args.image_size, env="twin")
        first, count = start_step // args.fresh_every, args.num_demos // args.fresh_demos
        held = [fresh_demonstrations(stream_envs, n, rank, args)
                for n in tqdm(range(first, first + count), desc="fresh demonstrations", disable=rank > 0)]
        frames = pool_of(held)
        train_records = frames.records
    else:
        frames, train_records = frames_of(records["train"]).load(), records["train"]
    if state and "norm_stats" in state:
        stats = NormStats(*state["norm_stats"])
    else:  # the ranks' streams differ: every rank takes rank 0's statistics
        found = [(np.quantile(frames.actions, 0.01, axis=0), np.quantile(frames.actions, 0.99, axis=0))]
        if world > 1:
            dist.broadcast_object_list(found, src=0)
        stats = NormStats(q01=found[0][0], q99=found[0][1])

    vla, tokenizer = build_tiny_vla(args.image_size)
    vla.train()
    action_tokenizer = ActionTokenizer(tokenizer.vocab_size)
    heldout_tokens = action_tokenizer.encode(stats.normalize(heldout.actions))
    second_cycle = total_steps(args) > args.base_steps
    no_pairs = (np.zeros((0, args.image_size, args.image_size, 3), np.uint8), [], np.zeros((0, 7), np.float32))
    pair_images, pair_texts, pair_actions = no_pairs  # the second cycle's, made when it starts
    pair_counts: dict[str, int] = {}

    def second_cycle_pairs() -> tuple[np.ndarray, list[str], np.ndarray]:
        """From the episodes held when the second cycle starts (a resumed run makes the same)."""
        seeds = np.array([r["episode_seed"] for r in train_records], dtype=np.int64)
        if args.fresh_demos:
            first = args.base_steps // args.fresh_every
            seeds = np.concatenate([stream_ids(n, rank, args) for n in range(first, first + count)])
        *made, counts = name_pairs(seeds, args.image_size, args.grounding_window)
        if not len(made[2]):
            sys.exit(f"error: the {args.num_demos} demonstrations hold no two-object or two-receptacle scene for "
                     "the second cycle: raise --num-demos, or pass --pair-steps 0 --pair-mix-steps 0")
        pair_counts.update(counts)
        return tuple(made)

    def index_sets() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
        """Action tokens [F + 2P, 7] of the frames, then the pairs; the first cycle's grounding frames
        [G]; the second cycle's pairs (indices past the frames) [2P]; the frames after a jump [J];
        how many of the F frames are demonstrations' (with --pairs-from-start the held name pairs
        come after them and are the grounding frames)."""
        tokens = action_tokenizer.encode(stats.normalize(np.concatenate([frames.actions, pair_actions])))
        demo_frames = len(frames) - (frames.pairs if args.pairs_from_start else 0)
        grounding = (np.arange(demo_frames, len(frames)) if args.pairs_from_start
                     else grounding_frames(train_records, args.grounding_window, args.carry_window))
        jumps = jump_frames(train_records) if args.jump_share else np.zeros(0, dtype=int)
        return tokens, grounding, len(frames) + np.arange(len(pair_actions)), jumps, demo_frames

    if second_cycle and (not args.fresh_demos or start_step >= args.base_steps):
        pair_images, pair_texts, pair_actions = second_cycle_pairs()  # a fixed set's: made now, errors early
    tokens, grounding, pairs, jumps, demo_frames = index_sets()
    if not len(grounding) and (args.grounding_steps or args.grounding_share):
        sys.exit(f"error: the {args.num_demos} demonstrations hold no two-object or two-receptacle scene to "
                 "ground names on: raise --num-demos, or pass --grounding-steps 0 --grounding-share 0")

    def batch_of(index: np.ndarray) -> tuple[np.ndarray, list[str]]:
        """Images [B, H, W, 3] and instructions of frames `index` (demonstrations, then pairs)."""
        own = index < len(frames)
        images = np.empty((len(index), args.image_size, args.image_size, 3), np.uint8)
        images[own], images[~own] = frames.read_images(index[own]), pair_images[index[~own] - len(frames)]
        return images, [frames.instructions[i] if i < len(frames) else pair_texts[i - len(frames)] for i in index]
    optimizer = torch.optim.AdamW(vla.parameters(), lr=args.learning_rate, weight_decay=0.01)
    batch_rng = np.random.default_rng([args.seed, rank])  # each rank draws its own frames
    base_fingerprint = None
    if state:
        vla.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        batch_rng.bit_generator.state = state["batch_rngs"][rank]
        base_fingerprint = state.get("base_fingerprint")
    writer = SummaryWriter(str(run_dir), purge_step=start_step + 1 if start_step else None) if rank == 0 else None
    metrics: dict[str, float] = {}
    rank_batch = args.batch_size // world
    bar = tqdm(range(start_step, total_steps(args)), desc="pretrain", initial=start_step, total=total_steps(args),
               disable=rank > 0)
    t0 = time.perf_counter()

    for step in bar:
        if args.fresh_demos and step > start_step and step % args.fresh_every == 0:  # the oldest out, new in
            held = held[1:] + [fresh_demonstrations(stream_envs, step // args.fresh_every + count - 1, rank, args)]
            frames = pool_of(held)
            train_records = frames.records
            tokens, grounding, pairs, jumps, demo_frames = index_sets()
        if step == args.base_steps:  # the second cycle starts from fresh moments, as a fine-tuning run does
            optimizer = torch.optim.AdamW(vla.parameters(), lr=args.pair_learning_rate, weight_decay=0.01)
            base_fingerprint = weights_fingerprint(vla.state_dict())
            if not len(pair_actions):
                pair_images, pair_texts, pair_actions = second_cycle_pairs()
                tokens, grounding, pairs, jumps, demo_frames = index_sets()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, args)
        index = batch_indices(batch_rng, step, rank_batch, demo_frames, grounding, pairs, jumps, args)
        inputs = prepare_inputs(vla, tokenizer, *batch_of(index))
        loss, predicted = action_token_loss(vla, inputs, torch.as_tensor(tokens[index]))
        check_finite(f"step {step + 1}", loss=loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        all_reduce_gradients(list(vla.parameters()))  # the mean over every rank's frames
        torch.nn.utils.clip_grad_norm_(vla.parameters(), 1.0)
        optimizer.step()

        done = step + 1
        metrics = {"train/loss": loss.item(), "train/lr": learning_rate_at(step, args),
                   "train/token_accuracy": float((predicted.numpy() == tokens[index]).mean()),
                   "time/steps_per_s": (done - start_step) / (time.perf_counter() - t0)}
        if rank == 0 and (done % args.eval_every == 0 or done in (args.base_steps, total_steps(args))):
            vla.eval()
            with torch.no_grad():
                index = np.arange(min(len(heldout), 512))
                inputs = prepare_inputs(vla, tokenizer, heldout.read_images(index),
                                        [heldout.instructions[i] for i in index])
                val_loss, _ = action_token_loss(vla, inputs, torch.as_tensor(heldout_tokens[index]))
            metrics["val/loss"] = val_loss.item()
            metrics.update({f"eval/{k}": v for k, v in success_rates(vla, tokenizer, stats, args).items()})
            vla.train()
            tqdm.write(f"step {done}: val loss {metrics['val/loss']:.3f}, success pretrain "
                       f"{metrics['eval/pretrain']:.3f}, multi_object_seen {metrics['eval/multi_object_seen']:.3f}")
        if writer is not None:
            for k, v in metrics.items():
                writer.add_scalar(k, v, done)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        if done % args.save_every == 0 or done == total_steps(args):
            batch_rngs: list = [batch_rng.bit_generator.state]
            if world > 1:
                batch_rngs = [None] * world
                dist.all_gather_object(batch_rngs, batch_rng.bit_generator.state)
            if rank == 0:
                run_dir.mkdir(parents=True, exist_ok=True)
                torch.save({"model": vla.state_dict(), "optimizer": optimizer.state_dict(), "step": done,
                            "batch_rngs": batch_rngs, "base_fingerprint": base_fingerprint,
                            "norm_stats": (stats.q01, stats.q99)}, run_dir / "state.tmp")
                os.replace(run_dir / "state.tmp", run_dir / "state.pt")
    if rank > 0:
        return metrics

    # ---------------------------------------------------------------- export
    vla.eval()
    save_openvla_dir(output, vla, tokenizer, norm_stats={UNNORM_KEY: stats})
    recipe = {"args": asdict(args), "fingerprint": weights_fingerprint(vla.state_dict()),
              "base_fingerprint": base_fingerprint,  # the weights at the end of the first cycle
              "success": {k[5:]: v for k, v in metrics.items() if k.startswith("eval/")},
              "episode_ids": "calibration",  # the ids `success` was measured on (common.calibration_episode_ids)
              "val_loss": metrics.get("val/loss"), "frames": demo_frames, "grounding_frames": len(grounding),
              "jump_frames": len(jumps),
              **pair_counts}  # object_pairs, receptacle_pairs
    (output / "pretrain_config.json").write_text(json.dumps(recipe, indent=2))
    writer.close()
    print(f"wrote {output} (held-out success: {recipe['success']})")
    return metrics


if __name__ == "__main__":
    try:
        main(ARGS)
    except KeyboardInterrupt:
        sys.exit(f"interrupted: the last state is kept in {ARGS.run_dir}; run again with --resume")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
