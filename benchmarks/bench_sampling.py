"""Sampling throughput of the tiny preset, and what the KV cache buys.

    .venv/bin/python benchmarks/bench_sampling.py

Prints obs/s of agent.act() at batch 8 and 32 (112 px, CPU unless --device says otherwise), then
times decoding the 7 action tokens with the KV cache (one prefill + 6 one-token steps, as act()
does) against recomputing the whole prefix for every token, on the same prompts in the same run.
Then act() at batch 64 with the preallocated StaticCache and no per-step sync (today's) against
the DynamicCache loop it replaced (kept below as the reference), after checking that both give
the same tokens and log-probs from the same seed, for left- and right-padded prompts. Last,
act() at batch 32 with the LoRA adapters folded into the weights (evaluate_ood.py's evaluation)
against apart (training's), on trained-looking adapters, after checking they sample the same.
Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import ActorCritic, build_agent, check_finite  # noqa: E402  (the repo root is not a package)
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


def sample_with_dynamic_cache(agent: ActorCritic, embeds: torch.Tensor, attention_mask: torch.Tensor,
                              temperature: float, where: str = "sampling"
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The decode loop act() had before: a DynamicCache (torch.cat of every layer's keys and
    values at each step) and a finiteness check (.item(), a host sync) at each step."""
    vla = agent.vla
    cache = DynamicCache(config=vla.language_model.config)
    positions = position_ids_from_mask(attention_mask)
    hidden = run_language_model(vla, embeds, attention_mask, positions, cache)[:, -1]
    embed_tokens = vla.language_model.get_input_embeddings()
    tokens, logprob, predicting_hidden = [], 0.0, []
    for step in range(ACTION_DIM):
        predicting_hidden.append(hidden)
        logits = agent.action_logits(hidden)
        check_finite(where, action_logits=logits.abs().amax())
        dist = agent.action_distribution(logits, temperature)
        index = dist.logits.argmax(-1) if temperature == 0 else dist.sample()
        logprob = logprob + dist.log_prob(index)
        token = index + agent.action_tokenizer.first_id
        tokens.append(token)
        if step == ACTION_DIM - 1:
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(token), 1)], 1)
        positions = positions[:, -1:] + 1
        hidden = run_language_model(vla, embed_tokens(token)[:, None], attention_mask,
                                    positions, cache)[:, -1]
    return torch.stack(tokens, 1), logprob, torch.stack(predicting_hidden, 1)


@contextlib.contextmanager
def dynamic_cache_decoding(agent: ActorCritic) -> Iterator[None]:
    """act() with the old decode loop, for this block only."""
    agent.sample_action_tokens = types.MethodType(sample_with_dynamic_cache, agent)
    try:
        yield
    finally:
        del agent.sample_action_tokens  # back to the class's method


def right_padded(embeds: torch.Tensor, attention_mask: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts [B, L, D], [B, L] -> the same prompts padded on the right."""
    rows = [(e.roll(-int((m == 0).sum()), 0), m.roll(-int((m == 0).sum()), 0))
            for e, m in zip(embeds, attention_mask, strict=True)]
    return torch.stack([e for e, _ in rows]), torch.stack([m for _, m in rows])


@torch.no_grad()
def check_same_samples(agent: ActorCritic, batch_size: int) -> float:
    """Both decode loops from one seed, left- and right-padded prompts of different lengths:
    the same tokens, log-probs and hidden states (to 1e-5, act()'s budget against
    score_actions()) -> the largest log-prob difference."""
    images, instructions = observations(batch_size, agent.image_size)
    inputs = agent.prepare_inputs(images, instructions)
    embeds = agent.vla.embed_inputs(inputs.pixel_values, inputs.input_ids)
    assert (inputs.attention_mask == 0).any(), "want prompts of different lengths"
    largest = 0.0
    for padded in ((embeds, inputs.attention_mask), right_padded(embeds, inputs.attention_mask)):
        for temperature in (1.0, 0.0):
            torch.manual_seed(0)
            new = agent.sample_action_tokens(*padded, temperature)
            torch.manual_seed(0)
            old = sample_with_dynamic_cache(agent, *padded, temperature)
            assert torch.equal(new[0], old[0]), "StaticCache decoding changed the tokens"
            # Not bit-equal: attention reduces over L + 6 slots instead of L + step + 1, so
            # vectorised sums round differently (a few fp32 ulps: ~2e-6 on log-probs of ~40).
            torch.testing.assert_close(new[1], old[1], atol=1e-5, rtol=0)
            torch.testing.assert_close(new[2], old[2], atol=1e-5, rtol=0)
            largest = max(largest, (new[1] - old[1]).abs().max().item())
    return largest


def act_seconds(agent: ActorCritic, batch_size: int, seconds: float,
                rounds: int = 3) -> tuple[float, float]:
    """(old, new) CPU seconds per act() call at temperature 1: the best of `rounds` alternating
    measurements, so a busy neighbour on a shared machine slows both alike."""
    images, instructions = observations(batch_size, agent.image_size)
    old, new = [], []
    for _ in range(rounds):
        with dynamic_cache_decoding(agent):
            old.append(timed_calls(lambda: agent.act(images, instructions, 1.0), seconds)[1])
        new.append(timed_calls(lambda: agent.act(images, instructions, 1.0), seconds)[1])
    return min(old), min(new)


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

    # The preallocated cache against the DynamicCache loop it replaced: same samples, then time.
    difference = check_same_samples(agent, 64)
    old, new = act_seconds(agent, 64, args.seconds)
    print(f"RESULT act() batch 64, StaticCache + one sync vs DynamicCache + sync per token: "
          f"{new * 1e3:.1f} vs {old * 1e3:.1f} CPU-ms per call ({old / new:.2f}x); same tokens, "
          f"log-probs within {difference:.1e} (left- and right-padded prompts, T = 1 and 0)")

    # Adapters folded into the weights (evaluate_ood.py) against apart: the same samples, then time.
    merged_speedup, largest = merged_act_speedup(agent, 32, args.seconds)
    print(f"RESULT act() batch 32, LoRA merged into the weights vs apart: {merged_speedup:.2f}x faster; "
          f"same tokens, log-probs within {largest:.1e}")


def merged_act_speedup(agent: ActorCritic, batch_size: int, min_seconds: float) -> tuple[float, float]:
    """(apart / merged seconds per act(), largest log-prob difference) on adapters moved off B = 0."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in agent.lora_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    images, instructions = observations(batch_size, agent.image_size)
    samples = []
    for merge in (False, True):
        if merge:
            agent.policy.merge_adapter()
        torch.manual_seed(1)
        samples.append(agent.act(images, instructions, 0.6))
        samples.append(timed_calls(lambda: agent.act(images, instructions, 0.6), min_seconds)[1])
    agent.policy.unmerge_adapter()
    (apart, apart_seconds), (merged, merged_seconds) = samples[:2], samples[2:]
    if not torch.equal(apart.tokens, merged.tokens):
        raise SystemExit("merged adapters sampled other tokens than adapters apart")
    return apart_seconds / merged_seconds, float((apart.logprob - merged.logprob).abs().max())


if __name__ == "__main__":
    main()
