"""PPO fine-tuning of a Vision-Language-Action model with a shared actor-critic.

The recipe of "What Can RL Bring to VLA Generalization?" (Liu et al., NeurIPS 2025,
arXiv 2505.19789, section 4; docs/PAPER_NOTES.md): the VLA is the actor, its 7 action tokens
ONE action whose log-prob is the sum of theirs, and a value head reads h0 (the hidden state that
predicts the first action token), so actor and critic share one backbone. LoRA adapters and the
value head are the only trained weights.

    python ppo_vla.py --epochs 1 --temperature 1.0   # no GPU: the `laptop` recipe (~4 min); a GPU: the paper's
    python ppo_vla.py --model-path /weights/openvla-7b --init-checkpoint runs/sft_warmup/checkpoint
    python ppo_vla.py twin --init-checkpoint runs/sft_warmup_twin/checkpoint   # make demo's PPO
    torchrun --nproc_per_node 4 ppo_vla.py ...       # 4 GPUs (or CPU ranks)

Reads top to bottom like CleanRL's ppo_continuous_action.py: set-up (init_agent: how the run
starts), then per iteration rollout -> GAE -> clipped update -> logging -> evaluation -> checkpoint.
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
from tasks import PRETRAINED_TWIN


@dataclass
class Args:
    # --- experiment
    exp_name: str = "ppo_vla"
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
    """start from this checkpoint's adapter (e.g. sft_warmup.py's) and value head, if any"""
    critic: Literal["h0", "last", "concat", "separate"] | None = None
    """value-head input: h0 (paper), last action position, all 7, or a separate backbone;
    default h0, or --init-checkpoint's / the run's own"""
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
    """parallel environments per rank (paper: 64)"""
    num_steps: int = 80
    """steps per env per iteration (paper: 80); episodes continue across iterations"""
    max_episode_steps: int | None = None
    """episode horizon, no early termination; default the env's (ManiSkill 80, twin 30)"""
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
    """normalise advantages over the whole (global) batch"""
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
    """samples per forward/backward (paper: 8); a memory knob, with grad_accum_steps it sets the step"""
    grad_accum_steps: int = 20
    """minibatches per optimizer step (paper: 20): 160 samples per step over ALL ranks, on any number"""
    target_kl: float | None = None
    """stop an iteration's update once a minibatch's approx KL exceeds this (off, as the paper)"""
    # --- evaluation, logging, checkpoints
    eval_every: int = 10
    """evaluate every K iterations (and at the end); 0 disables"""
    eval_temperature: float = 0.6
    """sampling temperature for evaluation (paper: 0.6)"""
    eval_episodes: int = 64
    """episodes per evaluation, on the training split"""
    save_every: int = 10
    """write the checkpoint every K iterations (and at the end)"""
    keep_checkpoints: bool = False
    """also keep every checkpoint written, as RUN/snapshots/iteration_N (OOD success along training)"""


RECIPES = {
    "laptop": ("PPO on the 2D twin from the shipped pretrained tiny VLA, learning within minutes on a CPU; "
               "the default where no GPU is found",
               Args(exp_name="ppo_laptop", env="twin", model_path=PRETRAINED_TWIN, num_envs=64, num_steps=30,
                    total_iterations=12, learning_rate=1e-3, minibatch_size=64, grad_accum_steps=2,
                    eval_every=3, eval_episodes=128, save_every=3)),
    "twin": ("PPO from an SFT warm-up on the 2D twin, as in the README (needs --init-checkpoint)",
             Args(exp_name="ppo_twin", env="twin", num_envs=64, num_steps=30, total_iterations=16,
                  # 128 samples per optimizer step over all ranks (the demo's 2 ranks: 64 each)
                  learning_rate=3e-4, minibatch_size=64, grad_accum_steps=2, eval_every=8,
                  eval_episodes=128, save_every=4)),
}


def check_args(args: Args) -> None:
    """Every value that would fail later (or silently do something else), rejected now."""
    check_model_args(args)
    require_positive(args, "num_envs", "num_steps", "max_episode_steps", "total_iterations",
                     "epochs", "minibatch_size", "grad_accum_steps", "save_every", "eval_episodes")
    require_non_negative(args, "eval_every", "eval_temperature", "ent_coef", "vf_coef", "clip_coef",
                         "vf_clip_coef")
    # Temperature 0 would be greedy: its log-probs are not those of the actions' distribution.
    require_finite_positive(args, "temperature", "learning_rate", "value_learning_rate",
                            "max_grad_norm", "huber_delta", "target_kl")
    for name in ("gamma", "gae_lambda"):
        if not 0 <= getattr(args, name) <= 1:
            raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(args, name)}")


if __name__ == "__main__":
    ARGS = parse_cli(Args, check_args, RECIPES, no_gpu_recipe="laptop")  # before the heavy imports: fast --help

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import (
    ActorCritic,
    EpisodeLoop,
    Rollout,
    all_reduce_gradients,
    build_agent,
    check_finite,
    check_init_checkpoint,
    close_writer,
    evaluate_during_training,
    evaluation_episode_ids,
    global_mean,
    global_mean_std,
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


def compute_gae(
    rewards: torch.Tensor,  # [T, N]
    values: torch.Tensor,  # [T, N]
    dones: torch.Tensor,  # [T, N], True where the episode ended after step t
    next_value: torch.Tensor,  # [N], value of the observation after the last step
    gamma: float,
    gae_lambda: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation -> (advantages, returns), both [T, N]. A rollout cut
    mid-episode bootstraps from next_value; an ended episode does not (success is judged at the
    horizon's last step)."""
    advantages = torch.zeros_like(rewards)
    last_gae = torch.zeros_like(next_value)
    for t in reversed(range(rewards.shape[0])):
        next_values = next_value if t == rewards.shape[0] - 1 else values[t + 1]
        not_done = 1.0 - dones[t].float()
        delta = rewards[t] + gamma * next_values * not_done - values[t]
        last_gae = delta + gamma * gae_lambda * not_done * last_gae
        advantages[t] = last_gae
    return advantages, advantages + values


def bootstrap_value(agent: ActorCritic, rollout: Rollout, temperature: float) -> torch.Tensor:
    """V(observation after the last step) [N]; 0 when the last step ended the episodes."""
    if rollout.last_obs is None:
        return torch.zeros(rollout.rewards.shape[1])
    return agent.act(rollout.last_obs["image"], rollout.last_obs["instruction"], temperature).value


def joint_logprob_and_entropy(logits: torch.Tensor, index: torch.Tensor,
                              temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, 7, 256] of the 7 action tokens, the taken tokens' indices [B, 7] -> the action's
    log-prob [B] and entropy [B]: one action is 7 tokens, its log-prob the sum of theirs (one
    joint ratio per env step, as the paper), under softmax(logits / T), what the rollout sampled
    from. float64: fp32 rounding alone is ~4e-6 of the ratio's 1e-5 agreement with the rollout."""
    token_dist = torch.distributions.Categorical(logits=logits.double() / temperature, validate_args=False)
    return token_dist.log_prob(index).sum(-1).float(), token_dist.entropy().sum(-1).float()


def clipped_policy_loss(new_logprob: torch.Tensor, old_logprob: torch.Tensor, advantages: torch.Tensor,
                        clip_coef: float) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's clipped surrogate, -min(r A, clip(r, 1 - eps, 1 + eps) A), on the joint ratio
    r = pi_new(a|s) / pi_old(a|s) of the 7 action tokens; all [B]."""
    log_ratio = new_logprob - old_logprob
    ratio = log_ratio.exp()
    surrogate = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip_coef, 1 + clip_coef))
    with torch.no_grad():  # diagnostics: http://joschu.net/blog/kl-approx.html
        stats = {"approx_kl": ((ratio - 1) - log_ratio).mean().item(),
                 "clipfrac": ((ratio - 1).abs() > clip_coef).float().mean().item()}
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


def minibatches(size: int, rank_share: int, minibatch_size: int, epochs: int):
    """`epochs` shuffled passes over this rank's `size` samples, rank_share per optimizer step, in
    forward/backward passes of <= minibatch_size -> (indices, the pass's share of its step, step
    after this pass?)."""
    for _epoch in range(epochs):
        order = torch.randperm(size)
        for start in range(0, size, rank_share):
            step_samples = order[start:start + rank_share]
            parts = step_samples.split(minibatch_size)
            for k, part in enumerate(parts):
                yield part, len(part) / len(step_samples), k == len(parts) - 1


def ppo_update(agent: ActorCritic, optimizer: torch.optim.Optimizer, batch: dict, args: Args,
               rank_share: int, train_policy: bool, where: str) -> dict[str, list[float]]:
    """One PPO update over this rank's flat batch (b = t * N + n); each optimizer step averages the
    gradient over all ranks. train_policy False: the value loss only (no reward signal)."""
    stats: dict[str, list[float]] = {k: [] for k in ("policy_loss", "value_loss", "entropy", "approx_kl",
                                                     "clipfrac", "grad_norm")}
    for mb, weight, step in minibatches(len(batch["logprobs"]), rank_share, args.minibatch_size, args.epochs):
        logits, index, new_value = agent.teacher_forced(  # [B, 7, 256], [B, 7], V(s) [B]
            batch["images"][mb], [batch["instructions"][i] for i in mb], batch["tokens"][mb])
        new_logprob, entropy = joint_logprob_and_entropy(logits, index, args.temperature)
        device = new_logprob.device
        pg_loss, pg_stats = clipped_policy_loss(new_logprob, batch["logprobs"][mb].to(device),
                                                batch["advantages"][mb].to(device), args.clip_coef)
        v_loss = clipped_value_loss(new_value, batch["values"][mb].to(device),
                                    batch["returns"][mb].to(device), args.vf_clip_coef, args.huber_delta)
        # Moved too far from the rollout policy: decided on the mean over ranks, so that every
        # rank stops at the same minibatch (a rank that stopped alone would hang the others).
        if args.target_kl is not None and global_mean([pg_stats["approx_kl"]]) > args.target_kl:
            optimizer.zero_grad(set_to_none=True)
            return stats
        loss = args.vf_coef * v_loss
        if train_policy:
            loss = loss + pg_loss - args.ent_coef * entropy.mean()
        check_finite(where, policy_loss=pg_loss, value_loss=v_loss)
        # Weighted by the minibatch's share: the accumulated gradient is the step's mean.
        (loss * weight).backward()
        if step:  # the gradient of this step's samples over all ranks: average, clip, step
            params = agent.trainable_parameters()
            all_reduce_gradients(params)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            check_finite(where, grad_norm=grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            stats["grad_norm"].append(grad_norm.item())
        for k, v in (("policy_loss", pg_loss.item()), ("value_loss", v_loss.item()),
                     ("entropy", entropy.mean().item()), *pg_stats.items()):
            stats[k].append(v)
    return stats


def init_agent(args: Args, device: torch.device) -> tuple[Args, ActorCritic, dict]:
    """How the run starts, as nanoGPT's init_from -> (the flags it runs with, agent, trainer
    state). A flag that contradicts a checkpoint is a one-line error, before anything loads."""
    dtype = resolve_dtype(args.dtype, device)
    if args.resume:  # this run's own checkpoint, continued: adapter, value head, optimizer, RNG
        checkpoint = Path(args.output_dir) / args.exp_name / "checkpoint"
        args = Args(**resume_flags(checkpoint, "ppo", vars(args)))  # not given: the run's own
        agent, state = load_checkpoint(checkpoint, device, args.model_path, args.unnorm_key,
                                       critic="saved", dtype=dtype, seed=args.seed)
        return args, agent, state
    if args.init_checkpoint is not None:  # another run's adapter (the SFT warm-up's), a new run
        saved = check_init_checkpoint(args.init_checkpoint, args.lora_rank, args.lora_alpha, args.image_size)
        # Its value head if it has one of the mode asked for, else a new one (a note says so).
        agent, _ = load_checkpoint(args.init_checkpoint, device, args.model_path, args.unnorm_key,
                                   critic=args.critic or saved["critic"] or "h0", dtype=dtype, seed=args.seed)
        return args, agent, {}
    # New LoRA adapters and value head on the base model (paper: rank 32, alpha 16, h0).
    return args, build_agent(args.model_path, critic=args.critic or "h0", lora_rank=args.lora_rank,
                             lora_alpha=args.lora_alpha, image_size=args.image_size, device=device,
                             seed=args.seed, unnorm_key=args.unnorm_key, dtype=dtype), {}


def main(args: Args) -> dict[str, float]:
    # ---------------------------------------------------------------- set-up
    rank, world, device = init_distributed(args.device)
    seed_everything(args.seed + rank)  # each rank samples its own actions
    rank_share = rank_share_of_step(args.minibatch_size, args.grad_accum_steps, world)
    args, agent, state = init_agent(args, device)
    run_path = Path(args.output_dir) / args.exp_name
    # Two learning rates: the paper's value head learns 30x faster than the adapters.
    optimizer = torch.optim.AdamW([{"params": agent.lora_parameters(), "lr": args.learning_rate},
                                   {"params": agent.value_head_parameters(), "lr": args.value_learning_rate}], eps=1e-5)
    # Episode ids: one generator, the same on every rank; each rank plays its slice of the draw.
    episode_rng = np.random.default_rng(args.seed)
    start_iteration, skipped = 0, 0
    if args.resume:
        optimizer.load_state_dict(state["optimizer"])  # this restores the run's learning rates too:
        for group, lr in zip(optimizer.param_groups, (args.learning_rate, args.value_learning_rate), strict=True):
            group["lr"] = lr  # the flags' (resume_flags printed any change)
        restore_rng_state(state["rng"], rank, world)
        episode_rng.bit_generator.state = state["episode_rng"]
        start_iteration, skipped = state["iteration"], state["skipped_policy_steps"]

    envs = make_vec_env(args.split, args.num_envs, image_size=agent.image_size, seed=args.seed + rank,
                        max_episode_steps=args.max_episode_steps, env=args.env, render_device=str(device))
    loop = EpisodeLoop(envs, lambda: rank_slice(episode_rng.integers(0, MAX_EPISODE_ID, args.num_envs * world)))
    batch_size = args.num_envs * args.num_steps * world
    writer = make_writer(run_path, vars(args), start_iteration * batch_size, args.track,  # None on ranks > 0
                         args.wandb_project_name, args.wandb_entity)
    eval_ids = rank_slice(evaluation_episode_ids(args.seed + 1, args.split, args.eval_episodes))  # fixed
    videos = run_path / "videos" if args.capture_video else None
    global_step = start_iteration * batch_size
    bar = tqdm(range(start_iteration, args.total_iterations), desc="PPO", initial=start_iteration,
               total=args.total_iterations, disable=rank > 0)
    metrics: dict[str, float] = {}
    if args.eval_every > 0 and start_iteration == 0:  # the start, that every later evaluation compares with
        metrics = evaluate_during_training(agent, envs, eval_ids, args.eval_temperature, "iteration 0", loop, videos)
        log_scalars(writer, metrics, 0)

    for iteration in bar:
        # ------------------------------------------------------------ rollout
        agent.eval()
        t0 = time.perf_counter()
        rollout = loop.run(agent.as_policy(args.temperature, f"iteration {iteration + 1}"), args.num_steps)
        next_value = bootstrap_value(agent, rollout, args.temperature)
        rollout_time = time.perf_counter() - t0
        global_step += batch_size

        # ------------------------------------------------------------ advantages
        advantages, returns = compute_gae(rollout.rewards, rollout.values, rollout.dones,
                                          next_value, args.gamma, args.gae_lambda)
        batch = {"images": rollout.flat("images"), "instructions": rollout.flat("instructions"),
                 "tokens": rollout.flat("tokens"), "logprobs": rollout.flat("logprobs"),
                 "values": rollout.flat("values"), "returns": returns.flatten(),
                 "advantages": advantages.flatten()}
        if args.norm_adv:  # over the global batch: every rank scales by the same statistics
            mean, std = global_mean_std(batch["advantages"])
            batch["advantages"] = (batch["advantages"] - mean) / (std + 1e-8)
        # Every reward equal (e.g. all 0 before the first grasp): normalised advantages would be
        # pure value-function noise, so only the critic learns from this batch.
        _, reward_std = global_mean_std(rollout.rewards.flatten())
        train_policy = reward_std > 0
        skipped += not train_policy

        # ------------------------------------------------------------ update
        agent.train()
        t0 = time.perf_counter()
        stats = ppo_update(agent, optimizer, batch, args, rank_share, train_policy, f"iteration {iteration + 1}")
        update_time = time.perf_counter() - t0

        # ------------------------------------------------------------ logging, evaluation, checkpoint
        metrics = {
            **iteration_metrics(rollout, batch_size, rollout_time, update_time, device),
            "rollout/reward_per_step": global_mean(rollout.rewards.numpy()),
            **{f"losses/{k}": global_mean(np.array(v)) for k, v in stats.items()},
            "losses/explained_variance": explained_variance(batch["values"], batch["returns"]),
            "losses/skipped_policy_steps": float(skipped),
        }
        last = iteration + 1 == args.total_iterations
        if args.eval_every > 0 and ((iteration + 1) % args.eval_every == 0 or last):
            metrics.update(evaluate_during_training(agent, envs, eval_ids, args.eval_temperature,
                                                    f"iteration {iteration + 1}", loop, videos))
        show_progress(bar, metrics)
        log_scalars(writer, metrics, global_step)
        if (iteration + 1) % args.save_every == 0 or last:
            save_run(run_path / "checkpoint", agent, {"iteration": iteration + 1, "optimizer": optimizer.state_dict(),
                     "episode_rng": episode_rng.bit_generator.state, "skipped_policy_steps": skipped,
                     "algorithm": "ppo"}, vars(args), snapshot=f"iteration_{iteration + 1}" if args.keep_checkpoints else None)

    envs.close()
    close_writer(writer)
    return metrics


if __name__ == "__main__":
    run_script(main, ARGS, "ppo", Path(ARGS.output_dir) / ARGS.exp_name)
