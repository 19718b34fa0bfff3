"""GRPO fine-tuning of a Vision-Language-Action model: PPO's clipped objective without a critic.

The baseline that "What Can RL Bring to VLA Generalization?" (Liu et al., 2025; facts in
../shared/PAPER.md) compares PPO against. Instead of learning a value function, GRPO runs G
environments from the SAME initial state (a "group"): the sampled trajectories differ only
because the policy samples differently, so each trajectory's return, normalised by its
group's mean and std, says how much better it did than the policy's typical attempt. That
advantage is applied to every step of the trajectory, in the same clipped surrogate as PPO on
the joint ratio of the 7 action tokens. Only the LoRA adapters are trained; the agent's value
head exists (the checkpoint format is shared with ppo_vla.py) but is ignored.

    python grpo_vla.py --group-size 8                                 # tiny preset, CPU
    python grpo_vla.py --model-path /weights/openvla-7b --init-checkpoint runs/sft_warmup

Reads top to bottom like ppo_vla.py: set-up, then per iteration
grouped rollout -> group-normalised advantages -> clipped update -> logging -> evaluation ->
checkpoint.
"""

from __future__ import annotations

import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import tyro
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm, trange

from common import (
    CheckpointError,
    Rollout,
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
    exp_name: str = "grpo_vla"
    """name of the run; its directory is OUTPUT_DIR/EXP_NAME (fixed, so --resume finds it)"""
    output_dir: str = "runs"
    """where run directories (TensorBoard logs, checkpoints) are written"""
    seed: int = 0
    """seed of torch, numpy, python and the env's episode draws"""
    device: str = "auto"
    """'auto' (CUDA if available, else CPU), 'cpu', 'cuda' or 'cuda:N'"""
    resume: bool = False
    """continue a killed run from OUTPUT_DIR/EXP_NAME/checkpoint (iteration, optimizer, RNG)"""
    # --- model
    preset: Literal["tiny", "openvla-7b"] = "tiny"
    """model size: 'tiny' (random-init, offline, CPU-friendly) or 'openvla-7b' (needs --model-path)"""
    model_path: str | None = None
    """local directory with the official OpenVLA-7B checkpoint; implies --preset openvla-7b"""
    init_checkpoint: str | None = None
    """start from this checkpoint's adapter (e.g. sft_warmup.py's output); its value head is unused"""
    lora_rank: int = 32
    """LoRA rank on every linear layer (paper: 32)"""
    lora_alpha: int = 16
    """LoRA alpha (paper: 16)"""
    # --- environment
    split: str = "ind"
    """task split to train on ('ind' is the training distribution; 'toy' is the synthetic test task)"""
    num_envs: int = 64
    """parallel environments, NUM_ENVS / GROUP_SIZE groups per iteration (paper: 64)"""
    group_size: int = 8
    """G: environments per group, all started from the same episode id (the paper does not give G)"""
    max_episode_steps: int = 80
    """episode horizon, no early termination (paper: 80); each iteration runs one episode per env"""
    image_size: int | None = None
    """image size of the model and the renderer; default: the preset's (tiny 112, openvla-7b 224)"""
    # --- GRPO (paper defaults where it gives them)
    total_iterations: int = 400
    """GRPO iterations; ~2M env steps are ~400 x 64 envs x 80 steps, as for PPO"""
    temperature: float = 1.0
    """rollout sampling temperature (paper: 1.0); the ratio is computed at the same temperature"""
    learning_rate: float = 1e-4
    """AdamW learning rate of the LoRA adapters (paper: 1e-4)"""
    clip_coef: float = 0.2
    """surrogate clipping epsilon on the joint 7-token ratio (paper: 0.2)"""
    kl_coef: float = 0.0
    """weight of a KL penalty to the base VLA, LoRA off: the initial policy unless --init-checkpoint (paper: 0)"""
    max_grad_norm: float = 10.0
    """global gradient-norm clip (paper: 10)"""
    epochs: int = 1
    """passes over each batch (paper: 1)"""
    minibatch_size: int = 8
    """samples per forward/backward (paper: 8)"""
    grad_accum_steps: int = 20
    """minibatches accumulated per optimizer step (paper: 20, so 160 samples per step)"""
    # --- evaluation, logging, checkpoints
    eval_every: int = 10
    """evaluate every K iterations (and at the end); 0 disables"""
    eval_temperature: float = 0.6
    """sampling temperature for evaluation (paper: 0.6)"""
    eval_episodes: int = 64
    """episodes per evaluation, on the training split"""
    save_every: int = 10
    """write the checkpoint every K iterations (and at the end)"""


def check_args(args: Args) -> None:
    """Reject inconsistent group settings before anything slow is loaded."""
    if args.group_size < 2:
        raise ValueError(f"--group-size must be at least 2 (a group of one has no spread), got {args.group_size}")
    if args.num_envs % args.group_size != 0:
        raise ValueError(f"--num-envs ({args.num_envs}) must be a multiple of --group-size ({args.group_size})")


def grouped_episode_ids(rng: np.random.Generator, num_envs: int, group_size: int) -> np.ndarray:
    """Fresh episode ids, each repeated G times: envs [g*G, (g+1)*G) form group g.  [N] int64"""
    return np.repeat(rng.integers(0, 2**31 - 1, num_envs // group_size), group_size)


def group_relative_advantages(
    returns: torch.Tensor,  # [N], one return per trajectory, groups contiguous as above
    group_size: int,
    min_std: float = 1e-6,
) -> tuple[torch.Tensor, dict[str, float]]:
    """(R - group mean) / group std per trajectory: [N], plus group statistics.

    A group whose returns are all equal says nothing about which samples were better, so its
    advantages are exactly 0. The threshold (not `std == 0`) keeps float noise in summed
    rewards from being blown up into full-size advantages.
    """
    groups = returns.reshape(-1, group_size)  # [N / G, G]
    mean = groups.mean(dim=1, keepdim=True)
    # Population std: every non-degenerate group then has advantages of mean 0 and std 1.
    std = groups.std(dim=1, correction=0, keepdim=True)
    degenerate = std < min_std  # [N / G, 1]
    advantages = torch.where(degenerate, torch.zeros_like(groups), (groups - mean) / std.clamp_min(min_std))
    stats = {
        "group_return_std": std.mean().item(),
        "degenerate_group_fraction": degenerate.float().mean().item(),
    }
    return advantages.flatten(), stats


def clipped_policy_loss(
    new_logprob: torch.Tensor, old_logprob: torch.Tensor, advantages: torch.Tensor, clip_coef: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's clipped surrogate on the joint ratio of the 7 action tokens (one ratio per step)."""
    log_ratio = new_logprob - old_logprob
    ratio = log_ratio.exp()
    surrogate = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip_coef, 1 + clip_coef))
    with torch.no_grad():  # diagnostics: http://joschu.net/blog/kl-approx.html
        stats = {
            "approx_kl": ((ratio - 1) - log_ratio).mean().item(),
            "clipfrac": ((ratio - 1).abs() > clip_coef).float().mean().item(),
        }
    return surrogate.mean(), stats


def kl_to_reference(new_logprob: torch.Tensor, ref_logprob: torch.Tensor) -> torch.Tensor:
    """Per-sample estimate of KL(policy || reference) from samples of the rollout policy.  [B]

    The "k3" estimator of DeepSeekMath's GRPO: r - log r - 1 with r = p_ref / p_new. It is
    never negative, and its gradient (1 - r) * grad log p_new pulls the policy back toward the
    reference; the plain log-ratio's gradient would average to zero on the policy's own samples.
    """
    log_r = ref_logprob - new_logprob
    return log_r.exp() - log_r - 1


def main(args: Args) -> dict[str, float]:
    # ---------------------------------------------------------------- set-up
    check_args(args)
    if args.model_path is not None:
        args.preset = "openvla-7b"
    run_dir = Path(args.output_dir) / args.exp_name
    checkpoint_dir = run_dir / "checkpoint"
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
    # No critic: only the adapters are optimised, so the value head never changes.
    lora_params = list(agent.lora_parameters())
    optimizer = torch.optim.AdamW(lora_params, lr=args.learning_rate, eps=1e-5)
    # Episode ids come from our own generator so that a resumed run draws the same episodes.
    episode_rng = np.random.default_rng(args.seed)
    start_iteration = 0
    if args.resume:
        optimizer.load_state_dict(state["optimizer"])
        restore_rng_state(state["rng"])
        episode_rng.bit_generator.state = state["episode_rng"]
        start_iteration = state["iteration"]

    envs = make_vec_env(args.split, args.num_envs, image_size=agent.image_size, seed=args.seed,
                        max_episode_steps=args.max_episode_steps)
    eval_envs = envs  # evaluation runs between iterations, so the training envs can do it
    writer = SummaryWriter(str(run_dir))
    if start_iteration == 0:
        writer.add_text("args", "\n".join(f"{k}: {v}" for k, v in asdict(args).items()))
    # One whole episode per env per iteration: a group's trajectories must all be complete.
    num_steps = args.max_episode_steps
    batch_size = args.num_envs * num_steps
    global_step = start_iteration * batch_size
    metrics: dict[str, float] = {}

    for iteration in trange(start_iteration, args.total_iterations, desc="GRPO", initial=start_iteration,
                            total=args.total_iterations):
        # ------------------------------------------------------------ grouped rollout
        agent.eval()
        t0 = time.perf_counter()
        rollout: Rollout = collect_rollout(
            agent, envs, num_steps, args.temperature,
            episode_ids_fn=lambda: grouped_episode_ids(episode_rng, args.num_envs, args.group_size),
        )
        rollout_time = time.perf_counter() - t0
        global_step += batch_size

        # ------------------------------------------------------------ advantages
        returns = rollout.rewards.sum(dim=0)  # [N]: undiscounted, the task's reward is sparse
        trajectory_advantages, group_stats = group_relative_advantages(returns, args.group_size)
        advantages = trajectory_advantages.expand(num_steps, args.num_envs)  # [T, N]: same for every step
        # Flatten time and env into one batch axis: b = t * N + n.
        b_images = rollout.images.flatten(0, 1)  # [B, H, W, 3] uint8
        b_instructions = [s for step in rollout.instructions for s in step]
        b_tokens = rollout.tokens.flatten(0, 1)  # [B, 7]
        b_logprobs = rollout.logprobs.flatten()  # [B]
        b_advantages = advantages.flatten()  # [B]

        # ------------------------------------------------------------ update
        agent.train()
        t0 = time.perf_counter()
        stats: dict[str, list[float]] = {k: [] for k in ("policy_loss", "entropy", "approx_kl", "clipfrac", "grad_norm")}
        if args.kl_coef > 0:
            stats["kl_ref"] = []
        minibatches_per_step = 0
        for _epoch in range(args.epochs):
            order = torch.randperm(batch_size)
            for start in range(0, batch_size, args.minibatch_size):
                mb = order[start:start + args.minibatch_size]
                mb_images, mb_instructions, mb_tokens = b_images[mb], [b_instructions[i] for i in mb], b_tokens[mb]
                new_logprob, entropy, _value = agent.evaluate(mb_images, mb_instructions, mb_tokens,
                                                              temperature=args.temperature)
                pg_loss, pg_stats = clipped_policy_loss(new_logprob, b_logprobs[mb].to(new_logprob.device),
                                                        b_advantages[mb].to(new_logprob.device), args.clip_coef)
                loss = pg_loss
                if args.kl_coef > 0:  # the reference is the base VLA: the same forward, LoRA off
                    ref_logprob = agent.reference_logprob(mb_images, mb_instructions, mb_tokens,
                                                          temperature=args.temperature)
                    kl = kl_to_reference(new_logprob, ref_logprob).mean()
                    loss = loss + args.kl_coef * kl
                    stats["kl_ref"].append(kl.item())
                # Scale so that accumulated gradients average over the minibatches of one step.
                (loss / args.grad_accum_steps).backward()
                minibatches_per_step += 1
                if minibatches_per_step == args.grad_accum_steps or start + args.minibatch_size >= batch_size:
                    grad_norm = torch.nn.utils.clip_grad_norm_(lora_params, args.max_grad_norm)
                    stats["grad_norm"].append(grad_norm.item())
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    minibatches_per_step = 0
                for k, v in (("policy_loss", pg_loss.item()), ("entropy", entropy.mean().item()), *pg_stats.items()):
                    stats[k].append(v)
        update_time = time.perf_counter() - t0

        # ------------------------------------------------------------ logging
        metrics = {
            "rollout/success": float(np.mean(rollout.episode_success)),
            "rollout/success_once": float(np.mean(rollout.episode_success_once)),
            "rollout/episodic_return": returns.mean().item(),
            **{f"grpo/{k}": v for k, v in group_stats.items()},
            **{f"losses/{k}": float(np.mean(v)) for k, v in stats.items()},
            "time/env_steps_per_s": batch_size / rollout_time,
            "time/rollout_s": rollout_time,
            "time/update_s": update_time,
            "memory/peak_gb": peak_memory_gb(device),
        }
        for k, v in metrics.items():
            writer.add_scalar(k, v, global_step)

        # ------------------------------------------------------------ evaluation and checkpoint
        last = iteration + 1 == args.total_iterations
        if args.eval_every > 0 and ((iteration + 1) % args.eval_every == 0 or last):
            agent.eval()
            eval_metrics = evaluate_policy(agent, eval_envs, args.eval_episodes, args.eval_temperature,
                                           seed=args.seed + 1)
            for k, v in eval_metrics.items():
                writer.add_scalar(f"eval/{k}", v, global_step)
                metrics[f"eval/{k}"] = v
            tqdm.write(f"iteration {iteration + 1}: eval success {eval_metrics['success']:.3f}")
        if (iteration + 1) % args.save_every == 0 or last:
            save_checkpoint(checkpoint_dir, agent, state={
                "optimizer": optimizer.state_dict(), "iteration": iteration + 1, "rng": rng_state(),
                "episode_rng": episode_rng.bit_generator.state,
                "args": asdict(args), "algorithm": "grpo",
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
