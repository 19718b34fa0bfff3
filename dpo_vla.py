"""Trajectory-level DPO fine-tuning of a Vision-Language-Action model.

The preference baseline that "What Can RL Bring to VLA Generalization?" (Liu et al., 2025;
facts in ../shared/PAPER.md) compares PPO against. Its code was never published; this is our
reading of the paper's one-paragraph description, in the notation of the DPO paper (Rafailov
et al., 2023):

1. Roll out the reference policy K times from each of several initial states (episode ids).
2. From each state, pair a successful trajectory (chosen, c) with a failed one (rejected, r).
3. Minimise  -log sigmoid(beta * ((log pi(c) - log ref(c)) - (log pi(r) - log ref(r)))),
   where log pi(trajectory) is the sum over its steps of the 7 action-token log-probs.

There is no reward model, no critic and no second copy of the model: the reference's
log-probs are computed once, when the pairs are collected, and stored with them. One round
(the default) is the study's offline DPO. With --rounds R > 1 the current policy collects
fresh pairs after each round (iterative DPO) and becomes the next round's reference: its
log-probs are then free at collection time too, and the anchor follows the policy, so each
round may move it another trust region further.

    python dpo_vla.py --init-checkpoint runs/sft_warmup/checkpoint                # tiny preset, CPU
    python dpo_vla.py --model-path /weights/openvla-7b --init-checkpoint runs/sft_warmup/checkpoint

Reads top to bottom like ppo_vla.py: set-up, then per round
collect (or reuse) preference pairs -> DPO epochs -> logging -> evaluation -> checkpoint.
TensorBoard: losses/, rewards/ and logps/ are plotted against optimizer steps; data/,
rollout/ and eval/ against rounds (eval at round 0 is the reference policy).
"""

from __future__ import annotations

import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm, trange

from common import (
    CheckpointError,
    build_agent,
    collect_rollout,
    evaluate_policy,
    load_checkpoint,
    peak_memory_gb,
    resolve_device,
    restore_rng_state,
    rng_state,
    save_checkpoint,
)
from envs import make_vec_env


@dataclass
class Args:
    # --- experiment
    exp_name: str = "dpo_vla"
    """name of the run; its directory is OUTPUT_DIR/EXP_NAME (fixed, so --resume finds it)"""
    output_dir: str = "runs"
    """where run directories (TensorBoard logs, checkpoints, preference pairs) are written"""
    seed: int = 0
    """seed of torch, numpy, python and the draws of initial states"""
    device: str = "auto"
    """'auto' (CUDA if available, else CPU), 'cpu', 'cuda' or 'cuda:N'"""
    resume: bool = False
    """continue a killed run from OUTPUT_DIR/EXP_NAME/checkpoint (round, optimizer, RNG)"""
    # --- model
    preset: Literal["tiny", "openvla-7b"] = "tiny"
    """model size: 'tiny' (random-init, offline, CPU-friendly) or 'openvla-7b' (needs --model-path)"""
    model_path: str | None = None
    """local directory with the official OpenVLA-7B checkpoint; implies --preset openvla-7b"""
    init_checkpoint: str | None = None
    """start from, and take as the reference, this checkpoint (usually sft_warmup.py's output)"""
    lora_rank: int = 32
    """LoRA rank on every linear layer (paper: 32)"""
    lora_alpha: int = 16
    """LoRA alpha (paper: 16)"""
    # --- environment
    split: str = "ind"
    """task split to train on ('ind' is the training distribution; 'toy' is the synthetic test task)"""
    num_envs: int = 64
    """parallel environments for collection and evaluation (paper: 64)"""
    max_episode_steps: int = 80
    """episode horizon, no early termination (paper: 80): every trajectory has this many steps"""
    image_size: int | None = None
    """image size of the model and the renderer; default: the preset's (tiny 112, openvla-7b 224)"""
    # --- preference data
    num_states: int = 64
    """initial states (episode ids) drawn per round; NUM_STATES x ROLLOUTS_PER_STATE must be a multiple of NUM_ENVS"""
    rollouts_per_state: int = 8
    """K: rollouts from each initial state; a state gives pairs only if some succeed and some fail"""
    max_pairs_per_state: int = 4
    """at most this many (success, failure) pairs per state, drawn from all combinations, so that
    one state cannot dominate the data"""
    temperature: float = 1.0
    """sampling temperature of the collection rollouts (1.0 as PPO's); the loss always uses 1.0"""
    preference_dir: str | None = None
    """where the per-round pair files are kept; default OUTPUT_DIR/EXP_NAME/preferences. Runs that
    share it (e.g. a --beta sweep) collect the offline pairs once"""
    # --- DPO
    rounds: int = 1
    """collect-then-train rounds: 1 is the study's offline DPO; more re-collect pairs with the
    current policy, which becomes the next round's reference (iterative DPO)"""
    epochs: int = 1
    """passes over each round's pairs (LLM DPO recipes use 1-3); later passes mostly memorise pairs"""
    beta: float = 0.1
    """strength of the pull toward the reference (the KL coefficient DPO implicitly optimises).
    A pair stops pushing once its log-ratio margin is a few times 1/beta nats, summed over the
    trajectory's 7 x L tokens: a smaller beta, or shorter trajectories, let the policy move further
    from the reference. 0.1 is the DPO paper's value for whole LLM answers (hundreds of tokens, like
    an 80-step episode's 560); one-step episodes do better with 1.0 (toy task, 8 rounds: eval
    success 0.99, against 0.74 at 0.1, where the rollouts' success swung from 0.66 down to 0.34)"""
    learning_rate: float = 1e-4
    """AdamW learning rate of the LoRA adapters (paper's PPO rate; Adam's step size does not depend
    on the loss's scale, so the rate tuned for this model and adapter carries over)"""
    pairs_per_batch: int = 8
    """preference pairs per optimizer step"""
    chunk_size: int = 8
    """steps per teacher-forced forward pass (paper's PPO minibatch: 8); bounds memory for any
    trajectory length, gradients are accumulated over the chunks"""
    max_grad_norm: float = 10.0
    """global gradient-norm clip (as the paper's PPO)"""
    # --- evaluation, logging, checkpoints
    eval_temperature: float = 0.6
    """sampling temperature for evaluation (paper: 0.6)"""
    eval_every: int = 1
    """evaluate every K rounds (and after the last), and the reference before the first; 0 disables"""
    eval_episodes: int = 64
    """episodes per evaluation, on the training split"""


def check_args(args: Args) -> None:
    """Reject inconsistent settings before anything slow is loaded."""
    if args.rollouts_per_state < 2:
        raise ValueError(f"--rollouts-per-state must be at least 2 (a pair needs two rollouts from one state), "
                         f"got {args.rollouts_per_state}")
    if (args.num_states * args.rollouts_per_state) % args.num_envs != 0:
        raise ValueError(f"--num-states x --rollouts-per-state ({args.num_states} x {args.rollouts_per_state}) "
                         f"must be a multiple of --num-envs ({args.num_envs})")
    for name in ("num_states", "max_pairs_per_state", "rounds", "epochs", "pairs_per_batch", "chunk_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.beta <= 0:
        raise ValueError(f"--beta must be positive, got {args.beta}")


# ==================================================================== the DPO loss


def dpo_loss(
    policy_chosen: torch.Tensor,  # [P], log pi(c): summed action log-probs of each chosen trajectory
    policy_rejected: torch.Tensor,  # [P], log pi(r)
    ref_chosen: torch.Tensor,  # [P], log ref(c)
    ref_rejected: torch.Tensor,  # [P], log ref(r)
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO loss [P] and the implicit rewards beta * log(pi / ref) of chosen and rejected [P].

    At the reference both rewards are 0 and the loss is log 2; it falls toward 0 as the chosen
    trajectory gains probability relative to the rejected one. logsigmoid (not log(sigmoid))
    stays finite for large negative margins.
    """
    chosen_rewards = beta * (policy_chosen - ref_chosen)
    rejected_rewards = beta * (policy_rejected - ref_rejected)
    return -F.logsigmoid(chosen_rewards - rejected_rewards), chosen_rewards, rejected_rewards


# ==================================================================== log-probs of whole trajectories


def trajectory_logprobs(
    agent,
    images: torch.Tensor,  # uint8 [M, L, H, W, 3]
    instructions: list[list[str]],  # [M][L]
    tokens: torch.Tensor,  # long [M, L, 7]
    chunk_size: int,
) -> torch.Tensor:
    """log pi(trajectory) = sum over its L steps of log pi(action tokens | observation): [M].

    Steps are teacher-forced in chunks of `chunk_size`, across trajectory boundaries, so memory
    depends on the chunk, not on L. Call it under torch.no_grad(): the gradient is taken by
    `backward_weighted_logprobs`, chunk by chunk.
    """
    num_trajectories, length = tokens.shape[:2]
    if num_trajectories == 0:  # a round without pairs keeps no trajectories
        return torch.zeros(0)
    flat_images = images.flatten(0, 1)  # [M*L, H, W, 3]
    flat_instructions = [text for trajectory in instructions for text in trajectory]
    flat_tokens = tokens.flatten(0, 1)  # [M*L, 7]
    step_logprobs = []
    for start in range(0, num_trajectories * length, chunk_size):
        chunk = slice(start, start + chunk_size)
        logprob, _, _ = agent.evaluate(flat_images[chunk], flat_instructions[chunk], flat_tokens[chunk],
                                       temperature=1.0)
        step_logprobs.append(logprob.float())
    return torch.cat(step_logprobs).view(num_trajectories, length).sum(dim=1)


def backward_weighted_logprobs(
    agent,
    images: torch.Tensor,  # uint8 [M, L, H, W, 3]
    instructions: list[list[str]],  # [M][L]
    tokens: torch.Tensor,  # long [M, L, 7]
    weights: torch.Tensor,  # [M], d loss / d log pi(trajectory m)
    chunk_size: int,
) -> None:
    """Accumulate into .grad the gradient of sum_m weights[m] * log pi(trajectory m).

    The DPO loss depends on a trajectory only through its summed log-prob, so by the chain rule
    its gradient is exactly this weighted sum of log-prob gradients. As the log-prob is a sum
    over steps, each chunk of steps can be backpropagated (and its graph freed) on its own.
    """
    num_trajectories, length = tokens.shape[:2]
    flat_images = images.flatten(0, 1)
    flat_instructions = [text for trajectory in instructions for text in trajectory]
    flat_tokens = tokens.flatten(0, 1)
    step_weights = weights.detach().repeat_interleave(length)  # [M*L]: a step inherits its trajectory's weight
    for start in range(0, num_trajectories * length, chunk_size):
        chunk = slice(start, start + chunk_size)
        logprob, _, _ = agent.evaluate(flat_images[chunk], flat_instructions[chunk], flat_tokens[chunk],
                                       temperature=1.0)
        (step_weights[chunk].to(logprob.device) * logprob.float()).sum().backward()


# ==================================================================== preference data


@dataclass
class Preferences:
    """One round's pairs and the trajectories they point to, all on the CPU.

    Only trajectories that belong to some pair are kept (M of them, each L steps long); a
    trajectory may appear in several pairs. P may be 0 when no state had both outcomes.
    """

    images: torch.Tensor  # uint8 [M, L, H, W, 3]
    instructions: list[list[str]]  # [M][L]
    tokens: torch.Tensor  # long [M, L, 7], the action tokens the policy sampled
    ref_logprobs: torch.Tensor  # float [M], log ref(trajectory), at temperature 1
    episode_ids: torch.Tensor  # long [M], the initial state each trajectory started from
    success: torch.Tensor  # bool [M]
    pairs: torch.Tensor  # long [P, 2], (chosen, rejected) indices into the M trajectories
    stats: dict[str, float]  # about the whole collection, kept or not: episodes, success rate, states with pairs


def roll_out_from_states(
    agent, envs, state_ids: np.ndarray, rollouts_per_state: int, temperature: float
) -> dict[str, Any]:
    """K rollouts from each initial state, split into E = S * K whole episodes.

    Returns images uint8 [E, L, H, W, 3], instructions [E][L], tokens long [E, L, 7],
    episode_ids long [E], success bool [E] (at the final step, the study's criterion).
    """
    # [B, N]: batch b runs envs on ids[b]; the K copies of a state are neighbours.
    ids = np.repeat(state_ids, rollouts_per_state).reshape(-1, envs.num_envs)
    images, instructions, tokens, episode_ids, success = [], [], [], [], []
    for batch_ids in tqdm(ids, desc="collect", leave=False):
        # One episode per env: the rollout is [L, N], and env n's column is one trajectory.
        rollout = collect_rollout(agent, envs, envs.max_episode_steps, temperature,
                                  episode_ids_fn=lambda batch_ids=batch_ids: batch_ids)
        images.append(rollout.images.transpose(0, 1))  # [N, L, H, W, 3]
        tokens.append(rollout.tokens.transpose(0, 1))  # [N, L, 7]
        instructions += [list(column) for column in zip(*rollout.instructions, strict=True)]
        episode_ids.append(rollout.episode_ids[0])  # [N], as the env reports them
        success.append(torch.as_tensor(rollout.episode_success))  # [N]
    return {
        "images": torch.cat(images), "instructions": instructions, "tokens": torch.cat(tokens),
        "episode_ids": torch.cat(episode_ids), "success": torch.cat(success),
    }


def pair_successes_with_failures(
    episode_ids: torch.Tensor,  # long [E]
    success: torch.Tensor,  # bool [E]
    max_pairs_per_state: int,
    rng: np.random.Generator,
) -> torch.Tensor:
    """(chosen, rejected) episode indices [P, 2]: a success and a failure from the same state.

    A state with s successes and f failures offers s * f pairs; at most `max_pairs_per_state`
    of them are drawn at random. Failures are not compared across states: a failure from a hard
    state may be no worse a behaviour than a success from an easy one.
    """
    pairs = []
    for state in torch.unique(episode_ids):
        same_state = episode_ids == state
        winners = torch.nonzero(same_state & success).flatten().tolist()
        losers = torch.nonzero(same_state & ~success).flatten().tolist()
        combinations = [(w, loser) for w in winners for loser in losers]
        take = min(len(combinations), max_pairs_per_state)
        pairs += [combinations[i] for i in sorted(rng.choice(len(combinations), size=take, replace=False))]
    return torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)


def collect_preferences(agent, envs, args: Args, state_ids: np.ndarray, round_index: int) -> Preferences:
    """Roll out the current policy (this round's reference), pair outcomes, and score the pairs."""
    agent.eval()
    episodes = roll_out_from_states(agent, envs, state_ids, args.rollouts_per_state, args.temperature)
    pairs = pair_successes_with_failures(episodes["episode_ids"], episodes["success"], args.max_pairs_per_state,
                                         np.random.default_rng([args.seed, round_index]))
    # Keep only the trajectories that some pair uses, renumbered 0..M-1.
    kept, pairs = torch.unique(pairs, return_inverse=True)  # kept [M], pairs [P, 2] now index kept
    images, tokens = episodes["images"][kept], episodes["tokens"][kept]
    instructions = [episodes["instructions"][i] for i in kept.tolist()]
    # The reference log-probs are scored by the same teacher-forced forward as the policy's
    # during training (not taken from the rollout), so the two agree exactly before the first
    # update (loss log 2) whatever the sampling temperature or the numerics of generation.
    with torch.no_grad():
        ref_logprobs = trajectory_logprobs(agent, images, instructions, tokens, args.chunk_size)
    num_states_with_pairs = len(torch.unique(episodes["episode_ids"][kept[pairs[:, 0]]])) if len(pairs) else 0
    return Preferences(
        images=images, instructions=instructions, tokens=tokens, ref_logprobs=ref_logprobs.cpu(),
        episode_ids=episodes["episode_ids"][kept], success=episodes["success"][kept], pairs=pairs,
        stats={"episodes": len(episodes["success"]), "success_rate": episodes["success"].float().mean().item(),
               "states": len(state_ids), "states_with_pairs": num_states_with_pairs, "pairs": len(pairs)},
    )


def collection_settings(args: Args, round_index: int) -> dict[str, Any]:
    """Everything a round's pairs depend on: a stored file is reused only if these match.

    The first round (index 0) is collected by the initial policy, so only the collection
    settings matter: this lets a --beta or --learning-rate sweep share the offline pairs. Later
    rounds are collected by a trained policy, so every setting that shaped it counts as well.
    (--init-checkpoint is compared by path: point a new checkpoint at a new --preference-dir.)
    """
    collection = ("seed", "preset", "model_path", "init_checkpoint", "lora_rank", "lora_alpha", "split",
                  "num_envs", "max_episode_steps", "image_size", "num_states", "rollouts_per_state",
                  "max_pairs_per_state", "temperature")
    training = ("epochs", "beta", "learning_rate", "pairs_per_batch", "chunk_size", "max_grad_norm",
                "eval_every", "eval_temperature", "eval_episodes")
    names = collection if round_index == 0 else collection + training
    return {"format": 1, "round": round_index, **{name: getattr(args, name) for name in names}}


def save_preferences(path: Path, data: Preferences, settings: dict[str, Any]) -> None:
    """Write the pairs atomically: a killed run leaves either the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    torch.save({"settings": settings, **vars(data)}, temporary)  # vars, not asdict: no deep copy of the images
    os.replace(temporary, path)


def load_preferences(path: Path, settings: dict[str, Any]) -> Preferences | None:
    """The pairs stored at `path` if it holds them for these settings, else None (collect them).

    An unreadable file is reported and collected again rather than trusted: pairs are cheap to
    redo compared with a run trained on half a file.
    """
    if not path.exists():
        return None
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)  # plain tensors, lists, dicts
        data = Preferences(**{name: stored[name] for name in Preferences.__dataclass_fields__})
        if stored["settings"] != settings:
            tqdm.write(f"{path} was collected with other settings; collecting round {settings['round'] + 1} again")
            return None
        if not len(data.images) == len(data.tokens) == len(data.ref_logprobs) == len(data.instructions):
            raise ValueError("trajectory fields of different lengths")
    except Exception as error:  # a truncated zip, a foreign pickle, missing keys: all mean "redo"
        tqdm.write(f"{path} is unreadable ({type(error).__name__}: {error}); collecting it again")
        return None
    return data


# ==================================================================== one DPO update


def dpo_update(agent, data: Preferences, pair_batch: torch.Tensor, beta: float, chunk_size: int) -> dict[str, float]:
    """Accumulate the gradient of the mean DPO loss over `pair_batch` (long [P, 2]); return its statistics.

    Two passes keep memory bounded by one chunk of steps: (1) without a graph, the summed
    log-prob of every trajectory in the batch, hence the loss and d loss / d log pi(trajectory);
    (2) with a graph, chunk by chunk, the gradient of those weights times the log-probs. The
    price is one extra forward pass, about a third of the update's cost.
    """
    trajectories, pair_batch = torch.unique(pair_batch, return_inverse=True)  # [U] and [P, 2] indexing them
    images, tokens = data.images[trajectories], data.tokens[trajectories]
    instructions = [data.instructions[i] for i in trajectories.tolist()]
    ref = data.ref_logprobs[trajectories]  # [U]

    with torch.no_grad():
        policy = trajectory_logprobs(agent, images, instructions, tokens, chunk_size).cpu()  # [U]
    policy.requires_grad_(True)  # a leaf: backward gives d loss / d log pi(trajectory)
    chosen, rejected = pair_batch[:, 0], pair_batch[:, 1]
    losses, chosen_rewards, rejected_rewards = dpo_loss(policy[chosen], policy[rejected], ref[chosen],
                                                        ref[rejected], beta)
    losses.mean().backward()
    backward_weighted_logprobs(agent, images, instructions, tokens, policy.grad, chunk_size)

    margins = (chosen_rewards - rejected_rewards).detach()
    return {
        "losses/loss": losses.mean().item(),
        "rewards/accuracy": (margins > 0).float().mean().item(),  # the policy prefers the chosen trajectory
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/margin": margins.mean().item(),
        # DPO only ranks: both log-probs may fall while the margin grows; these show whether they do.
        "logps/chosen": policy[chosen].mean().item(),
        "logps/rejected": policy[rejected].mean().item(),
    }


# ==================================================================== the script


def main(args: Args) -> dict[str, float]:
    # ---------------------------------------------------------------- set-up
    check_args(args)
    if args.model_path is not None:
        args.preset = "openvla-7b"
    run_dir = Path(args.output_dir) / args.exp_name
    checkpoint_dir = run_dir / "checkpoint"
    preference_dir = Path(args.preference_dir) if args.preference_dir else run_dir / "preferences"
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = resolve_device(args.device)

    if args.resume:
        agent, state = load_checkpoint(checkpoint_dir, device=device)
    elif args.init_checkpoint is not None:
        agent, state = load_checkpoint(args.init_checkpoint, device=device)
        state = {}
    else:
        agent = build_agent(args.preset, args.model_path, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
                            image_size=args.image_size, device=device, seed=args.seed)
        state = {}
    # DPO trains the adapters only; the value head is carried along unchanged in the checkpoint.
    lora_params = list(agent.lora_parameters())
    optimizer = torch.optim.AdamW(lora_params, lr=args.learning_rate, eps=1e-5)
    # Initial states come from our own generator so that a resumed run draws the same ones.
    state_rng = np.random.default_rng(args.seed)
    start_round, updates = 0, 0
    if args.resume:
        optimizer.load_state_dict(state["optimizer"])
        restore_rng_state(state["rng"])
        state_rng.bit_generator.state = state["state_rng"]
        start_round, updates = state["round"], state["updates"]

    envs = make_vec_env(args.split, args.num_envs, image_size=agent.image_size, seed=args.seed,
                        max_episode_steps=args.max_episode_steps)
    writer = SummaryWriter(str(run_dir))
    metrics: dict[str, float] = {}
    if start_round == 0:
        writer.add_text("args", "\n".join(f"{k}: {v}" for k, v in asdict(args).items()))
        if args.eval_every > 0:  # the reference policy, the baseline every round is compared with
            agent.eval()
            reference = evaluate_policy(agent, envs, args.eval_episodes, args.eval_temperature, seed=args.seed + 1)
            for k, v in reference.items():
                writer.add_scalar(f"eval/{k}", v, 0)
            metrics["eval/reference_success"] = reference["success"]
            tqdm.write(f"reference policy: eval success {reference['success']:.3f}")

    for round_index in trange(start_round, args.rounds, desc="DPO rounds", initial=start_round, total=args.rounds):
        # ------------------------------------------------------------ preference pairs
        t0 = time.perf_counter()
        state_ids = state_rng.integers(0, 2**31 - 1, args.num_states)  # drawn even when reused, to stay in step
        settings = collection_settings(args, round_index)
        path = preference_dir / f"round_{round_index + 1:03d}.pt"
        data = load_preferences(path, settings)
        if data is None:
            data = collect_preferences(agent, envs, args, state_ids, round_index)
            save_preferences(path, data, settings)
        else:
            tqdm.write(f"round {round_index + 1}: reusing {len(data.pairs)} pairs from {path}")
        collect_time = time.perf_counter() - t0

        # ------------------------------------------------------------ DPO epochs
        agent.train()
        t0 = time.perf_counter()
        num_pairs = len(data.pairs)
        if num_pairs == 0:
            tqdm.write(f"round {round_index + 1}: no preference pairs: {data.stats['episodes']} episodes, "
                       f"success rate {data.stats['success_rate']:.3f}, and no initial state had both a success "
                       f"and a failure. Skipping the update. Start from a better policy (--init-checkpoint), "
                       f"or raise --rollouts-per-state or --temperature.")
        # Our own shuffling generator: the order of pairs is the same whether they were collected or reused.
        shuffle = torch.Generator().manual_seed(args.seed * 1000 + round_index)
        stats: dict[str, list[float]] = {}
        steps_per_round = args.epochs * -(-num_pairs // args.pairs_per_batch)
        progress = tqdm(total=steps_per_round, desc=f"round {round_index + 1} updates", leave=False)
        for _epoch in range(args.epochs if num_pairs else 0):
            order = torch.randperm(num_pairs, generator=shuffle)
            for start in range(0, num_pairs, args.pairs_per_batch):
                step_stats = dpo_update(agent, data, data.pairs[order[start:start + args.pairs_per_batch]],
                                        args.beta, args.chunk_size)
                step_stats["losses/grad_norm"] = torch.nn.utils.clip_grad_norm_(lora_params, args.max_grad_norm).item()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                updates += 1
                for k, v in step_stats.items():
                    writer.add_scalar(k, v, updates)
                    stats.setdefault(k, []).append(v)
                progress.update()
                progress.set_postfix(loss=f"{step_stats['losses/loss']:.3f}", acc=f"{step_stats['rewards/accuracy']:.2f}")
        progress.close()
        update_time = time.perf_counter() - t0

        # ------------------------------------------------------------ logging
        round_metrics = {
            "data/pairs": float(num_pairs),
            "data/states_with_pairs": float(data.stats["states_with_pairs"]),
            "data/episodes": float(data.stats["episodes"]),
            "rollout/success": data.stats["success_rate"],  # of the collecting policy, at --temperature
            "time/collect_s": collect_time,
            "time/update_s": update_time,
            "memory/peak_gb": peak_memory_gb(device),
        }
        for k, v in round_metrics.items():
            writer.add_scalar(k, v, round_index + 1)
        # Returned: the round's metrics plus its per-step training statistics averaged over the round.
        metrics = {**{k: v for k, v in metrics.items() if k == "eval/reference_success"}, **round_metrics,
                   **{k: float(np.mean(v)) for k, v in stats.items()}}

        # ------------------------------------------------------------ evaluation and checkpoint
        last = round_index + 1 == args.rounds
        if args.eval_every > 0 and ((round_index + 1) % args.eval_every == 0 or last):
            agent.eval()
            eval_metrics = evaluate_policy(agent, envs, args.eval_episodes, args.eval_temperature, seed=args.seed + 1)
            for k, v in eval_metrics.items():
                writer.add_scalar(f"eval/{k}", v, round_index + 1)
                metrics[f"eval/{k}"] = v
            tqdm.write(f"round {round_index + 1}: {num_pairs} pairs, eval success {eval_metrics['success']:.3f}")
        save_checkpoint(checkpoint_dir, agent, state={
            "optimizer": optimizer.state_dict(), "round": round_index + 1, "updates": updates, "rng": rng_state(),
            "state_rng": state_rng.bit_generator.state, "args": asdict(args), "algorithm": "dpo",
        })

    envs.close()
    writer.close()
    print(f"checkpoint: {checkpoint_dir}\nTensorBoard: tensorboard --logdir {run_dir}")
    return metrics


if __name__ == "__main__":
    try:
        main(tyro.cli(Args))
    except (CheckpointError, ValueError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")
