"""Sampling throughput of the tiny preset, and what the KV cache buys.

    .venv/bin/python benchmarks/bench_sampling.py

Prints obs/s of agent.act() at batch 8 and 32 (112 px, CPU unless --device says otherwise), then
times decoding the 7 action tokens with the KV cache (one prefill + 6 one-token steps, as act()
does) against recomputing the whole prefix for every token, on the same prompts in the same run.
Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import ActorCritic, build_agent  # noqa: E402  (the repo root is not a package)
from model import ACTION_DIM, position_ids_from_mask, run_language_model  # noqa: E402

INSTRUCTIONS = ["put the carrot on the plate", "put the green cube onto the yellow towel",
                "move to the red square", "pick up the eggplant and place it in the basket"]


def seconds_per_call(fn: Callable[[], object], min_seconds: float) -> float:
    """Mean wall-clock seconds per call: warm up twice, then repeat for min_seconds."""
    return timed_calls(fn, min_seconds)[0]


def timed_calls(fn: Callable[[], object], min_seconds: float) -> tuple[float, float]:
    """(wall-clock, CPU) seconds per call. CPU time is this process's, all threads: on a
    machine shared with other jobs it shows what the code costs when wall-clock time cannot."""
    fn()
    fn()
    calls, start, cpu_start = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < min_seconds:
        fn()
        calls += 1
    return (time.perf_counter() - start) / calls, (time.process_time() - cpu_start) / calls


def observations(batch_size: int, image_size: int) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch_size, image_size, image_size, 3), dtype=np.uint8)
    return images, [INSTRUCTIONS[i % len(INSTRUCTIONS)] for i in range(batch_size)]


@torch.no_grad()
def greedy_tokens_without_cache(agent: ActorCritic, embeds: torch.Tensor,
                                attention_mask: torch.Tensor) -> torch.Tensor:
    """The baseline: for each of the 7 tokens, run the LLM over prompt + tokens so far."""
    vla = agent.vla
    embed_tokens = vla.language_model.get_input_embeddings()
    tokens = []
    for _ in range(ACTION_DIM):
        hidden = run_language_model(vla, embeds, attention_mask,
                                    position_ids_from_mask(attention_mask))[:, -1]
        token = agent.action_logits(hidden).argmax(-1) + agent.action_tokenizer.first_id
        tokens.append(token)
        embeds = torch.cat([embeds, embed_tokens(token)[:, None]], 1)
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(token), 1)], 1)
    return torch.stack(tokens, 1)


def decode_seconds(agent: ActorCritic, batch_size: int,
                   seconds: float) -> tuple[float, float, int]:
    """Seconds to decode 7 greedy tokens with the KV cache and without, from the same prompts."""
    images, instructions = observations(batch_size, agent.image_size)
    with torch.no_grad():
        inputs = agent.prepare_inputs(images, instructions)
        embeds = agent.vla.embed_inputs(inputs.pixel_values, inputs.input_ids)
    mask = inputs.attention_mask
    with torch.no_grad():
        cached_tokens, _, _ = agent.sample_action_tokens(embeds, mask, 0.0)
    assert torch.equal(cached_tokens, greedy_tokens_without_cache(agent, embeds, mask)), \
        "KV-cache decoding changed the tokens"
    with torch.no_grad():
        cached = seconds_per_call(
            lambda: agent.sample_action_tokens(embeds, mask, 0.0), seconds)
    uncached = seconds_per_call(lambda: greedy_tokens_without_cache(agent, embeds, mask), seconds)
    return cached, uncached, mask.shape[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seconds", type=float, default=3.0, help="timing budget per measurement")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    agent = build_agent(device=args.device)
    print(f"tiny preset: {agent.image_size}px, {agent.vla.num_patches} patches per tower, "
          f"{sum(p.numel() for p in agent.vla.parameters()):,} weights incl. LoRA, "
          f"{torch.get_num_threads()} CPU threads")

    throughput, cpu_throughput = {}, {}
    for batch_size in (8, 32):
        images, instructions = observations(batch_size, agent.image_size)
        seconds, cpu_seconds = timed_calls(
            lambda obs=(images, instructions): agent.act(*obs, 1.0), args.seconds)
        throughput[batch_size] = batch_size / seconds
        cpu_throughput[batch_size] = batch_size / cpu_seconds
        print(f"act(), batch {batch_size:2d}: {seconds * 1e3:7.1f} ms/call, "
              f"{throughput[batch_size]:6.1f} obs/s ({cpu_throughput[batch_size]:6.1f} obs per "
              f"CPU-second)")

    # KV cache vs recomputing the prefix: same prompts, same weights, greedy so tokens can match.
    speedup = {}
    for batch_size in (8, 32):
        cached, uncached, length = decode_seconds(agent, batch_size, args.seconds)
        speedup[batch_size] = uncached / cached
        print(f"decode 7 tokens, batch {batch_size:2d}: KV cache {cached * 1e3:7.1f} ms, "
              f"recompute prefix {uncached * 1e3:7.1f} ms ({length} prompt positions): "
              f"{speedup[batch_size]:.1f}x")
    print(f"RESULT tiny preset: {throughput[8]:.1f} obs/s at batch 8, {throughput[32]:.1f} obs/s "
          f"at batch 32 ({cpu_throughput[8]:.0f} / {cpu_throughput[32]:.0f} per CPU-second); "
          f"KV-cache speed-up {speedup[8]:.1f}x at batch 8 ({speedup[32]:.1f}x at "
          f"32) over recomputing the prefix (target >= 3x: {'met' if speedup[8] >= 3 else 'NOT met'})")


if __name__ == "__main__":
    main()
