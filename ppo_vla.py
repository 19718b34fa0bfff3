"""PPO fine-tuning of a Vision-Language-Action model with a shared actor-critic.

The recipe of "What Can RL Bring to VLA Generalization?" (Liu et al., 2025; facts in
../shared/PAPER.md): the VLA itself is the actor, its 7 action tokens form ONE action whose
log-probability is the sum of the 7 token log-probs, and a small value head reads h0, the
hidden state that predicts the first action token, so actor and critic share one backbone.
LoRA adapters and the value head are the only trained weights.

    python ppo_vla.py --epochs 1 --temperature 1.0                    # tiny preset, CPU
    python ppo_vla.py --model-path /weights/openvla-7b --init-checkpoint runs/sft_warmup

Reads top to bottom like CleanRL's ppo_continuous_action.py: set-up, then per iteration
rollout -> GAE -> clipped update -> logging -> evaluation -> checkpoint.
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
import torch.nn.functional as F
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
    exp_name: str = "ppo_vla"
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
    """start from this checkpoint's adapter and value head (e.g. sft_warmup.py's output)"""
    critic: Literal["h0", "last", "concat", "separate"] = "h0"
    """value-head input: h0 (paper's choice), last action position, all 7 positions, or a separate backbone"""
    lora_rank: int = 32
    """LoRA rank on every linear layer (paper: 32)"""
    lora_alpha: int = 16
    """LoRA alpha (paper: 16)"""
    # --- environment
    split: str = "ind"
    """task split to train on ('ind' is the training distribution; 'toy' is the synthetic test task)"""
    num_envs: int = 64
    """parallel environments (paper: 64)"""
    num_steps: int = 80
    """steps per env per iteration (paper: 80, one full episode)"""
    max_episode_steps: int = 80
    """episode horizon, no early termination (paper: 80)"""
    image_size: int | None = None
    """image size of the model and the renderer; default: the preset's (tiny 112, openvla-7b 224)"""
    # --- PPO (paper defaults)
    total_iterations: int = 400
    """PPO iterations; the paper's ~2M env steps are ~400 x 64 envs x 80 steps"""
    temperature: float = 1.0
    """rollout sampling temperature (paper: 1.0; above 1.5 training diverges)"""
    learning_rate: float = 1e-4
    """AdamW learning rate of the LoRA adapters (paper: 1e-4)"""
    value_learning_rate: float = 3e-3
    """AdamW learning rate of the value head (paper: 3e-3)"""
    gamma: float = 0.99
    """discount factor"""
    gae_lambda: float = 0.95
    """GAE lambda"""
    norm_adv: bool = True
    """normalise advantages over the whole batch"""
    clip_coef: float = 0.2
    """surrogate clipping epsilon on the joint 7-token ratio"""
    vf_clip_coef: float = 0.2
    """value clipping range around the rollout's value estimate"""
    huber_delta: float = 10.0
    """delta of the Huber value loss"""
    vf_coef: float = 1.0
    """value loss coefficient"""
    ent_coef: float = 0.0
    """entropy bonus coefficient (paper: 0; entropy is logged anyway)"""
    max_grad_norm: float = 10.0
    """global gradient-norm clip"""
    epochs: int = 1
    """passes over each batch (paper: 1; more gave no gain, only wall-clock)"""
    minibatch_size: int = 8
    """samples per forward/backward (paper: 8)"""
    grad_accum_steps: int = 20
    """minibatches accumulated per optimizer step (paper: 20, so 160 samples per step)"""
    target_kl: float | None = None
    """stop this iteration's update at the first minibatch whose approximate KL to the rollout
    policy exceeds this (off by default, as in the paper)"""
    # --- evaluation, logging, checkpoints
    eval_every: int = 10
    """evaluate every K iterations (and at the end); 0 disables"""
    eval_temperature: float = 0.6
    """sampling temperature for evaluation (paper: 0.6)"""
    eval_episodes: int = 64
    """episodes per evaluation, on the training split"""
    save_every: int = 10
    """write the checkpoint every K iterations (and at the end)"""


def compute_gae(
    rewards: torch.Tensor,  # [T, N]
    values: torch.Tensor,  # [T, N]
    dones: torch.Tensor,  # [T, N], True where the episode ended after step t
    next_value: torch.Tensor,  # [N], value of the observation after the last step
    gamma: float,
    gae_lambda: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation; returns (advantages, returns), both [T, N]."""
    advantages = torch.zeros_like(rewards)
    last_gae = torch.zeros_like(next_value)
    for t in reversed(range(rewards.shape[0])):
        next_values = next_value if t == rewards.shape[0] - 1 else values[t + 1]
        not_done = 1.0 - dones[t].float()  # an ended episode does not bootstrap from the next one
        delta = rewards[t] + gamma * next_values * not_done - values[t]
        last_gae = delta + gamma * gae_lambda * not_done * last_gae
        advantages[t] = last_gae
    return advantages, advantages + values


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


def clipped_value_loss(
    new_value: torch.Tensor, old_value: torch.Tensor, returns: torch.Tensor, clip: float, huber_delta: float
) -> torch.Tensor:
    """Huber value loss, pessimistic over the raw and the clipped value (as PPO2 clips values)."""
    clipped = old_value + (new_value - old_value).clamp(-clip, clip)
    loss_raw = F.huber_loss(new_value, returns, delta=huber_delta, reduction="none")
    loss_clipped = F.huber_loss(clipped, returns, delta=huber_delta, reduction="none")
    return torch.max(loss_raw, loss_clipped).mean()


def explained_variance(values: torch.Tensor, returns: torch.Tensor) -> float:
    """1 - Var(returns - values) / Var(returns): 1 is a perfect critic, <= 0 a useless one."""
    var_returns = returns.var()
    return float("nan") if var_returns == 0 else (1 - (returns - values).var() / var_returns).item()


def mean_or_nan(x: np.ndarray) -> float:
    return float(np.mean(x)) if len(x) else float("nan")


def main(args: Args) -> dict[str, float]:
    # ---------------------------------------------------------------- set-up
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
        agent = build_agent(args.preset, args.model_path, critic=args.critic, lora_rank=args.lora_rank,
                            lora_alpha=args.lora_alpha, image_size=args.image_size, device=device, seed=args.seed)
        state = {}
    # Two learning rates: the paper's value head learns 30x faster than the adapters.
    optimizer = torch.optim.AdamW(
        [{"params": agent.lora_parameters(), "lr": args.learning_rate},
         {"params": agent.value_head_parameters(), "lr": args.value_learning_rate}],
        eps=1e-5,
    )
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
    batch_size = args.num_envs * args.num_steps
    global_step = start_iteration * batch_size
    metrics: dict[str, float] = {}

    for iteration in trange(start_iteration, args.total_iterations, desc="PPO", initial=start_iteration,
                            total=args.total_iterations):
        # ------------------------------------------------------------ rollout
        agent.eval()
        t0 = time.perf_counter()
        rollout: Rollout = collect_rollout(agent, envs, args.num_steps, args.temperature,
                                            episode_ids_fn=lambda: episode_rng.integers(0, 2**31 - 1, args.num_envs))
        rollout_time = time.perf_counter() - t0
        global_step += batch_size

        # ------------------------------------------------------------ advantages
        advantages, returns = compute_gae(rollout.rewards, rollout.values, rollout.dones,
                                          rollout.next_value, args.gamma, args.gae_lambda)
        # Flatten time and env into one batch axis: b = t * N + n.
        b_images = rollout.images.flatten(0, 1)  # [B, H, W, 3] uint8
        b_instructions = [s for step in rollout.instructions for s in step]
        b_tokens = rollout.tokens.flatten(0, 1)  # [B, 7]
        b_logprobs = rollout.logprobs.flatten()
        b_values = rollout.values.flatten()
        b_advantages = advantages.flatten()
        b_returns = returns.flatten()
        if args.norm_adv:
            b_advantages = (b_advantages - b_advantages.mean()) / (b_advantages.std() + 1e-8)

        # ------------------------------------------------------------ update
        agent.train()
        t0 = time.perf_counter()
        stats: dict[str, list[float]] = {k: [] for k in ("policy_loss", "value_loss", "entropy", "approx_kl", "clipfrac", "grad_norm")}
        minibatches_per_step, stop_early = 0, False
        for _epoch in range(args.epochs):
            order = torch.randperm(batch_size)
            for start in range(0, batch_size, args.minibatch_size):
                mb = order[start:start + args.minibatch_size]
                new_logprob, entropy, new_value = agent.evaluate(
                    b_images[mb], [b_instructions[i] for i in mb], b_tokens[mb], temperature=args.temperature
                )
                mb_adv = b_advantages[mb].to(new_logprob.device)
                pg_loss, pg_stats = clipped_policy_loss(new_logprob, b_logprobs[mb].to(new_logprob.device),
                                                        mb_adv, args.clip_coef)
                v_loss = clipped_value_loss(new_value, b_values[mb].to(new_value.device),
                                            b_returns[mb].to(new_value.device), args.vf_clip_coef, args.huber_delta)
                if args.target_kl is not None and pg_stats["approx_kl"] > args.target_kl:
                    # The policy already moved too far from the one that collected the data.
                    optimizer.zero_grad(set_to_none=True)
                    stop_early = True
                    break
                loss = pg_loss - args.ent_coef * entropy.mean() + args.vf_coef * v_loss
                # Scale so that accumulated gradients average over the minibatches of one step.
                (loss / args.grad_accum_steps).backward()
                minibatches_per_step += 1
                if minibatches_per_step == args.grad_accum_steps or start + args.minibatch_size >= batch_size:
                    grad_norm = torch.nn.utils.clip_grad_norm_(agent.trainable_parameters(), args.max_grad_norm)
                    stats["grad_norm"].append(grad_norm.item())
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    minibatches_per_step = 0
                for k, v in (("policy_loss", pg_loss.item()), ("value_loss", v_loss.item()),
                             ("entropy", entropy.mean().item()), *pg_stats.items()):
                    stats[k].append(v)
            if stop_early:
                break
        update_time = time.perf_counter() - t0

        # ------------------------------------------------------------ logging
        metrics = {
            # nan when no episode ended in this rollout (num_steps < max_episode_steps)
            "rollout/success": mean_or_nan(rollout.episode_success),
            "rollout/success_once": mean_or_nan(rollout.episode_success_once),
            "rollout/episodic_return": mean_or_nan(rollout.episode_returns),
            **{f"losses/{k}": float(np.mean(v)) for k, v in stats.items()},
            "losses/explained_variance": explained_variance(b_values, b_returns),
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
            eval_metrics = evaluate_policy(agent, eval_envs, args.eval_episodes, args.eval_temperature, seed=args.seed + 1)
            for k, v in eval_metrics.items():
                writer.add_scalar(f"eval/{k}", v, global_step)
                metrics[f"eval/{k}"] = v
            tqdm.write(f"iteration {iteration + 1}: eval success {eval_metrics['success']:.3f}")
        if (iteration + 1) % args.save_every == 0 or last:
            save_checkpoint(checkpoint_dir, agent, state={
                "optimizer": optimizer.state_dict(), "iteration": iteration + 1, "rng": rng_state(),
                "episode_rng": episode_rng.bit_generator.state,
                "args": asdict(args), "algorithm": "ppo",
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
