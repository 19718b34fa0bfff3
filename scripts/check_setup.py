"""The first command on a new machine: does every piece the training scripts need work here?

    python scripts/check_setup.py --model-path /weights/openvla-7b --unnorm-key bridge_orig
    torchrun --nproc_per_node 4 scripts/check_setup.py --model-path /weights/openvla-7b ...
    python scripts/check_setup.py --env twin --device cpu        # the same checks on a laptop

In about a minute (plus the model's load) each rank checks, in the order a PPO run needs them:
  1. the device: torch sees this rank's GPU (else: why not, e.g. a driver older than the wheel);
  2. torch.distributed: a CPU tensor (metrics) and a device tensor (gradients) reduced over all
     ranks through the backends the scripts use (gloo for CPU tensors, NCCL for GPU ones);
  3. the environment: --num-envs envs of --env reset and stepped (ManiSkill renders on the
     rank's own GPU), with env-steps/s;
  4. the model: one rollout forward of --num-envs observations, then one optimizer step of PPO
     on --minibatch-size of them, with the step's time and the peak memory; and how far the
     update's log-probs of the sampled actions are from the rollout's (they should agree to
     ~1e-5 in fp32; in bf16 the gap shows as PPO clip fractions before any update).
  5. on a GPU: the host syncs of the 7-token decode: by design none in its one-token steps.
Every check prints one line; the first failure ends the run with its reason (exit status 1).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's modules, from anywhere

from cli import check_device, check_unnorm_key, parse_cli, require_positive  # noqa: E402


@dataclass
class Args:
    model_path: str | None = None
    """OpenVLA directory in the official layout; default: a random tiny OpenVLA built in code"""
    unnorm_key: str | None = None
    """which dataset's action statistics in the model directory to use (needed if several)"""
    device: str = "auto"
    """'auto' (this rank's GPU if torch can use it, else CPU), 'cpu', 'cuda' or 'cuda:N'"""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """weights' dtype: auto = bf16 on CUDA (as the scripts train), fp32 on the CPU"""
    env: Literal["maniskill", "twin"] = "maniskill"
    """task family to step: the ManiSkill3 benchmark, or its fast 2D twin"""
    num_envs: int = 8
    """environments per rank (PPO's default is 64: memory grows with it in the rollout forward)"""
    env_steps: int = 10
    """steps of the envs, with random actions"""
    minibatch_size: int = 8
    """samples in the PPO update step (the paper's minibatch: 8)"""


def check_args(args: Args) -> None:
    check_device(args.device)
    require_positive(args, "num_envs", "env_steps", "minibatch_size")
    if args.minibatch_size > args.num_envs:
        raise ValueError(f"--minibatch-size ({args.minibatch_size}) cannot exceed --num-envs ({args.num_envs})")
    check_unnorm_key(args.model_path, args.unnorm_key)


if __name__ == "__main__":
    ARGS = parse_cli(Args, check_args)  # before the heavy imports: --help answers at once

import time  # noqa: E402
import warnings  # noqa: E402
from unittest import mock  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import common  # noqa: E402
from common import (  # noqa: E402
    ActorCritic,
    all_reduce_gradients,
    build_agent,
    global_mean,
    init_distributed,
    peak_memory_gb,
    resolve_dtype,
    world_info,
)
from envs import make_vec_env  # noqa: E402
from model import run_language_model  # noqa: E402


def report(what: str, result: str) -> None:
    rank, world = world_info()
    print(f"[rank {rank}/{world}] {what:<13} {result}", flush=True)


def check_collectives(device: torch.device) -> str:
    """A CPU and a device tensor all-reduced over the ranks: their sums must be exact."""
    rank, world = world_info()
    mean = global_mean([float(rank)])  # CPU: gloo
    param = torch.nn.Parameter(torch.zeros(3, device=device))
    param.grad = torch.full((3,), float(rank), device=device)
    all_reduce_gradients([param])  # the device's backend (NCCL on GPUs)
    expected = (world - 1) / 2
    if mean != expected or not torch.allclose(param.grad.cpu(), torch.full((3,), expected)):
        raise RuntimeError(f"all-reduce gave {mean} and {param.grad.tolist()}, not {expected}")
    backend = dist.get_backend() if dist.is_initialized() else "none (one process)"
    return f"ok: {world} rank(s), backend {backend}"


def check_env(args: Args, image_size: int, render_device: str) -> tuple[dict, str]:
    """Reset and step --num-envs envs with random actions: (last observation, report)."""
    envs = make_vec_env("ind", args.num_envs, image_size, seed=0, env=args.env, render_device=render_device)
    try:
        obs, _ = envs.reset(seed=0)
        rng = np.random.default_rng(0)
        start = time.perf_counter()
        for _ in range(args.env_steps):
            actions = rng.uniform(-1, 1, (args.num_envs, 7)).astype(np.float32)
            obs, *_ = envs.step(actions)
        rate = args.num_envs * args.env_steps / (time.perf_counter() - start)
    finally:
        envs.close()
    return obs, f"ok: {args.num_envs} {args.env} envs at {image_size} px, {rate:.0f} env-steps/s"


def check_model(args: Args, device: torch.device, obs: dict) -> list[tuple[str, str]]:
    """One rollout forward and one PPO optimizer step of the agent the scripts build."""
    t0 = time.perf_counter()
    agent = build_agent(args.model_path, critic="h0", device=device, unnorm_key=args.unnorm_key,
                        dtype=resolve_dtype(args.dtype, device))
    lines = [("model", f"ok: loaded in {time.perf_counter() - t0:.0f} s, {agent.dtype}, "
                       f"{agent.image_size} px")]
    images, instructions = obs["image"], list(obs["instruction"])
    agent.eval()
    t0 = time.perf_counter()
    out = agent.act(images, instructions, temperature=1.0)
    lines.append(("rollout", f"ok: {len(images)} actions in {time.perf_counter() - t0:.2f} s"))

    agent.train()
    optimizer = torch.optim.AdamW(agent.trainable_parameters(), lr=1e-4)
    mb = slice(0, args.minibatch_size)
    t0 = time.perf_counter()
    logprob, _, value = agent.score_actions(images[mb], instructions[mb], out.tokens[mb], temperature=1.0)
    old = out.logprob[mb].to(logprob.device)
    ratio = (logprob - old).exp()  # PPO's ratio: 1 before any update, up to rounding
    (-ratio.mean() + (value - 1).pow(2).mean()).backward()
    all_reduce_gradients(agent.trainable_parameters())
    optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    gap = (logprob.detach() - old).abs().max().item()
    lines.append(("update", f"ok: one step of {args.minibatch_size} in {time.perf_counter() - t0:.2f} s, "
                            f"peak memory {peak_memory_gb(device):.1f} GB"))
    lines.append(("log-probs", f"update vs rollout: max |difference| {gap:.2e}, clip fraction "
                               f"{((ratio.detach() - 1).abs() > 0.2).float().mean().item():.2f} before any update (fp32: ~1e-5 and 0)"))
    if device.type == "cuda":
        lines.append(("decode syncs", count_decode_syncs(agent, images, instructions)))
    return lines


def count_decode_syncs(agent: ActorCritic, images: np.ndarray, instructions: list[str]) -> str:
    """The host syncs of act()'s decode (each one stalls the GPU's queue), counted by torch's sync
    debug mode and split by where they happen: the prompt's prefill (the KV cache's allocation,
    transformers' mask code), the 6 one-token steps (by design none), and the rest of the loop
    (by design one: the finiteness check after it)."""
    calls: list[tuple[int, int]] = []  # syncs seen at each Llama call's start and end

    def counted_language_model(*args, **kwargs):
        start = len(caught)
        hidden = run_language_model(*args, **kwargs)
        calls.append((start, len(caught)))
        return hidden

    agent.eval()
    with torch.no_grad():
        inputs = agent.prepare_inputs(images, instructions)
        embeds = agent.vla.embed_inputs(inputs.pixel_values, inputs.input_ids)
        with warnings.catch_warnings(record=True) as caught, \
                mock.patch.object(common, "run_language_model", counted_language_model):
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                agent.sample_action_tokens(embeds, inputs.attention_mask, temperature=1.0)
            finally:
                torch.cuda.set_sync_debug_mode("default")
    in_calls = [end - start for start, end in calls]
    prefill, steps, rest = in_calls[0], in_calls[1:], len(caught) - sum(in_calls)
    where = sorted({f"{Path(w.filename).name}:{w.lineno}" for w in caught})
    verdict = "ok" if sum(steps) == 0 else "the one-token steps wait for the GPU"
    return (f"{verdict}: host syncs in the prefill {prefill}, in the {len(steps)} one-token steps "
            f"{sum(steps)} (design: 0), elsewhere in the loop {rest} (the check after it is one); at "
            f"{', '.join(where) or 'none'}")


def main(args: Args) -> None:
    rank, world, device = init_distributed(args.device)
    report("device", f"ok: {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    report("distributed", check_collectives(device))
    image_size = 64 if args.model_path is None else None
    if image_size is None:
        from model import model_image_size

        image_size = model_image_size(args.model_path)
    obs, line = check_env(args, image_size, str(device))
    report("environment", line)
    for what, line in check_model(args, device, obs):
        report(what, line)
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        print("every check passed: the training scripts can run here")


if __name__ == "__main__":
    try:
        main(ARGS)
    except Exception as error:  # a set-up check: every failure is the answer, in one line
        rank, _ = world_info()
        sys.exit(f"error (rank {rank}): {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
