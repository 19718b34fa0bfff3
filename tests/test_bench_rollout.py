"""The benchmarks' code paths, without timing anything.

VecEnv.step_async + step_wait (used by benchmarks/bench_rollout.py's pipelined rollout) must give
what step gives through a worker process, and must refuse a call between the two. One worker
holding both envs: a second worker doubles the test's time on 2 busy cores, and replies from
several workers are gathered by the code every call shares, which test_envs.py's
test_vec_env_interface_with_worker_processes runs with 2 workers.

The other benchmarks run their building blocks once at SIZE px: bench_sampling's KV-cache check
(cached and uncached greedy decoding give the same tokens), bench_update's PPO update step and
its meta-device parameter count, bench_rollout's env-only and policy-only parts on the twin.
"""

import importlib.util
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, SIZE

from envs import make_vec_env
from model import build_tiny_vla

STEPS, IDS = 3, [5, 11]


def load_benchmark(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # bench_update pickles its worker specs by module name
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_step_async_then_wait_matches_step_through_a_worker():
    actions = np.random.default_rng(0).uniform(-1, 1, (STEPS, len(IDS), 7)).astype(np.float32)
    envs = make_vec_env("ind", num_envs=len(IDS), image_size=SIZE, num_workers=1)
    options = {"episode_ids": IDS}
    try:
        envs.reset(options=options)
        stepped = [envs.step(a) for a in actions]
        envs.reset(options=options)
        pipelined = []
        for a in actions:
            envs.step_async(a)
            a[:] = 0  # the actions were sent: reusing the array must not change this step
            pipelined.append(envs.step_wait())
        for (obs, reward, term, trunc, info), (obs2, reward2, term2, trunc2, info2) in zip(
                stepped, pipelined, strict=True):
            np.testing.assert_array_equal(obs["image"], obs2["image"])
            assert obs["instruction"] == obs2["instruction"]
            np.testing.assert_array_equal(reward, reward2)
            np.testing.assert_array_equal(term, term2)
            np.testing.assert_array_equal(trunc, trunc2)
            for key in info:
                np.testing.assert_array_equal(info[key], info2[key])
        envs.step_async(actions[0])
        with pytest.raises(RuntimeError, match="step_wait"):
            envs.reset(options=options)  # would read the step's replies: refused, the pipes stay in sync
        envs.step_wait()
        with pytest.raises(RuntimeError, match="without step_async"):
            envs.step_wait()
        assert envs.reset(options=options)[0]["image"].shape == (len(IDS), SIZE, SIZE, 3)
    finally:
        envs.close()


def test_bench_rollout_parts_run_on_the_twin():
    bench = load_benchmark("bench_rollout")
    agent = bench.build_agent(image_size=SIZE)
    envs = make_vec_env("ind", 2, SIZE, env="twin", max_episode_steps=STEPS)
    actions = np.zeros((STEPS, 2, 7), np.float32)
    reset_seconds, step_seconds, observations = bench.env_only(envs, np.array(IDS), actions)
    assert reset_seconds >= 0 and step_seconds >= 0 and len(observations) == STEPS
    assert observations[0]["image"].shape == (2, SIZE, SIZE, 3)
    bench.policy_only(agent, observations)


def test_bench_sampling_kv_cache_decodes_the_same_tokens():
    bench = load_benchmark("bench_sampling")
    agent = bench.build_agent(image_size=SIZE)
    cached, uncached, length = bench.decode_seconds(agent, batch_size=3, seconds=0.01)  # asserts equality
    assert cached > 0 and uncached > 0 and length > agent.vla.num_patches


def test_bench_update_step_trains_lora_and_value_head():
    bench = load_benchmark("bench_update")
    agent = bench.build_bench_agent("tiny", "h0", SIZE, torch.device("cpu"), seed=0)
    optimizer = bench.make_optimizer(agent)
    before = [p.detach().clone() for p in agent.trainable_parameters()]
    bench.ppo_update_step(agent, optimizer, bench.make_minibatches(agent, minibatch_size=2, count=2, seed=0))
    moved = [not torch.equal(p, q) for p, q in zip(agent.trainable_parameters(), before, strict=True)]
    assert any(moved) and all(torch.isfinite(p).all() for p in agent.trainable_parameters())
    counts = bench.count_parameters(agent)
    assert counts.lora == sum(p.numel() for p in agent.lora_parameters()) and counts.value_head > 0


def test_bench_update_dry_run_counts_parameters_on_the_meta_device(capsys):
    bench = load_benchmark("bench_update")
    bench.dry_run("tiny", SIZE)
    out = capsys.readouterr().out
    total = sum(p.numel() for p in build_tiny_vla(SIZE)[0].parameters())
    assert f"{total:,} base weights" in out and "critic=separate" in out
    assert f"RESULT tiny scale: {total / 1e6:.2f}M parameters" in out
