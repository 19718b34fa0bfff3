"""Tests of act()'s decode loop (ActorCritic.sample_action_tokens): the preallocated KV cache
and the single finiteness check after the loop. act() against score_actions() on padded batches
of different prompt lengths is tested in test_common.py; these cover what the loop's own design
could break, and compare it with the DynamicCache loop it replaced (kept in
benchmarks/bench_sampling.py). Tiny preset at SIZE px, CPU."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator

import pytest
import torch
from conftest import LONG, REPO, SHORT, SIZE, observations

import common
from common import NonFiniteError

# Python-level ways to read a tensor's value on the host: on a GPU each one waits for it.
HOST_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__")


@pytest.mark.parametrize("instructions", [[SHORT], [LONG] * 3], ids=["batch 1", "no padding"])
def test_unpadded_batches_sample_what_score_actions_scores(agent, instructions: list[str]) -> None:
    # Without padding the attention-mask code takes other branches (sdpa's is_causal at prefill).
    images = observations(len(instructions), seed=2)
    torch.manual_seed(0)
    out = agent.act(images, instructions, 1.0)
    with torch.no_grad():
        logprob, _, value = agent.score_actions(images, instructions, out.tokens)
    torch.testing.assert_close(logprob, out.logprob, atol=1e-5, rtol=0)
    torch.testing.assert_close(value, out.value, atol=1e-5, rtol=0)


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_one_diverged_row_raises_the_named_error_not_a_sampling_error(agent,
                                                                       temperature: float) -> None:
    # A nan in one prompt: its logits are nan at every step, the others' stay finite. Sampling
    # must get through the loop to the check after it (torch.multinomial rejects nan).
    with torch.no_grad():
        inputs = agent.prepare_inputs(observations(3), [SHORT, LONG, LONG])
        embeds = agent.vla.embed_inputs(inputs.pixel_values, inputs.input_ids)
        embeds[1, -1] = float("nan")
        with pytest.raises(NonFiniteError, match="action_logits is nan at iteration 5") as info:
            agent.sample_action_tokens(embeds, inputs.attention_mask, temperature, "iteration 5")
    assert "\n" not in str(info.value)


@pytest.fixture
def host_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Names of the host reads made while the fixture is active (counted by wrapping them)."""
    seen: list[str] = []

    def counted(name: str):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            seen.append(name)
            return original(self, *args, **kwargs)
        return wrapper

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, counted(name))
    yield seen


def reads_while_decoding(agent, num_tokens: int, monkeypatch: pytest.MonkeyPatch,
                         seen: list[str]) -> list[str]:
    """Host reads during sample_action_tokens decoding num_tokens tokens (1 prefill + the rest
    one-token steps), from the same prompts."""
    with torch.no_grad():
        inputs = agent.prepare_inputs(observations(2), [SHORT, LONG])
        embeds = agent.vla.embed_inputs(inputs.pixel_values, inputs.input_ids)
    monkeypatch.setattr(common, "ACTION_DIM", num_tokens)  # the loop's length
    seen.clear()
    with torch.no_grad():
        tokens, _, _ = agent.sample_action_tokens(embeds, inputs.attention_mask, 1.0)
    assert tokens.shape == (2, num_tokens)
    return list(seen)


def test_the_decode_loop_never_reads_a_tensor_on_the_host(agent, host_reads: list[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # Each such read is a GPU sync: the prefill and the final check may read, the steps not.
    # (Only Python-level reads are seen; on a GPU, torch.cuda.set_sync_debug_mode sees all.)
    two = reads_while_decoding(agent, 2, monkeypatch, host_reads)
    seven = reads_while_decoding(agent, 7, monkeypatch, host_reads)
    assert seven == two, f"5 more decode steps read {len(seven) - len(two)} more tensors"
    assert two.count("item") == 1  # the one finiteness check


def test_the_static_cache_samples_what_the_dynamic_cache_sampled() -> None:
    spec = importlib.util.spec_from_file_location("bench_sampling",
                                                  REPO / "benchmarks" / "bench_sampling.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    agent = bench.build_agent(image_size=SIZE)
    # Same seed, left- and right-padded prompts of 4 lengths, T = 1 and 0: the same tokens, and
    # log-probs and hidden states to 1e-5 (asserted inside); in fact a few fp32 ulps apart.
    assert bench.check_same_samples(agent, batch_size=4) < 1e-5
