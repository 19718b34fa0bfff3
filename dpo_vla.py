"""Trajectory-level DPO fine-tuning of a Vision-Language-Action model.

The preference baseline that "What Can RL Bring to VLA Generalization?" (arXiv 2505.19789,
section 4.2; docs/PAPER_NOTES.md) compares PPO against. Its code was never published; this is
our reading of the paper's description, in the notation of the DPO paper (Rafailov et al., 2023):

1. Roll out the reference policy K times from each of several initial states (episode ids).
2. From each state, pair a successful trajectory (chosen, c) with a failed one (rejected, r).
3. Minimise  -log sigmoid(beta * ((log pi(c) - log ref(c)) - (log pi(r) - log ref(r)))),
   where log pi(trajectory) is the sum over its steps of the 7 action-token log-probs.

No reward model, no critic, no second copy of the model: the reference's log-probs are computed
once, with the pairs. One round (the default) is the study's offline DPO; with --rounds R > 1 the
policy collects fresh pairs after each round (iterative DPO) and becomes the next reference.

    python dpo_vla.py twin --init-checkpoint runs/sft_warmup_twin/checkpoint   # README's twin run
    python dpo_vla.py --init-checkpoint ... --pairs-from runs/dpo_vla/preferences/round_001.pt --beta 0.3

Reads top to bottom like ppo_vla.py: per round, pairs -> DPO epochs -> logging -> evaluation -> checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from cli import (
    check_model_args,
    parse_cli,
    require_finite_positive,
    require_non_negative,
    require_positive,
)


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
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """weights' dtype: auto = bf16 on CUDA, fp32 on the CPU (bf16 on the CPU: inspection runs)"""
    resume: bool = False
    """continue a killed run from OUTPUT_DIR/EXP_NAME/checkpoint (round, optimizer, RNG)"""
    track: bool = False
    """also log the curves to Weights & Biases (pip install wandb; WANDB_MODE=offline works)"""
    wandb_project_name: str = "cleanvla"
    """the W&B project of --track"""
    wandb_entity: str | None = None
    """the W&B team or user of --track (default: yours)"""
    capture_video: bool = False
    """save videos of the first evaluation episodes at every evaluation, in OUTPUT_DIR/EXP_NAME/videos"""
    # --- model
    model_path: str | None = None
    """OpenVLA directory in the official layout (OpenVLA-7B, or the shipped pretrained tiny
    VLA); default: a random tiny OpenVLA built in code"""
    unnorm_key: str | None = None
    """which dataset's action statistics in the model directory to use (needed if several)"""
    init_checkpoint: str | None = None
    """start from, and take as the reference, this checkpoint (usually sft_warmup.py's)"""
    lora_rank: int | None = None
    """LoRA rank on every linear layer (paper: 32); default 32, or the checkpoint's"""
    lora_alpha: int | None = None
    """LoRA alpha (paper: 16); default 16, or the checkpoint's"""
    image_size: int | None = None
    """image size of the model and renderer; default: the model's (tiny 64, OpenVLA 224)"""
    # --- environment
    env: Literal["maniskill", "twin"] = "maniskill"
    """task family: the ManiSkill3 benchmark, or its fast 2D twin"""
    split: str = "ind"
    """split to train on ('ind' is the training distribution)"""
    num_envs: int = 64
    """parallel environments per rank for collection and evaluation (paper: 64)"""
    max_episode_steps: int | None = None
    """episode horizon, no early termination; default the env's (ManiSkill 80, twin 30)"""
    # --- preference data
    num_states: int = 64
    """initial states (episode ids) drawn per round, over all ranks"""
    rollouts_per_state: int = 8
    """K: rollouts from each initial state; a state gives pairs only if some succeed and some fail"""
    max_pairs_per_state: int = 4
    """at most this many (success, failure) pairs per state, so that no state dominates"""
    temperature: float = 1.0
    """sampling temperature of the collection rollouts (as PPO's); the loss always uses 1.0"""
    pairs_from: str | None = None
    """train round 1 on these saved pairs (another run's round_NNN.pt), e.g. for a --beta sweep"""
    # --- DPO
    rounds: int = 1
    """collect-then-train rounds: 1 is the study's offline DPO; more = iterative DPO"""
    epochs: int = 1
    """passes over each round's pairs (LLM DPO recipes use 1-3)"""
    beta: float = 0.1
    """pull toward the reference (DPO's KL coefficient); 0.1 is the DPO paper's value for long
    answers; short (twin) episodes do better with more (README)"""
    learning_rate: float = 1e-4
    """AdamW learning rate of the LoRA adapters (the paper's PPO rate)"""
    pairs_per_batch: int = 8
    """preference pairs per optimizer step, over all ranks"""
    chunk_size: int = 8
    """steps per teacher-forced forward pass: bounds memory for any trajectory length"""
    max_grad_norm: float = 10.0
    """global gradient-norm clip (as the paper's PPO)"""
    # --- evaluation, logging, checkpoints
    eval_temperature: float = 0.6
    """sampling temperature for evaluation (paper: 0.6)"""
    eval_every: int = 1
    """evaluate every K rounds (and after the last), and the reference before the first; 0 disables"""
    eval_episodes: int = 64
    """episodes per evaluation, on the training split"""


RECIPES = {
    "twin": ("offline DPO on the 2D twin from an SFT warm-up (--init-checkpoint), as in the README, or from --model-path",
             Args(exp_name="dpo_twin", env="twin", num_envs=64, num_states=128, rollouts_per_state=4,
                  beta=1.0, learning_rate=1e-3, pairs_per_batch=16, chunk_size=64, eval_episodes=128)),
}


def check_args(args: Args) -> None:
    """Every value that would fail later (or silently do something else), rejected now."""
    check_model_args(args)
    require_positive(args, "num_envs", "max_episode_steps", "num_states", "max_pairs_per_state", "rounds",
                     "epochs", "pairs_per_batch", "chunk_size", "eval_episodes")
    require_non_negative(args, "eval_every", "eval_temperature")
    require_finite_positive(args, "temperature", "beta", "learning_rate", "max_grad_norm")
    if args.rollouts_per_state < 2:
        raise ValueError(f"--rollouts-per-state must be at least 2 (a pair needs two rollouts from one "
                         f"state), got {args.rollouts_per_state}")
    if (args.num_states * args.rollouts_per_state) % args.num_envs != 0:
        raise ValueError(f"--num-states x --rollouts-per-state ({args.num_states} x {args.rollouts_per_state}) "
                         f"must be a multiple of --num-envs ({args.num_envs})")


if __name__ == "__main__":
    ARGS = parse_cli(Args, check_args, RECIPES)  # before the heavy imports: --help answers at once

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import (
    ActorCritic,
    EpisodeLoop,
    build_agent,
    check_finite,
    check_init_checkpoint,
    close_writer,
    evaluate_during_training,
    evaluation_episode_ids,
    gather_objects,
    global_mean,
    init_distributed,
    load_checkpoint,
    log_scalars,
    make_writer,
    optimizer_step,
    peak_memory_gb,
    rank_slice,
    resolve_dtype,
    restore_rng_state,
    resume_flags,
    run_script,
    save_run,
    seed_everything,
    world_info,
)
from envs import make_vec_env
from tasks import MAX_EPISODE_ID


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO loss [P] and implicit rewards beta * log(pi / ref) of chosen and rejected [P],
    from the summed action log-probs [P] of each pair's trajectories under the policy and the
    reference. At the reference the loss is log 2; logsigmoid stays finite for large margins."""
    chosen_rewards = beta * (policy_chosen - ref_chosen)
    rejected_rewards = beta * (policy_rejected - ref_rejected)
    return -F.logsigmoid(chosen_rewards - rejected_rewards), chosen_rewards, rejected_rewards


def step_logprobs(agent, data: dict, trajectories: torch.Tensor, chunk_size: int):
    """Yield (step slice, summed log-prob [chunk]) per chunk_size steps of `trajectories` (across their ends)."""
    images = data["images"][trajectories].flatten(0, 1)  # [M*L, H, W, 3]
    instructions = [text for i in trajectories.tolist() for text in data["instructions"][i]]
    tokens = data["tokens"][trajectories].flatten(0, 1)  # [M*L, 7]
    for start in range(0, len(tokens), chunk_size):
        chunk = slice(start, start + chunk_size)
        yield chunk, agent.score_actions(images[chunk], instructions[chunk], tokens[chunk])[0].float()


def trajectory_logprobs(agent, data: dict, trajectories: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """log pi(trajectory) = sum over its L steps of log pi(action tokens | observation): [M]."""
    with torch.no_grad():
        steps = [logprob.cpu() for _, logprob in step_logprobs(agent, data, trajectories, chunk_size)]
    return torch.cat(steps).view(len(trajectories), -1).sum(dim=1) if steps else torch.zeros(0)


def backward_weighted_logprobs(agent, data: dict, trajectories: torch.Tensor, weights: torch.Tensor,
                               chunk_size: int) -> None:
    """Accumulate into .grad the gradient of sum_m weights[m] * log pi(trajectory m) (the DPO loss's,
    by the chain rule), a sum over steps: each chunk is backpropagated (graph freed) on its own."""
    step_weights = weights.detach().repeat_interleave(data["tokens"].shape[1])  # [M*L]
    for chunk, logprob in step_logprobs(agent, data, trajectories, chunk_size):
        (step_weights[chunk].to(logprob.device) * logprob).sum().backward()


def pair_successes_with_failures(episode_ids: torch.Tensor, success: torch.Tensor, max_pairs_per_state: int,
                                 rng: np.random.Generator) -> torch.Tensor:
    """(chosen, rejected) episode indices [P, 2]: up to max_pairs_per_state random (success, failure)
    pairs per state, never across states (a hard state's failure may be no worse than an easy one's success)."""
    pairs = []
    for state in torch.unique(episode_ids):
        same_state = episode_ids == state
        winners = torch.nonzero(same_state & success).flatten().tolist()
        losers = torch.nonzero(same_state & ~success).flatten().tolist()
        combinations = [(w, loser) for w in winners for loser in losers]
        take = min(len(combinations), max_pairs_per_state)
        pairs += [combinations[i] for i in sorted(rng.choice(len(combinations), size=take, replace=False))]
    return torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)


def collect_preferences(agent, envs, args: Args, state_ids: np.ndarray, seed: int) -> dict[str, Any]:
    """Roll out the current policy (this round's reference) K times per state, pair the outcomes ->
    the M paired trajectories (images, instructions, tokens [M, L, 7], ref_logprobs [M]), pairs [P, 2], stats."""
    agent.eval()
    ids = np.repeat(state_ids, args.rollouts_per_state).reshape(-1, envs.num_envs)  # K copies adjacent
    runs = [EpisodeLoop(envs, lambda batch=batch: batch).run(agent.as_policy(args.temperature), envs.max_episode_steps)
            for batch in tqdm(ids, desc="collect", leave=False, disable=world_info()[0] > 0)]
    episode_ids = torch.cat([r.episode_ids[0] for r in runs])  # [E]
    success = torch.cat([torch.as_tensor(r.episode_success) for r in runs])  # [E]
    pairs = pair_successes_with_failures(episode_ids, success, args.max_pairs_per_state, np.random.default_rng(seed))
    kept, pairs = torch.unique(pairs, return_inverse=True)  # only paired trajectories, renumbered
    data = {"images": torch.cat([r.images.transpose(0, 1) for r in runs])[kept],
            "instructions": [list(col) for r in runs for col in zip(*r.instructions, strict=True)],
            "tokens": torch.cat([r.tokens.transpose(0, 1) for r in runs])[kept], "pairs": pairs}
    data["instructions"] = [data["instructions"][i] for i in kept.tolist()]
    # Teacher-forced, as the policy in training (not the rollout's log-probs): the loss starts at log 2.
    data["ref_logprobs"] = trajectory_logprobs(agent, data, torch.arange(len(kept)), args.chunk_size)
    with_pairs = len(torch.unique(episode_ids[kept[pairs[:, 0]]])) if len(pairs) else 0
    data["stats"] = {"success_rate": success.float().mean().item(), "states_with_pairs": with_pairs,
                     "env_steps": int(ids.size * envs.max_episode_steps)}  # every env steps the whole horizon
    return data


def load_pairs(path: Path, args: Args, image_size: int) -> dict[str, Any]:
    """Pairs saved by a run (round_NNN.pt), checked to fit this run's task and model."""
    if not path.is_file():
        raise FileNotFoundError(f"--pairs-from {path} does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        found = (data["env"], data["split"], tuple(data["images"].shape[2:4]))
    except Exception as error:  # a truncated zip, a foreign pickle, missing keys
        raise ValueError(f"--pairs-from {path} is not a pairs file ({type(error).__name__})") from None
    if found != (args.env, args.split, (image_size, image_size)):
        raise ValueError(f"--pairs-from {path} holds {found[0]}/{found[1]} at {found[2][0]} px, not "
                         f"{args.env}/{args.split} at {image_size} px")
    return data


def save_pairs(path: Path, data: dict[str, Any], args: Args) -> None:
    """Atomically: a killed run leaves the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**data, "env": args.env, "split": args.split}, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)


def dpo_update(agent, data: dict, pair_batch: torch.Tensor, args: Args, where: str) -> dict[str, float]:
    """Accumulate the gradient of the mean DPO loss over the global batch -> its statistics. Two
    passes keep memory at one chunk of steps: (1) without a graph, every trajectory's log pi, hence
    the loss and d loss / d log pi(trajectory); (2) with one, chunk by chunk, those weights x log pi."""
    trajectories, pair_batch = torch.unique(pair_batch, return_inverse=True)  # [U] and [P, 2] into them
    policy = trajectory_logprobs(agent, data, trajectories, args.chunk_size)  # [U]
    policy.requires_grad_(True)  # a leaf: backward gives d loss / d log pi(trajectory)
    ref = data["ref_logprobs"][trajectories]
    chosen, rejected = pair_batch[:, 0], pair_batch[:, 1]
    losses, chosen_rewards, rejected_rewards = dpo_loss(policy[chosen], policy[rejected], ref[chosen],
                                                        ref[rejected], args.beta)
    _, world = world_info()
    count = sum(gather_objects(len(losses)))  # the step's pairs on all ranks (each holds its own number)
    check_finite(where, dpo_loss=losses.sum())
    (losses.sum() * world / count).backward()  # x world / count: the mean over ranks is the mean over every pair
    backward_weighted_logprobs(agent, data, trajectories, policy.grad, args.chunk_size)
    margins = (chosen_rewards - rejected_rewards).detach()
    return {"losses/loss": losses.mean().item(), "rewards/margin": margins.mean().item(),
            "rewards/accuracy": (margins > 0).float().mean().item(),  # the policy prefers the chosen one
            "rewards/chosen": chosen_rewards.mean().item(), "rewards/rejected": rejected_rewards.mean().item(),
            # DPO only ranks: both log-probs may fall while the margin grows; these show whether they do.
            "logps/chosen": policy[chosen].mean().item(), "logps/rejected": policy[rejected].mean().item()}


def init_agent(args: Args, device: torch.device) -> tuple[Args, ActorCritic, dict]:
    """How the run starts, as nanoGPT's init_from -> (the flags it runs with, agent, trainer
    state). A flag that contradicts a checkpoint is a one-line error, before anything loads."""
    dtype = resolve_dtype(args.dtype, device)
    if args.resume:  # this run's own checkpoint, continued: adapter, optimizer, RNG, round
        checkpoint = Path(args.output_dir) / args.exp_name / "checkpoint"
        args = Args(**resume_flags(checkpoint, "dpo", vars(args)))  # not given: the run's own
    elif args.init_checkpoint is not None:  # another run's adapter (the SFT warm-up's), a new run
        checkpoint = Path(args.init_checkpoint)
        check_init_checkpoint(checkpoint, args.lora_rank, args.lora_alpha, args.image_size)
    else:  # new LoRA adapters on the base model (paper: rank 32, alpha 16), no value head
        return args, build_agent(args.model_path, critic=None, lora_rank=args.lora_rank,
                                 lora_alpha=args.lora_alpha, image_size=args.image_size, device=device,
                                 seed=args.seed, unnorm_key=args.unnorm_key, dtype=dtype), {}
    # DPO has no critic: a value head in the checkpoint (e.g. PPO's) is dropped.
    agent, state = load_checkpoint(checkpoint, device, args.model_path, args.unnorm_key,
                                   critic=None, dtype=dtype, seed=args.seed)
    return args, agent, state if args.resume else {}


def main(args: Args) -> dict[str, float]:
    # ---------------------------------------------------------------- set-up
    rank, world, device = init_distributed(args.device)
    seed_everything(args.seed + rank)
    args, agent, state = init_agent(args, device)
    run_path = Path(args.output_dir) / args.exp_name
    optimizer = torch.optim.AdamW(agent.lora_parameters(), lr=args.learning_rate, eps=1e-5)
    state_rng = np.random.default_rng(args.seed)  # initial states: the same on every rank, each takes its slice
    start_round, updates = 0, 0
    if args.resume:
        optimizer.load_state_dict(state["optimizer"])  # this restores the run's learning rate too:
        optimizer.param_groups[0]["lr"] = args.learning_rate  # the flag's (resume_flags printed any change)
        restore_rng_state(state["rng"], rank, world)
        state_rng.bit_generator.state = state["state_rng"]
        start_round, updates = state["round"], state["updates"]

    envs = make_vec_env(args.split, args.num_envs, image_size=agent.image_size, seed=args.seed + rank,
                        max_episode_steps=args.max_episode_steps, env=args.env, render_device=str(device))
    writer = make_writer(run_path, vars(args), updates, args.track, args.wandb_project_name, args.wandb_entity)
    eval_ids = rank_slice(evaluation_episode_ids(args.seed + 1, args.split, args.eval_episodes))  # fixed
    videos = run_path / "videos" if args.capture_video else None
    metrics: dict[str, float] = {}
    if start_round == 0 and args.eval_every > 0:  # the reference policy: the baseline of every round
        reference = evaluate_during_training(agent, envs, eval_ids, args.eval_temperature, "round 0", video_dir=videos)
        metrics["eval/reference_success"] = reference["eval/success"]
        log_scalars(writer, {"eval/success": reference["eval/success"]}, 0)

    for round_index in tqdm(range(start_round, args.rounds), desc="DPO rounds", initial=start_round,
                            total=args.rounds, disable=rank > 0):
        # ------------------------------------------------------------ preference pairs
        t0 = time.perf_counter()
        state_ids = rank_slice(state_rng.integers(0, MAX_EPISODE_ID, args.num_states))
        path = run_path / "preferences" / f"round_{round_index + 1:03d}{f'_rank{rank}' if world > 1 else ''}.pt"
        if round_index == 0 and args.pairs_from is not None:  # ranks share the pairs out
            data = load_pairs(Path(args.pairs_from), args, agent.image_size)
            data["pairs"] = torch.as_tensor(rank_slice(data["pairs"].numpy()))
        elif args.resume and path.exists():  # this run collected them before it was killed
            data = load_pairs(path, args, agent.image_size)
        else:
            data = collect_preferences(agent, envs, args, state_ids, seed=args.seed * 1000 + round_index)
            save_pairs(path, data, args)
        collect_time = time.perf_counter() - t0

        # ------------------------------------------------------------ DPO epochs
        agent.train()
        t0 = time.perf_counter()
        num_pairs = len(data["pairs"])
        most_pairs = max(gather_objects(num_pairs))  # every rank takes as many steps (some empty): no hang
        if most_pairs == 0 and rank == 0:  # e.g. a policy that always fails (or always succeeds)
            tqdm.write(f"round {round_index + 1}: no state had both a success and a failure, so no pairs: "
                       f"skipping the update (start from a better policy, or raise --rollouts-per-state)")
        per_rank_batch = max(1, args.pairs_per_batch // world)
        steps = args.epochs * -(-most_pairs // per_rank_batch)
        shuffle = torch.Generator().manual_seed(args.seed * 1000 + round_index)
        order = torch.cat([torch.randperm(num_pairs, generator=shuffle) for _ in range(args.epochs)])
        stats: dict[str, list[float]] = {}
        for step in tqdm(range(steps), desc=f"round {round_index + 1} updates", leave=False, disable=rank > 0):
            chosen = order[step * per_rank_batch:(step + 1) * per_rank_batch]
            step_stats = dpo_update(agent, data, data["pairs"][chosen], args, f"round {round_index + 1}")
            step_stats["losses/grad_norm"] = optimizer_step(optimizer, agent.lora_parameters(),
                                                            args.max_grad_norm, f"round {round_index + 1}")
            updates += 1
            if len(chosen) > 0:  # else this rank ran out of pairs before the others: nothing to log
                log_scalars(writer, step_stats, updates)
            for k, v in step_stats.items():  # every rank the same keys: global_mean is collective
                stats.setdefault(k, []).extend([v] if len(chosen) > 0 else [])
        update_time = time.perf_counter() - t0

        # ------------------------------------------------------------ logging (global means)
        metrics = {**{k: v for k, v in metrics.items() if k == "eval/reference_success"},
                   "data/pairs": global_mean([num_pairs]) * world,
                   "data/states_with_pairs": global_mean([data["stats"]["states_with_pairs"]]) * world,
                   "rollout/success": global_mean([data["stats"]["success_rate"]]),  # the collecting policy
                   "data/env_steps": global_mean([data["stats"].get("env_steps", 0)]) * world,  # this round's
                   **{k: global_mean(v) for k, v in stats.items()},
                   "time/collect_s": collect_time, "time/update_s": update_time,
                   "memory/peak_gb": peak_memory_gb(device)}

        # ------------------------------------------------------------ evaluation and checkpoint
        last = round_index + 1 == args.rounds
        if args.eval_every > 0 and ((round_index + 1) % args.eval_every == 0 or last):
            metrics.update(evaluate_during_training(agent, envs, eval_ids, args.eval_temperature,
                                                    f"round {round_index + 1}", video_dir=videos))
        log_scalars(writer, {k: v for k, v in metrics.items()  # losses, rewards, logps: per optimizer step
                             if not k.startswith(("losses/", "rewards/", "logps/"))}, round_index + 1)
        save_run(run_path / "checkpoint", agent, {"optimizer": optimizer.state_dict(), "round": round_index + 1,
                 "updates": updates, "state_rng": state_rng.bit_generator.state, "algorithm": "dpo"}, vars(args))

    envs.close()
    close_writer(writer)
    return metrics


if __name__ == "__main__":
    run_script(main, ARGS, "dpo", Path(ARGS.output_dir) / ARGS.exp_name)
