"""GRPO fine-tuning of a Vision-Language-Action model: PPO's clipped objective without a critic.

The baseline that "What Can RL Bring to VLA Generalization?" (arXiv 2505.19789, section 4.2;
docs/PAPER_NOTES.md) compares PPO against. Instead of learning a value function, GRPO runs G
environments from the SAME initial state (a "group"): the sampled trajectories differ only
because the policy samples differently, so each trajectory's return, normalised by its
group's mean and std, says how much better it did than the policy's typical attempt. That
advantage is applied to every step of the trajectory, in the same clipped surrogate as PPO on
the joint ratio of the 7 action tokens. Only the LoRA adapters are trained; there is no value
head. An optional KL penalty (--kl-coef) anchors the policy to the one the run started from.

    python grpo_vla.py --group-size 8                                  # paper defaults, tiny model
    python grpo_vla.py twin --init-checkpoint runs/sft_warmup/checkpoint  # the README's twin run
    python grpo_vla.py --model-path /weights/openvla-7b --init-checkpoint runs/sft_warmup/checkpoint

Reads top to bottom like ppo_vla.py: set-up, then per iteration
grouped rollout -> group-normalised advantages -> clipped update -> logging -> evaluation ->
checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

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
    exp_name: str = "grpo_vla"
    """name of the run; its directory is OUTPUT_DIR/EXP_NAME (fixed, so --resume finds it)"""
    output_dir: str = "runs"
    """where run directories (TensorBoard logs, checkpoints) are written"""
    seed: int = 0
    """seed of torch, numpy, python and the episode draws"""
    device: str = "auto"
    """'auto' (CUDA if available, else CPU), 'cpu', 'cuda' or 'cuda:N'"""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """weights' dtype: auto = bf16 on CUDA, fp32 on the CPU (bf16 on the CPU: inspection runs)"""
    resume: bool = False
    """continue a killed run from OUTPUT_DIR/EXP_NAME/checkpoint (iteration, optimizer, RNG)"""
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
    """start from this checkpoint's adapter (e.g. sft_warmup.py's); a value head in it is unused"""
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
    """parallel environments per rank, NUM_ENVS / GROUP_SIZE groups (paper: 64)"""
    group_size: int = 8
    """G: environments per group, all started from the same episode id (not given in the paper)"""
    max_episode_steps: int | None = None
    """episode horizon, no early termination; default the env's (ManiSkill 80, twin 30).
    Each iteration plays one whole episode per env"""
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
    """weight of a KL penalty to the policy the run started from (paper: 0)"""
    max_grad_norm: float = 10.0
    """global gradient-norm clip (paper: 10)"""
    epochs: int = 1
    """passes over each batch (paper: 1)"""
    minibatch_size: int = 8
    """samples per forward/backward (paper: 8); a memory knob, with grad_accum_steps it sets the step"""
    grad_accum_steps: int = 20
    """minibatches per optimizer step (paper: 20): 160 samples per step over ALL ranks, on any number"""
    # --- evaluation, logging, checkpoints
    eval_every: int = 10
    """evaluate every K iterations (and at the end); 0 disables"""
    eval_temperature: float = 0.6
    """sampling temperature for evaluation (paper: 0.6)"""
    eval_episodes: int = 64
    """episodes per evaluation, on the training split"""
    save_every: int = 10
    """write the checkpoint every K iterations (and at the end)"""


RECIPES = {
    "twin": ("GRPO from an SFT warm-up on the 2D twin, as in the README (needs --init-checkpoint)",
             Args(exp_name="grpo_twin", env="twin", num_envs=64, group_size=8, total_iterations=16,
                  # lr 3e-4 as PPO's recipe: at 1e-3 GRPO from the current base fell 66% -> 17% in 16 iterations
                  # 128 samples per optimizer step over all ranks (the demo's 2 ranks: 64 each)
                  learning_rate=3e-4, kl_coef=0.1, minibatch_size=64, grad_accum_steps=2,
                  eval_every=8, eval_episodes=128, save_every=4)),
}


def check_args(args: Args) -> None:
    """Every value that would fail later (or silently do something else), rejected now."""
    check_model_args(args)
    require_positive(args, "num_envs", "max_episode_steps", "total_iterations", "epochs",
                     "minibatch_size", "grad_accum_steps", "save_every", "eval_episodes")
    require_non_negative(args, "eval_every", "eval_temperature", "kl_coef", "clip_coef")
    require_finite_positive(args, "temperature", "learning_rate", "max_grad_norm")
    if args.group_size < 2:
        raise ValueError(f"--group-size must be at least 2 (a group of one has no spread), got {args.group_size}")
    if args.num_envs % args.group_size != 0:
        raise ValueError(f"--num-envs ({args.num_envs}) must be a multiple of --group-size ({args.group_size})")


if __name__ == "__main__":
    ARGS = parse_cli(Args, check_args, RECIPES)  # before the heavy imports: --help answers at once

import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from common import (
    ActorCritic,
    EpisodeLoop,
    all_reduce_gradients,
    build_agent,
    check_finite,
    check_init_checkpoint,
    close_writer,
    evaluate_during_training,
    evaluation_episode_ids,
    global_mean,
    init_distributed,
    iteration_metrics,
    load_checkpoint,
    log_scalars,
    make_writer,
    rank_share_of_step,
    rank_slice,
    resolve_dtype,
    restore_rng_state,
    resume_flags,
    run_script,
    save_run,
    seed_everything,
    show_progress,
)
from envs import make_vec_env
from tasks import MAX_EPISODE_ID


def grouped_episode_ids(rng: np.random.Generator, num_envs: int, group_size: int) -> np.ndarray:
    """Fresh episode ids, each repeated G times: envs [g*G, (g+1)*G) form group g.  [N] int64"""
    return np.repeat(rng.integers(0, MAX_EPISODE_ID, num_envs // group_size), group_size)


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


def joint_logprob_and_entropy(logits: torch.Tensor, index: torch.Tensor,
                              temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, 7, 256] of the 7 action tokens, the taken tokens' indices [B, 7] -> the
    action's log-prob [B] (the sum of its 7 tokens': one joint ratio per env step) and entropy
    [B], under softmax(logits / T) as sampled (float64: as act() computes the rollout's)."""
    token_dist = torch.distributions.Categorical(logits=logits.double() / temperature, validate_args=False)
    return token_dist.log_prob(index).sum(-1).float(), token_dist.entropy().sum(-1).float()


def clipped_policy_loss(new_logprob: torch.Tensor, old_logprob: torch.Tensor, advantages: torch.Tensor,
                        clip_coef: float) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's clipped surrogate, which GRPO keeps: -min(r A, clip(r, 1 - eps, 1 + eps) A) on the
    joint ratio r = pi_new(a|s) / pi_old(a|s) of the 7 action tokens; all [B]."""
    log_ratio = new_logprob - old_logprob
    ratio = log_ratio.exp()
    surrogate = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip_coef, 1 + clip_coef))
    with torch.no_grad():  # diagnostics: http://joschu.net/blog/kl-approx.html
        stats = {"approx_kl": ((ratio - 1) - log_ratio).mean().item(),
                 "clipfrac": ((ratio - 1).abs() > clip_coef).float().mean().item()}
    return surrogate.mean(), stats


def kl_to_reference(new_logprob: torch.Tensor, ref_logprob: torch.Tensor) -> torch.Tensor:
    """Per-sample estimate of KL(policy || reference) from samples of the rollout policy.  [B]

    The "k3" estimator of DeepSeekMath's GRPO: r - log r - 1 with r = p_ref / p_new. It is
    never negative, and its gradient (1 - r) * grad log p_new pulls the policy back toward the
    reference; the plain log-ratio's gradient would average to zero on the policy's own samples.
    """
    log_r = ref_logprob - new_logprob
    return log_r.exp() - log_r - 1


def minibatches(size: int, rank_share: int, minibatch_size: int, epochs: int):
    """The update's schedule on one rank (as PPO's): `epochs` shuffled passes over its samples,
    rank_share per optimizer step (minibatch_size x grad_accum_steps over ALL ranks), in passes
    of <= minibatch_size. Yields (indices, the pass's share of its step, take the step now?)."""
    for _epoch in range(epochs):
        order = torch.randperm(size)
        for start in range(0, size, rank_share):
            step_samples = order[start:start + rank_share]
            parts = step_samples.split(minibatch_size)
            for k, part in enumerate(parts):
                yield part, len(part) / len(step_samples), k == len(parts) - 1


def grpo_update(agent, optimizer: torch.optim.Optimizer, batch: dict, args: Args, rank_share: int,
                where: str) -> dict[str, list[float]]:
    """One GRPO update over this rank's flat batch: the clipped surrogate with trajectory
    advantages, plus kl_coef x KL to the reference; each optimizer step averages the gradient of
    minibatch_size x grad_accum_steps samples over all ranks (rank_share of them here)."""
    stats: dict[str, list[float]] = {k: [] for k in ("policy_loss", "entropy", "approx_kl", "clipfrac",
                                                     "grad_norm", "kl_ref")}
    for mb, weight, step in minibatches(len(batch["logprobs"]), rank_share, args.minibatch_size, args.epochs):
        images, instructions, tokens = batch["images"][mb], [batch["instructions"][i] for i in mb], batch["tokens"][mb]
        logits, index, _ = agent.teacher_forced(images, instructions, tokens)  # [B, 7, 256], [B, 7]
        new_logprob, entropy = joint_logprob_and_entropy(logits, index, args.temperature)
        device = new_logprob.device
        pg_loss, pg_stats = clipped_policy_loss(new_logprob, batch["logprobs"][mb].to(device),
                                                batch["advantages"][mb].to(device), args.clip_coef)
        loss = pg_loss
        if args.kl_coef > 0:  # the same forward with the starting adapters swapped in
            ref_logprob = agent.reference_logprob(images, instructions, tokens, temperature=args.temperature)
            kl = kl_to_reference(new_logprob, ref_logprob.to(device)).mean()
            loss = loss + args.kl_coef * kl
            stats["kl_ref"].append(kl.item())
        check_finite(where, policy_loss=loss)
        # Weighted by the minibatch's share: the accumulated gradient is the step's mean.
        (loss * weight).backward()
        if step:  # the gradient of this step's samples over all ranks: average, clip, step
            params = agent.lora_parameters()
            all_reduce_gradients(params)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            check_finite(where, grad_norm=grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            stats["grad_norm"].append(grad_norm.item())
        for k, v in (("policy_loss", pg_loss.item()), ("entropy", entropy.mean().item()), *pg_stats.items()):
            stats[k].append(v)
    return stats


def init_agent(args: Args, device: torch.device) -> tuple[Args, ActorCritic, dict]:
    """How the run starts, as nanoGPT's init_from -> (the flags it runs with, agent, trainer
    state). A flag that contradicts a checkpoint is a one-line error, before anything loads."""
    dtype = resolve_dtype(args.dtype, device)
    if args.resume:  # this run's own checkpoint, continued: adapter, optimizer, RNG, KL anchor
        checkpoint = Path(args.output_dir) / args.exp_name / "checkpoint"
        args = Args(**resume_flags(checkpoint, "grpo", vars(args)))  # not given: the run's own
        agent, state = load_checkpoint(checkpoint, device, args.model_path, args.unnorm_key,
                                       critic=None, dtype=dtype, seed=args.seed)
        return args, agent, state
    if args.init_checkpoint is not None:  # another run's adapter (the SFT warm-up's), a new run
        check_init_checkpoint(args.init_checkpoint, args.lora_rank, args.lora_alpha, args.image_size)
        # GRPO has no critic: a value head in the checkpoint (e.g. PPO's) is dropped.
        agent, _ = load_checkpoint(args.init_checkpoint, device, args.model_path, args.unnorm_key,
                                   critic=None, dtype=dtype, seed=args.seed)
        return args, agent, {}
    # New LoRA adapters on the base model (paper: rank 32, alpha 16), no value head.
    return args, build_agent(args.model_path, critic=None, lora_rank=args.lora_rank,
                             lora_alpha=args.lora_alpha, image_size=args.image_size, device=device,
                             seed=args.seed, unnorm_key=args.unnorm_key, dtype=dtype), {}


def main(args: Args) -> dict[str, float]:
    # ---------------------------------------------------------------- set-up
    rank, world, device = init_distributed(args.device)
    seed_everything(args.seed + rank)  # each rank samples its own actions
    rank_share = rank_share_of_step(args.minibatch_size, args.grad_accum_steps, world)
    args, agent, state = init_agent(args, device)
    run_path = Path(args.output_dir) / args.exp_name
    optimizer = torch.optim.AdamW(agent.lora_parameters(), lr=args.learning_rate, eps=1e-5)
    # Episode ids: one generator, the same on every rank; each rank plays its slice of whole groups.
    episode_rng = np.random.default_rng(args.seed)
    start_iteration = 0
    if args.resume:
        optimizer.load_state_dict(state["optimizer"])  # this restores the run's learning rate too:
        optimizer.param_groups[0]["lr"] = args.learning_rate  # the flag's (resume_flags printed any change)
        restore_rng_state(state["rng"], rank, world)
        episode_rng.bit_generator.state = state["episode_rng"]
        start_iteration = state["iteration"]
    # The KL anchor is the policy this run started from (--init-checkpoint's, or the base).
    agent.freeze_reference(state.get("reference_lora"))

    envs = make_vec_env(args.split, args.num_envs, image_size=agent.image_size, seed=args.seed + rank,
                        max_episode_steps=args.max_episode_steps, env=args.env, render_device=str(device))
    loop = EpisodeLoop(envs, lambda: rank_slice(grouped_episode_ids(episode_rng, args.num_envs * world,
                                                                    args.group_size)))
    num_steps = envs.max_episode_steps  # one whole episode per env: a group's returns are complete
    batch_size = args.num_envs * num_steps * world
    writer = make_writer(run_path, vars(args), start_iteration * batch_size, args.track,  # None on ranks > 0
                         args.wandb_project_name, args.wandb_entity)
    eval_ids = rank_slice(evaluation_episode_ids(args.seed + 1, args.split, args.eval_episodes))  # fixed
    videos = run_path / "videos" if args.capture_video else None
    global_step = start_iteration * batch_size
    bar = tqdm(range(start_iteration, args.total_iterations), desc="GRPO", initial=start_iteration,
               total=args.total_iterations, disable=rank > 0)
    metrics: dict[str, float] = {}
    if args.eval_every > 0 and start_iteration == 0:  # the start, that every later evaluation compares with
        metrics = evaluate_during_training(agent, envs, eval_ids, args.eval_temperature, "iteration 0", loop, videos)
        log_scalars(writer, metrics, 0)

    for iteration in bar:
        # ------------------------------------------------------------ grouped rollout
        agent.eval()
        t0 = time.perf_counter()
        rollout = loop.run(agent.as_policy(args.temperature, f"iteration {iteration + 1}"), num_steps)
        rollout_time = time.perf_counter() - t0
        global_step += batch_size

        # ------------------------------------------------------------ advantages
        returns = rollout.rewards.sum(dim=0)  # [N]: undiscounted, the task's reward is sparse
        trajectory_advantages, group_stats = group_relative_advantages(returns, args.group_size)
        advantages = trajectory_advantages.expand(num_steps, args.num_envs)  # [T, N]: same for every step
        batch = {"images": rollout.flat("images"), "instructions": rollout.flat("instructions"),
                 "tokens": rollout.flat("tokens"), "logprobs": rollout.flat("logprobs"),
                 "advantages": advantages.flatten()}

        # ------------------------------------------------------------ update
        agent.train()
        t0 = time.perf_counter()
        stats = grpo_update(agent, optimizer, batch, args, rank_share, f"iteration {iteration + 1}")
        update_time = time.perf_counter() - t0

        # ------------------------------------------------------------ logging, evaluation, checkpoint
        metrics = {
            **iteration_metrics(rollout, batch_size, rollout_time, update_time, device),
            **{f"grpo/{k}": global_mean([v]) for k, v in group_stats.items()},
            **{f"losses/{k}": global_mean(np.array(v)) for k, v in stats.items() if v},
        }
        last = iteration + 1 == args.total_iterations
        if args.eval_every > 0 and ((iteration + 1) % args.eval_every == 0 or last):
            metrics.update(evaluate_during_training(agent, envs, eval_ids, args.eval_temperature,
                                                    f"iteration {iteration + 1}", loop, videos))
        show_progress(bar, metrics)
        log_scalars(writer, metrics, global_step)
        if (iteration + 1) % args.save_every == 0 or last:
            save_run(run_path / "checkpoint", agent, {"iteration": iteration + 1, "optimizer": optimizer.state_dict(),
                     "episode_rng": episode_rng.bit_generator.state, "reference_lora": agent.reference_lora,
                     "algorithm": "grpo"}, vars(args))

    envs.close()
    close_writer(writer)
    return metrics


if __name__ == "__main__":
    run_script(main, ARGS, "grpo", Path(ARGS.output_dir) / ARGS.exp_name)
