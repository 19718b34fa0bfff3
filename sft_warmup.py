"""Supervised fine-tuning (LoRA) of a Vision-Language-Action model on scripted demonstrations.

Two uses in "What Can RL Bring to VLA Generalization?" (arXiv 2505.19789, section 4 and
appendix; docs/PAPER_NOTES.md):
  * the warm-up: LoRA SFT on 140 expert demonstrations before RL (then
    `ppo_vla.py --init-checkpoint runs/sft_warmup/checkpoint`); the paper reaches the same final
    return with ~50% fewer environment steps this way;
  * the SFT-16k baseline: the same recipe on 16,384 demonstrations (SFT saturates around 16k),
    trained from the base model (not from the warm-up), the policy every RL result is compared with.

    python sft_warmup.py                                          # warm-up, paper defaults
    python sft_warmup.py twin-warmup                              # the README's twin warm-up
    python sft_warmup.py --model-path /weights/openvla-7b         # warm-up of OpenVLA-7B (GPU)
    python sft_warmup.py --model-path /weights/openvla-7b --num-demos 16384 --total-steps 60000 \\
        --no-image-aug --exp-name sft16k                          # the SFT-16k baseline

Reads top to bottom: demonstrations (collected once into --demo-dir and reused: `train` to learn
from, the fixed `heldout` to validate on), then cross-entropy on the 7 action tokens,
validation, success rate with the policy in the loop, and a checkpoint every script can load.
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
    exp_name: str = "sft_warmup"
    """name of the run; its directory is OUTPUT_DIR/EXP_NAME (fixed, so --resume finds it)"""
    output_dir: str = "runs"
    """where run directories (TensorBoard logs, checkpoints) are written"""
    seed: int = 0
    """seed of torch, numpy and python: LoRA init, batch order, augmentation"""
    device: str = "auto"
    """'auto' (CUDA if available, else CPU), 'cpu', 'cuda' or 'cuda:N'"""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """weights' dtype: auto = bf16 on CUDA, fp32 on the CPU (bf16 on the CPU: inspection runs)"""
    resume: bool = False
    """continue a killed run from OUTPUT_DIR/EXP_NAME/checkpoint (step, optimizer, RNG)"""
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
    """start from this checkpoint's adapter instead of a fresh one"""
    lora_rank: int | None = None
    """LoRA rank on every linear layer (paper: 32); default 32, or the checkpoint's"""
    lora_alpha: int | None = None
    """LoRA alpha (paper: 16); default 16, or the checkpoint's"""
    image_size: int | None = None
    """image size of the model and renderer; default: the model's (tiny 64, OpenVLA 224)"""
    # --- demonstrations
    env: Literal["maniskill", "twin"] = "maniskill"
    """task family: the ManiSkill3 benchmark, or its fast 2D twin"""
    split: str = "ind"
    """split the expert demonstrates ('ind': the training distribution)"""
    num_demos: int = 140
    """successful demonstrations to train on (paper: 140 for the warm-up, 16384 for SFT-16k)"""
    val_demos: int = 16
    """held-out demonstrations to validate on: the directory's first N, the same for every run"""
    demo_dir: str | None = None
    """where demonstrations are stored and reused; default demos/ENV-SPLIT-SIZEpx-seedDEMO_SEED"""
    demo_seed: int = 0
    """fixes which episodes the demonstrations show (apart from --seed)"""
    num_envs: int = 8
    """environments the expert runs in parallel; also episodes per file"""
    max_episode_steps: int | None = None
    """episode horizon; default the env's (ManiSkill 80, twin 30)"""
    steps_after_success: int = 6
    """cut a demonstration once it has been successful this many steps in a row (paper: 6)"""
    action_noise: float = 0.0
    """DART: std of noise on the expert's executed moves on 30% of the steps, labels unchanged,
    so the demonstrations show recovery from drift (0: clean demonstrations, as the paper's)"""
    collect_only: bool = False
    """stop after collecting the demonstrations (no model, no training)"""
    # --- training (the paper's warm-up: OpenVLA's LoRA fine-tuning recipe)
    total_steps: int = 2000
    """optimizer steps (paper: 2000 for the warm-up, 60000 for SFT-16k)"""
    batch_size: int = 32
    """frames per optimizer step over all ranks, drawn uniformly from the training demos"""
    grad_accum_steps: int = 2
    """split each rank's batch into this many forward/backward passes: same gradient, less memory"""
    gradient_checkpointing: bool = False
    """recompute the Llama layers and ViT blocks in the backward: same gradients for an extra forward;
    OpenVLA-7B at micro-batch 16: ~18 GiB, not ~46 (estimated; off: 46 fits an 80 GB GPU)"""
    learning_rate: float = 5e-4
    """AdamW learning rate of the LoRA adapters, constant (paper: 5e-4)"""
    loss_vocab: Literal["full", "action"] = "full"
    """cross-entropy over the full vocabulary (OpenVLA's SFT) or the 256 action ids (what RL samples)"""
    image_aug: bool = True
    """random resized crop + colour jitter, as OpenVLA trains (paper: on for the warm-up)"""
    # --- evaluation, logging, checkpoints
    val_every: int = 100
    """validation loss, token accuracy and L1 on the held-out demos every K steps (and at the end)"""
    eval_every: int = 500
    """success rate with the policy in the loop every K steps (and at the end); 0 disables"""
    eval_episodes: int = 32
    """episodes per success-rate evaluation, on --split (ids no demonstration uses)"""
    eval_temperature: float = 0.6
    """sampling temperature of that evaluation (paper: 0.6, as for the RL policies; 0 = greedy)"""
    save_every: int = 500
    """write the checkpoint every K steps (and at the end)"""
    keep_checkpoints: bool = False
    """also keep every checkpoint written, as RUN/snapshots/step_N (OOD success along training)"""


RECIPES = {
    "twin-warmup": ("the warm-up on the 2D twin, as in the README: LoRA SFT, 200 steps on 32 ind demos",
                    Args(exp_name="sft_warmup_twin", env="twin", model_path=PRETRAINED_TWIN, num_demos=32,
                         total_steps=200,
                         batch_size=64, grad_accum_steps=1, learning_rate=1e-3, image_aug=False,
                         val_every=100, eval_every=200, eval_episodes=128, save_every=100)),
    "twin-sft": ("the SFT baseline on the 2D twin, as in the README: LoRA SFT on many ind demos, from the base",
                 Args(exp_name="sft_twin", env="twin", model_path=PRETRAINED_TWIN, num_demos=1024,
                      total_steps=1000, batch_size=64, grad_accum_steps=1, learning_rate=1e-3, image_aug=False,
                      val_every=250, eval_every=1000, eval_episodes=128, save_every=250)),
}


def check_args(args: Args) -> None:
    """Every value that would fail later (or silently do something else), rejected now."""
    check_model_args(args)
    require_positive(args, "num_demos", "num_envs", "max_episode_steps", "steps_after_success",
                     "total_steps", "batch_size", "grad_accum_steps", "val_every", "save_every",
                     "eval_episodes")
    require_non_negative(args, "val_demos", "eval_every", "eval_temperature", "action_noise")
    require_finite_positive(args, "learning_rate")
    if args.grad_accum_steps > args.batch_size:
        raise ValueError(f"--grad-accum-steps ({args.grad_accum_steps}) cannot exceed --batch-size "
                         f"({args.batch_size})")


if __name__ == "__main__":
    ARGS = parse_cli(Args, check_args, RECIPES)  # before the heavy imports: --help answers at once

import contextlib
import time
from pathlib import Path

import numpy as np
import torch
from peft.helpers import disable_input_dtype_casting
from torchvision.transforms import v2
from tqdm import tqdm

from common import (
    ActorCritic,
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
    planned_image_size,
    rank_slice,
    resolve_dtype,
    restore_rng_state,
    resume_flags,
    run_script,
    save_run,
    seed_everything,
    wait_for_rank_zero,
)
from demos import Frames, ensure_demos, frames_of
from envs import default_horizon, make_vec_env
from model import ACTION_DIM, NormStats, action_token_loss, enable_gradient_checkpointing


def compute_norm_stats(actions: np.ndarray) -> NormStats:
    """q01 / q99 per dimension of the training actions [F, 7] (OpenVLA's normalisation); the
    gripper is left raw (NormStats' mask), so its q01 / q99 are never used."""
    return NormStats(q01=np.quantile(actions, 0.01, axis=0), q99=np.quantile(actions, 0.99, axis=0))


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


def token_loss(agent: ActorCritic, images: np.ndarray, instructions: list[str], actions: np.ndarray,
               loss_vocab: str) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Actions [B, 7] -> their tokens under the agent's statistics; (loss, predicted tokens,
    target tokens), both [B, 7]."""
    target = agent.action_tokenizer.encode(agent.norm_stats.normalize(actions))
    inputs = agent.prepare_inputs(images, instructions)
    loss, predicted = action_token_loss(agent.vla, inputs, agent.check_action_tokens(target), loss_vocab)
    return loss, predicted.cpu().numpy(), target


def training_precision(agent: ActorCritic) -> contextlib.AbstractContextManager:
    """The training forward's context. bf16 weights: autocast to bf16, with peft's cast of each
    adapted layer's input to fp32 switched off (that copy is what the backward keeps, ~2x the
    bf16 activations): the adapters compute in bf16, mixed precision as usual. Weights,
    gradients, AdamW state and the loss stay fp32. fp32 weights: nothing changes."""
    if agent.dtype != torch.bfloat16:
        return contextlib.nullcontext()
    context = contextlib.ExitStack()
    context.enter_context(torch.autocast(agent.device.type, dtype=torch.bfloat16))
    context.enter_context(disable_input_dtype_casting(agent.policy))
    return context


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
    losses, predicted, targets = [], [], []
    for start in range(0, len(frames), batch_size):
        index = np.arange(start, min(start + batch_size, len(frames)))
        loss, pred, target = token_loss(agent, frames.read_images(index), [frames.instructions[i] for i in index],
                                        frames.actions[index], loss_vocab)
        losses.append(loss.item() * len(index))
        predicted.append(pred)
        targets.append(target)
    return {"loss": sum(losses) / len(frames), **token_metrics(agent, np.concatenate(predicted),
                                                                np.concatenate(targets))}


def check_start(args: Args, device: torch.device) -> Args:
    """How the run starts (nanoGPT's init_from), checked before the demonstrations -> its flags."""
    if args.resume:
        return Args(**resume_flags(Path(args.output_dir) / args.exp_name / "checkpoint", "sft", vars(args)))
    if args.init_checkpoint is not None:
        check_init_checkpoint(args.init_checkpoint, args.lora_rank, args.lora_alpha, args.image_size)
    return args


def init_agent(args: Args, device: torch.device) -> tuple[ActorCritic, dict]:
    """The agent check_start() chose -> (agent, trainer state); a checkpoint's value head is dropped."""
    dtype = resolve_dtype(args.dtype, device)
    if args.resume:  # this run's own checkpoint, continued: adapter, optimizer, RNG, step
        return load_checkpoint(Path(args.output_dir) / args.exp_name / "checkpoint", device, args.model_path,
                               args.unnorm_key, critic=None, dtype=dtype, seed=args.seed)
    if args.init_checkpoint is not None:  # another run's adapter, a new run
        agent, _ = load_checkpoint(args.init_checkpoint, device, args.model_path, args.unnorm_key,
                                   critic=None, dtype=dtype, seed=args.seed)
        return agent, {}
    # New LoRA adapters on the base model (paper: rank 32, alpha 16).
    return build_agent(args.model_path, critic=None, lora_rank=args.lora_rank,
                       lora_alpha=args.lora_alpha, image_size=args.image_size,
                       device=device, seed=args.seed, unnorm_key=args.unnorm_key, dtype=dtype), {}


def main(args: Args) -> dict[str, float]:
    # ---------------------------------------------------------------- set-up
    rank, world, device = init_distributed(args.device)
    if args.batch_size % world:  # the global batch is the recipe's: every rank takes an equal share
        raise ValueError(f"--batch-size ({args.batch_size}) must be a multiple of the number of ranks ({world})")
    seed_everything(args.seed + rank)
    if args.model_path is not None and not Path(args.model_path).is_dir():  # now, not after the demos
        problem = "is a file, not a model directory" if Path(args.model_path).exists() else "does not exist"
        raise FileNotFoundError(f"--model-path {args.model_path} {problem}")
    args = check_start(args, device)  # a checkpoint that contradicts the flags: also now
    run_path = Path(args.output_dir) / args.exp_name

    # ---------------------------------------------------------------- demonstrations
    # Before the model: collecting needs none (--collect-only needs no GPU). Rank 0 collects.
    image_size = planned_image_size(args.image_size, args.model_path,
                                    run_path / "checkpoint" if args.resume else args.init_checkpoint)
    horizon = args.max_episode_steps or default_horizon(args.env)
    demo_dir = Path(args.demo_dir or f"demos/{args.env}-{args.split}-{image_size}px-seed{args.demo_seed}")
    wanted = {"train": args.num_demos, "heldout": args.val_demos}
    demo_settings = dict(seed=args.demo_seed, num_envs=args.num_envs, action_noise=args.action_noise,
                         success_steps=min(args.steps_after_success, horizon))
    if rank == 0:
        ensure_demos(demo_dir, wanted, args.env, args.split, image_size, horizon, **demo_settings)
    wait_for_rank_zero()  # with a timeout for hours of collecting, not NCCL's 10 minutes
    records = ensure_demos(demo_dir, wanted, args.env, args.split, image_size, horizon, **demo_settings)
    if args.collect_only:
        return {"demos": float(len(records["train"]))}

    # ---------------------------------------------------------------- model, data
    agent, state = init_agent(args, device)
    if agent.image_size != image_size:
        raise ValueError(f"the model takes {agent.image_size}px images; pass --image-size {agent.image_size}")
    if args.resume and (state["demo_dir"], state["num_demos"]) != (str(demo_dir), args.num_demos):
        raise ValueError(f"the run to resume trained on {state['num_demos']} demonstrations from "
                         f"{state['demo_dir']}, not {args.num_demos} from {demo_dir}")
    train_frames, val_frames = frames_of(records["train"]).load(), frames_of(records["heldout"]).load()
    # New statistics even from --init-checkpoint: SFT normalises with its own data (as OpenVLA
    # does per dataset); a resumed run keeps the statistics its tokens were trained under.
    if not args.resume:
        agent.norm_stats = compute_norm_stats(train_frames.actions)
    if rank == 0:
        tqdm.write(f"{len(records['train'])} training demonstrations ({len(train_frames)} frames), "
                   f"{len(records['heldout'])} held out ({len(val_frames)} frames), from {demo_dir}")

    # ---------------------------------------------------------------- optimizer, logging
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(agent.vla)  # only the training forward keeps activations
    optimizer = torch.optim.AdamW(agent.lora_parameters(), lr=args.learning_rate)
    batch_rng = np.random.default_rng([args.seed, rank])  # each rank draws its own frames
    start_step = 0
    if args.resume:
        optimizer.load_state_dict(state["optimizer"])  # this restores the run's learning rate too:
        optimizer.param_groups[0]["lr"] = args.learning_rate  # the flag's (resume_flags printed any change)
        restore_rng_state(state["rng"], rank, world)
        batch_rng.bit_generator.state = state["batch_rngs"][rank]
        start_step = state["step"]
    eval_envs = None
    if args.eval_every > 0:
        eval_envs = make_vec_env(args.split, min(args.num_envs, args.eval_episodes), agent.image_size,
                                 args.seed + rank, horizon, env=args.env, render_device=str(device))
    writer = make_writer(run_path, vars(args), start_step, args.track,  # None on ranks > 0
                         args.wandb_project_name, args.wandb_entity)
    eval_ids = rank_slice(evaluation_episode_ids(args.seed + 1, args.split, args.eval_episodes))  # fixed
    videos = run_path / "videos" if args.capture_video else None
    rank_batch = args.batch_size // world
    micro_batch = -(-rank_batch // args.grad_accum_steps)  # ceil
    metrics: dict[str, float] = {}
    t0 = time.perf_counter()
    bar = tqdm(range(start_step, args.total_steps), desc="SFT", initial=start_step, total=args.total_steps,
               disable=rank > 0)

    last_val_accuracy = float("nan")  # none yet
    for step in bar:
        # ------------------------------------------------------------ one optimizer step
        agent.train()
        index = batch_rng.integers(0, len(train_frames), size=rank_batch)  # [B]
        images = train_frames.read_images(index)  # uint8 [B, H, W, 3]
        if args.image_aug:
            images = augment_images(images, device)
        losses, predicted, targets = [], [], []
        for start in range(0, rank_batch, micro_batch):
            part = index[start:start + micro_batch]
            with training_precision(agent):  # the backward runs outside, as autocast recommends
                loss, pred, target = token_loss(agent, images[start:start + micro_batch],
                                                [train_frames.instructions[i] for i in part],
                                                train_frames.actions[part], args.loss_vocab)
            check_finite(f"step {step + 1}", loss=loss)
            # Weight each part by its share of the batch: the sum is the whole batch's mean.
            (loss * len(part) / rank_batch).backward()
            losses.append(loss.item() * len(part))
            predicted.append(pred)
            targets.append(target)
        optimizer_step(optimizer, agent.lora_parameters(), float("inf"), f"step {step + 1}")

        # ------------------------------------------------------------ logging
        done = step + 1
        last = done == args.total_steps
        train = token_metrics(agent, np.concatenate(predicted), np.concatenate(targets))
        metrics = {"train/loss": global_mean([sum(losses) / rank_batch]),
                   "train/token_accuracy": global_mean([train["token_accuracy"]]),
                   "train/l1": global_mean([train["l1"]])}
        if len(val_frames) and (done % args.val_every == 0 or last):
            metrics.update({f"val/{k}": v for k, v in validate(agent, val_frames, 64, args.loss_vocab).items()})
        if eval_envs is not None and (done % args.eval_every == 0 or last):
            metrics.update(evaluate_during_training(agent, eval_envs, eval_ids, args.eval_temperature,
                                                    f"step {done}", video_dir=videos))
        metrics["time/steps_per_s"] = (done - start_step) / (time.perf_counter() - t0)
        metrics["memory/peak_gb"] = peak_memory_gb(device)
        last_val_accuracy = metrics.get("val/token_accuracy", last_val_accuracy)  # shown until the next
        bar.set_postfix(loss=f"{metrics['train/loss']:.3f}", acc=f"{metrics['train/token_accuracy']:.2f}",
                        val_acc=f"{last_val_accuracy:.2f}", refresh=False)
        log_scalars(writer, metrics, done)

        # ------------------------------------------------------------ checkpoint
        if done % args.save_every == 0 or last:
            save_run(run_path / "checkpoint", agent, {
                "optimizer": optimizer.state_dict(), "step": done, "algorithm": "sft",
                "batch_rngs": gather_objects(batch_rng.bit_generator.state),
                "demo_dir": str(demo_dir), "num_demos": args.num_demos}, vars(args),
                snapshot=f"step_{done}" if args.keep_checkpoints else None)

    if eval_envs is not None:
        eval_envs.close()
    close_writer(writer)
    if rank == 0:  # also logged as memory/peak_gb; on the CPU: the process's peak resident set
        tqdm.write(f"peak memory: {peak_memory_gb(device):.1f} GB ({device})")
    return metrics


if __name__ == "__main__":
    run_script(main, ARGS, "sft", Path(ARGS.output_dir) / ARGS.exp_name)
