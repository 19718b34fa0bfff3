"""Tests of common.py: the actor-critic (act / score_actions agreement, LoRA, critics, the frozen
reference), each script's start-up (fresh, --init-checkpoint, --resume), the episode loop, checkpoints
(atomic, strict, tidy) and the finite checks. Tiny preset at SIZE px, CPU, no download."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    LONG,
    SHORT,
    SIZE,
    FakeVecEnv,
    observations,
    perturb,
    save_trained_checkpoint,
    tiny_agent,
)
from safetensors.torch import load_file, save_file

import cli
import common
import dpo_vla
import grpo_vla
import ppo_vla
import sft_warmup
from common import (
    ACTION_DIM,
    CheckpointError,
    EpisodeLoop,
    NonFiniteError,
    NormStats,
    build_agent,
    check_finite,
    load_checkpoint,
    save_checkpoint,
)
from envs import make_vec_env
from model import TINY_IMAGE_SIZE, position_ids_from_mask, run_language_model

CPU = torch.device("cpu")


# ---------------------------------------------------------------------------- act and score


def test_h0_is_the_hidden_state_of_the_last_prompt_token(agent) -> None:
    images = observations(2)
    out = agent.act(images, [SHORT, LONG], temperature=0.0)
    with torch.no_grad():  # an independent full forward over the prompt only
        inputs = agent.prepare_inputs(images, [SHORT, LONG])
        embeds = agent.vla.embed_inputs(inputs.pixel_values, inputs.input_ids)
        hidden = run_language_model(agent.vla, embeds, inputs.attention_mask,
                                    position_ids_from_mask(inputs.attention_mask))
        h0 = hidden[:, -1]
        value = agent.value_head(h0).squeeze(-1)
        first_token = agent.action_logits(h0).argmax(-1) + agent.action_tokenizer.first_id
        wrong = agent.value_head(hidden[:, -2]).squeeze(-1)
    torch.testing.assert_close(out.value, value, atol=1e-5, rtol=0)
    assert not torch.allclose(out.value, wrong, atol=1e-5)
    assert out.tokens[:, 0].tolist() == first_token.tolist()


def test_a_sample_does_not_change_when_batched_with_a_longer_prompt(agent) -> None:
    images = observations(3)
    alone = agent.act(images[:1], [SHORT], temperature=0.0)
    batched = agent.act(images, [SHORT, LONG, LONG + " and " + LONG], temperature=0.0)
    assert batched.tokens[0].tolist() == alone.tokens[0].tolist()
    torch.testing.assert_close(batched.value[:1], alone.value, atol=1e-5, rtol=0)
    torch.testing.assert_close(batched.logprob[:1], alone.logprob, atol=1e-5, rtol=0)

    tokens = batched.tokens
    with torch.no_grad():
        lp_alone, ent_alone, v_alone = agent.score_actions(images[:1], [SHORT], tokens[:1])
        lp, ent, v = agent.score_actions(images, [SHORT, LONG, LONG + " and " + LONG], tokens)
    torch.testing.assert_close(lp[:1], lp_alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent[:1], ent_alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(v[:1], v_alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
def test_sampled_logprob_equals_teacher_forced_logprob(agent, temperature: float) -> None:
    images = observations(4, seed=1)
    instructions = [SHORT, LONG, "move to the red square", "pick up the spoon"]
    torch.manual_seed(0)
    out = agent.act(images, instructions, temperature)
    with torch.no_grad():
        logprob, entropy, value = agent.score_actions(images, instructions, out.tokens, temperature)
    torch.testing.assert_close(logprob, out.logprob, atol=1e-5, rtol=0)
    torch.testing.assert_close(value, out.value, atol=1e-5, rtol=0)
    assert (entropy > 0).all() and (entropy <= ACTION_DIM * np.log(256) + 1e-4).all()
    assert out.actions.dtype == np.float32 and out.actions.shape == (4, ACTION_DIM)
    expected = agent.norm_stats.unnormalize(agent.action_tokenizer.decode(out.tokens.numpy()))
    np.testing.assert_array_equal(out.actions, expected)
    if temperature == 0.0:  # greedy: every token the most likely one, scored at T = 1
        again = agent.act(images, instructions, 0.0)
        assert torch.equal(again.tokens, out.tokens)


def test_sampled_tokens_are_always_action_ids(agent) -> None:
    # At a high temperature the full-vocabulary softmax would mostly pick text ids.
    first = agent.action_tokenizer.first_id
    torch.manual_seed(0)
    seen = set()
    for seed in range(3):
        tokens = agent.act(observations(16, seed), [LONG] * 16, temperature=5.0).tokens
        assert ((tokens >= first) & (tokens < first + 256)).all()
        seen |= set(tokens.flatten().tolist())
    assert len(seen) > 100  # and sampling really spreads over the 256 bins
    with pytest.raises(ValueError, match="action ids"):
        agent.score_actions(observations(1), [SHORT], torch.full((1, 7), first - 1))
    with pytest.raises(ValueError, match="temperature"):
        agent.act(observations(1), [SHORT], temperature=float("nan"))


def test_only_lora_and_value_head_train_and_all_get_gradients(agent) -> None:
    trainable = {name for name, p in agent.named_parameters() if p.requires_grad}
    assert trainable == {name for name, _ in agent.named_parameters()
                         if "lora_" in name or name.startswith("value_head.")}
    assert len(agent.lora_parameters()) + len(agent.value_head_parameters()) == len(trainable)
    assert len(agent.trainable_parameters()) == len(trainable)
    # Adapters on every linear layer that runs: both towers, projector, attention, MLP and lm_head.
    lora_a = {name for name in trainable if "lora_A" in name}
    for part in ["featurizer.blocks.0.attn.qkv", "fused_featurizer.blocks.1.mlp.fc2",
                 "projector.fc1", "projector.fc3", "layers.0.self_attn.q_proj",
                 "layers.3.mlp.down_proj", "language_model.lm_head"]:
        assert any(part in name for name in lora_a), part
    assert agent.lora_config.r == 32 and agent.lora_config.lora_alpha == 16

    agent.zero_grad()
    logprob, entropy, value = agent.score_actions(observations(2), [SHORT, LONG],
                                                  agent.act(observations(2), [SHORT, LONG]).tokens)
    (logprob.sum() + value.sum()).backward()
    for name, p in agent.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    agent.zero_grad()


@pytest.mark.parametrize("critic", ["last", "concat", "separate"])
def test_other_critics_agree_between_act_and_score_actions(critic: str) -> None:
    agent = tiny_agent(critic=critic)
    perturb(agent.value_head_parameters(), scale=0.1)
    images, instructions = observations(2), [SHORT, LONG]
    out = agent.act(images, instructions)
    with torch.no_grad():
        logprob, _, value = agent.score_actions(images, instructions, out.tokens)
    torch.testing.assert_close(logprob, out.logprob, atol=1e-5, rtol=0)
    torch.testing.assert_close(value, out.value, atol=1e-5, rtol=0)
    if critic == "separate":  # its own adapters: they move the value, never the policy
        critic_lora = [p for n, p in agent.named_parameters() if "critic_model" in n and "lora_" in n]
        assert critic_lora and all(p.requires_grad for p in critic_lora)
        perturb(critic_lora, seed=1, scale=0.5)
        with torch.no_grad():
            logprob2, _, value2 = agent.score_actions(images, instructions, out.tokens)
        torch.testing.assert_close(logprob2, logprob)
        assert not torch.allclose(value2, value)


def test_an_agent_without_critic_has_no_value_head_and_no_values() -> None:
    agent = tiny_agent(critic=None)
    assert agent.value_head is None and agent.critic_model is None and agent.critic_mode is None
    assert agent.value_head_parameters() == []
    assert {n for n, p in agent.named_parameters() if p.requires_grad} == \
        {n for n, _ in agent.named_parameters() if "lora_" in n}
    out = agent.act(observations(2), [SHORT, LONG])
    assert out.value is None and out.logprob.shape == (2,)
    assert agent.score_actions(observations(2), [SHORT, LONG], out.tokens)[2] is None
    with pytest.raises(ValueError, match="critic"):
        build_agent(image_size=SIZE, critic="h1")


def test_reference_logprob_is_the_policy_frozen_at_the_start(agent) -> None:
    images, instructions = observations(2), [SHORT, LONG]
    tokens = agent.act(images, instructions).tokens
    with pytest.raises(RuntimeError, match="freeze_reference"):
        tiny_agent().reference_logprob(images, instructions, tokens)
    trained = tiny_agent()  # the same start as `agent`
    trained.freeze_reference()
    with torch.no_grad():
        start, _, _ = trained.score_actions(images, instructions, tokens)
    perturb(trained.lora_parameters(), seed=5)  # training moves the adapters on
    with torch.no_grad():
        moved, _, _ = trained.score_actions(images, instructions, tokens)
    reference = trained.reference_logprob(images, instructions, tokens)
    # The reference is the starting adapters (a trained policy here), not the base, and not
    # the moving policy.
    torch.testing.assert_close(reference, start, atol=1e-5, rtol=0)
    assert not torch.allclose(reference, moved, atol=1e-3)
    base, _, _ = tiny_agent(perturbed=False).score_actions(images, instructions, tokens)
    assert not torch.allclose(reference, base.detach(), atol=1e-3)
    with torch.no_grad():  # the live adapters are back on afterwards
        torch.testing.assert_close(trained.score_actions(images, instructions, tokens)[0], moved)
    # Resuming: the reference comes from saved weights, whatever the adapters are now.
    resumed = tiny_agent(perturbed=False)
    resumed.freeze_reference(trained.reference_lora)
    torch.testing.assert_close(resumed.reference_logprob(images, instructions, tokens), start,
                               atol=1e-5, rtol=0)


def test_images_of_another_size_are_resized(agent) -> None:
    out = agent.act(observations(2, size=SIZE + 30), [SHORT, LONG])
    assert out.tokens.shape == (2, ACTION_DIM)


def test_non_finite_logits_stop_sampling_with_a_named_error() -> None:
    agent = tiny_agent(critic=None)
    with torch.no_grad():
        agent.lora_parameters()[-1].fill_(float("nan"))  # lm_head's adapter
    with pytest.raises(NonFiniteError, match="action_logits is nan at iteration 7") as info:
        agent.as_policy(1.0, "iteration 7")({"image": observations(2), "instruction": (SHORT, LONG)})
    assert "\n" not in str(info.value)


def test_check_finite_names_the_quantity_and_where() -> None:
    check_finite("step 1", loss=1.0, grad_norm=torch.tensor(3.0))
    with pytest.raises(NonFiniteError, match="grad_norm is inf at step 4") as info:
        check_finite("step 4", loss=1.0, grad_norm=torch.tensor(float("inf")))
    assert "\n" not in str(info.value)
    with pytest.raises(NonFiniteError, match="loss is nan at iteration 2"):
        check_finite("iteration 2", loss=float("nan"))


def test_resolve_device_refuses_a_missing_gpu() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert common.resolve_device("auto") == CPU
    with pytest.raises(ValueError, match="no CUDA GPU"):
        common.resolve_device("cuda")


def fake_nvidia_smi(directory: Path, monkeypatch: pytest.MonkeyPatch, works: bool) -> None:
    """An `nvidia-smi` first on PATH: one that lists a GPU, or one whose driver fails."""
    script = directory / "nvidia-smi"
    script.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)'\n" if works else
                      "#!/bin/sh\necho 'NVIDIA-SMI has failed because it could not communicate with the driver' >&2\n"
                      "exit 9\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{directory}:{os.environ['PATH']}")


def test_a_gpu_that_torch_cannot_use_is_an_error_not_a_silent_cpu_run(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # The pinned wheel is a recent CUDA build: on an older driver torch sees no GPU, and "auto"
    # used to run the 7B on the CPU in fp32 without a word.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(cli, "DEVICE_FILES", tmp_path)  # no /dev/nvidia0 here: nvidia-smi decides
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    fake_nvidia_smi(tmp_path, monkeypatch, works=True)
    assert cli.nvidia_gpu_present()
    for name in ("auto", "cuda", "cuda:0"):
        with pytest.raises(ValueError, match="has an NVIDIA GPU but torch .* cannot use it.*--device cpu"):
            common.resolve_device(name)
    assert common.resolve_device("cpu") == CPU, "on purpose, the CPU still runs"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # every GPU hidden on purpose: the CPU, silently
    assert common.resolve_device("auto") == CPU
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    fake_nvidia_smi(tmp_path, monkeypatch, works=False)  # a broken driver: no usable GPU either way
    assert not cli.nvidia_gpu_present()
    assert common.resolve_device("auto") == CPU
    (tmp_path / "nvidia0").touch()  # the driver's device file: a GPU this process can open
    (tmp_path / "nvidiactl").touch()
    assert cli.nvidia_gpu_present()


def test_device_names_torch_does_not_know_are_one_line_errors() -> None:
    for name, expected in (("tpu", "not a device torch knows"), ("meta", "run on cpu or cuda")):
        with pytest.raises(ValueError, match=expected):
            common.resolve_device(name)


def fake_gpus(monkeypatch: pytest.MonkeyPatch, count: int) -> list:
    """torch.cuda as a host with `count` GPUs shows it (no GPU is touched): returns the list of
    (call, argument) made to set_device / set_rng_state."""
    calls: list = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": torch.tensor([7], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": calls.append(("set_rng_state", state)))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("saves every GPU's state"))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda s: pytest.fail("restores every GPU's state"))
    return calls


def test_init_distributed_picks_the_rank_s_gpu_and_the_backend_of_its_device(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_gpus(monkeypatch, count=2)
    joined: list[str] = []
    monkeypatch.setattr(common.dist, "init_process_group", lambda backend: joined.append(backend))
    monkeypatch.setattr(common.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(common.dist, "get_world_size", lambda: 2)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    for name in ("auto", "cuda"):
        calls.clear()
        assert common.init_distributed(name) == (1, 2, torch.device("cuda", 1))
        assert calls == [("set_device", torch.device("cuda", 1))]
        assert joined.pop() == "cpu:gloo,cuda:nccl"
    # --device cpu on a GPU host (as tests/test_distributed.py runs): gloo only, no GPU touched.
    calls.clear()
    assert common.init_distributed("cpu") == (1, 2, CPU)
    assert joined.pop() == "cpu:gloo" and calls == []
    with pytest.raises(ValueError, match="only 2 GPU"):
        common.init_distributed("cuda:5")
    # A launcher that shows each rank only its own GPU (SLURM): local rank 1 sees one, device 0.
    fake_gpus(monkeypatch, count=1)
    assert common.init_distributed("auto") == (1, 2, torch.device("cuda", 0))


def test_a_run_resumes_on_a_host_with_another_number_of_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_gpus(monkeypatch, count=1)
    state = common.rng_state()
    assert torch.equal(state["cuda"], torch.tensor([7], dtype=torch.uint8)), "this rank's GPU only"
    common.restore_rng_state([state])
    assert calls == [("set_rng_state", state["cuda"])]
    # A checkpoint written before on a 4-GPU host held every GPU's state: rank 0 takes GPU 0's.
    calls.clear()
    old = {**state, "cuda": [torch.tensor([i], dtype=torch.uint8) for i in range(4)]}
    common.restore_rng_state([old])
    assert len(calls) == 1 and torch.equal(calls[0][1], torch.tensor([0], dtype=torch.uint8))


# ---------------------------------------------------------------------------- how a run starts


def start(module, args) -> tuple:
    """A script's own start-up, as its main() runs it -> (its flags, agent, trainer state)."""
    if module is sft_warmup:
        args = sft_warmup.check_start(args, CPU)
        return (args, *sft_warmup.init_agent(args, CPU))
    return module.init_agent(args, CPU)


def script_args(module, tmp_path: Path, **overrides):
    """A script's Args for a run on the twin in tmp_path/runs/run (SFT: demos in tmp_path/demos)."""
    defaults = {"env": "twin", "device": "cpu", "output_dir": str(tmp_path / "runs"), "exp_name": "run"}
    if module is sft_warmup:
        defaults["demo_dir"] = str(tmp_path / "demos")
    return module.Args(**{**defaults, **overrides})


def lora_state(agent: common.ActorCritic) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in agent.policy.named_parameters() if "lora_" in n}


def test_fresh_agents_follow_the_flags(tmp_path: Path) -> None:
    agent, state = start(ppo_vla, script_args(ppo_vla, tmp_path, image_size=SIZE, lora_rank=8, critic="last"))[1:]
    assert state == {} and agent.image_size == SIZE and agent.critic_mode == "last"
    assert agent.lora_config.r == 8 and agent.lora_config.lora_alpha == common.DEFAULT_LORA_ALPHA
    default, _ = start(ppo_vla, script_args(ppo_vla, tmp_path, image_size=SIZE))[1:]
    assert default.critic_mode == "h0" and default.lora_config.r == common.DEFAULT_LORA_RANK
    for module, algorithm in ((grpo_vla, "grpo"), (dpo_vla, "dpo"), (sft_warmup, "sft")):
        agent, _ = start(module, script_args(module, tmp_path, image_size=SIZE))[1:]
        assert agent.value_head is None and agent.critic_model is None, algorithm


@pytest.mark.parametrize("flag, value, saved", [("lora_rank", 8, 32), ("lora_alpha", 32, 16),
                                                ("image_size", 2 * SIZE, SIZE)])
def test_init_checkpoint_refuses_a_contradicting_architecture_flag(tmp_path: Path, flag: str, value: int,
                                                                   saved: int) -> None:
    checkpoint = save_trained_checkpoint(tmp_path / "sft" / "checkpoint", "sft")
    args = script_args(ppo_vla, tmp_path, init_checkpoint=str(checkpoint), **{flag: value})
    with pytest.raises(CheckpointError) as info:
        start(ppo_vla, args)[1:]
    message = str(info.value)
    assert f"--{flag.replace('_', '-')} {value} (checkpoint: {saved})" in message
    assert "--init-checkpoint" in message and "\n" not in message
    # The same flag with the checkpoint's own value is fine.
    agent, _ = start(ppo_vla, script_args(ppo_vla, tmp_path, init_checkpoint=str(checkpoint), **{flag: saved}))[1:]
    assert agent.image_size == SIZE


def test_the_script_reports_a_contradicting_flag_in_one_line(tmp_path: Path) -> None:
    checkpoint = save_trained_checkpoint(tmp_path / "sft" / "checkpoint", "sft")
    args = script_args(ppo_vla, tmp_path, init_checkpoint=str(checkpoint), lora_rank=8, lora_alpha=8)
    with pytest.raises(SystemExit) as info:
        common.run_script(ppo_vla.main, args, "ppo", tmp_path / "runs" / "run")
    message = str(info.value.code)
    assert message.startswith("error: --lora-rank 8 (checkpoint: 32), --lora-alpha 8 (checkpoint: 16)")
    assert "\n" not in message
    assert not (tmp_path / "runs" / "run").exists(), "nothing was started"


def test_init_checkpoint_takes_the_adapter_and_the_architecture(tmp_path: Path) -> None:
    checkpoint = save_trained_checkpoint(tmp_path / "ppo" / "checkpoint", "ppo", critic="h0", lora_rank=8)
    saved, _ = load_checkpoint(checkpoint)
    agent, state = start(ppo_vla, script_args(ppo_vla, tmp_path, init_checkpoint=str(checkpoint)))[1:]
    assert state == {}, "a new run: no optimizer, iteration or RNG from the checkpoint"
    assert agent.lora_config.r == 8 and agent.image_size == SIZE and agent.critic_mode == "h0"
    for (name, p), q in zip(lora_state(agent).items(), lora_state(saved).values(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
    for p, q in zip(agent.value_head_parameters(), saved.value_head_parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)  # PPO keeps a value head of its mode


@pytest.mark.parametrize("module, algorithm", [(grpo_vla, "grpo"), (dpo_vla, "dpo"), (sft_warmup, "sft")])
def test_critic_free_algorithms_drop_a_separate_critic(tmp_path: Path, module, algorithm: str) -> None:
    checkpoint = save_trained_checkpoint(tmp_path / "ppo" / "checkpoint", "ppo", critic="separate")
    saved, _ = load_checkpoint(checkpoint)
    assert saved.critic_model is not None
    agent, _ = start(module, script_args(module, tmp_path, init_checkpoint=str(checkpoint)))[1:]
    assert agent.value_head is None and agent.critic_model is None and agent.critic_mode is None
    # No second backbone: as many weights as a fresh critic-free agent.
    fresh = tiny_agent(critic=None, perturbed=False)
    assert sum(p.numel() for p in agent.parameters()) == sum(p.numel() for p in fresh.parameters())
    for (name, p), q in zip(lora_state(agent).items(), lora_state(saved).values(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)  # the policy's adapter, not the critic's


def test_ppo_from_an_sft_checkpoint_gets_a_new_value_head_and_says_so(tmp_path: Path, capsys) -> None:
    checkpoint = save_trained_checkpoint(tmp_path / "sft" / "checkpoint", "sft", critic=None)
    agent, _ = start(ppo_vla, script_args(ppo_vla, tmp_path, init_checkpoint=str(checkpoint)))[1:]
    assert agent.critic_mode == "h0" and agent.value_head is not None
    err = capsys.readouterr().err
    assert err.startswith("note:") and "no value head" in err and "'h0'" in err
    # A fresh head, drawn from --seed as a fresh agent's is.
    for seed in (0, 1):
        agent, _ = start(ppo_vla, script_args(ppo_vla, tmp_path, init_checkpoint=str(checkpoint), seed=seed))[1:]
        fresh = build_agent(image_size=SIZE, critic="h0", seed=seed)
        for p, q in zip(agent.value_head_parameters(), fresh.value_head_parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=0, atol=0)
    capsys.readouterr()
    # Another mode than the checkpoint's: a new head too.
    checkpoint = save_trained_checkpoint(tmp_path / "ppo" / "checkpoint", "ppo", critic="h0")
    agent, _ = start(ppo_vla, script_args(ppo_vla, tmp_path, init_checkpoint=str(checkpoint), critic="concat"))[1:]
    assert agent.critic_mode == "concat"
    assert "has a 'h0' value head; a new 'concat' value head" in capsys.readouterr().err


def run_checkpoint(tmp_path: Path, algorithm: str, critic: str | None) -> Path:
    """A checkpoint where a run named "run" in tmp_path/runs keeps it (what --resume reads)."""
    return save_trained_checkpoint(tmp_path / "runs" / "run" / "checkpoint", algorithm, critic=critic)


def test_resume_continues_exactly_and_refuses_other_flags(tmp_path: Path) -> None:
    run_checkpoint(tmp_path, "ppo", "h0")
    saved, _ = load_checkpoint(tmp_path / "runs" / "run" / "checkpoint")
    agent, state = start(ppo_vla, script_args(ppo_vla, tmp_path, resume=True))[1:]
    assert state["iteration"] == 1 and agent.critic_mode == "h0"
    for p, q in zip(agent.trainable_parameters(), saved.trainable_parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    for overrides, expected in (({"critic": "last"}, "--critic last (checkpoint: h0)"),
                                ({"lora_rank": 4}, "--lora-rank 4 (checkpoint: 32)"),
                                ({"image_size": 2 * SIZE}, f"--image-size {2 * SIZE} (checkpoint: {SIZE})")):
        with pytest.raises(CheckpointError, match="the run to resume") as info:
            start(ppo_vla, script_args(ppo_vla, tmp_path, resume=True, **overrides))[1:]
        assert expected in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("module, algorithm", [(grpo_vla, "grpo"), (dpo_vla, "dpo"), (sft_warmup, "sft")])
def test_resume_refuses_another_algorithms_checkpoint(tmp_path: Path, module, algorithm: str) -> None:
    run_checkpoint(tmp_path, "ppo", "h0")
    with pytest.raises(CheckpointError) as info:
        start(module, script_args(module, tmp_path, resume=True))[1:]
    message = str(info.value)
    assert f"is a ppo checkpoint, not {algorithm}" in message and "\n" not in message
    with pytest.raises(SystemExit) as exit_info:  # and the script says so in one line
        common.run_script(module.main, script_args(module, tmp_path, resume=True), algorithm,
                          tmp_path / "runs" / "run")
    assert str(exit_info.value.code) == f"error: {message}"
    assert not (tmp_path / "demos").exists(), "refused before any slow set-up (SFT's demonstrations)"


def test_resume_without_a_checkpoint_says_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist") as info:
        start(ppo_vla, script_args(ppo_vla, tmp_path, resume=True))[1:]
    assert str(tmp_path / "runs" / "run" / "checkpoint") in str(info.value)


def test_planned_image_size_reads_flags_and_json_only(tmp_path: Path) -> None:
    checkpoint = save_trained_checkpoint(tmp_path / "sft" / "checkpoint", "sft")
    assert common.planned_image_size(None, None, checkpoint) == SIZE
    assert common.planned_image_size(112, None, checkpoint) == 112
    assert common.planned_image_size(None, None) == TINY_IMAGE_SIZE  # the tiny default


# ---------------------------------------------------------------------------- the episode loop


def test_episode_loop_records_resets_and_episodes(agent) -> None:
    envs = FakeVecEnv()  # horizon 4
    id_batches = iter([[10, 11, 12], [20, 21, 22]])
    rollout = EpisodeLoop(envs, lambda: next(id_batches)).run(agent.as_policy(1.0), num_steps=6)
    T, N = 6, 3
    assert rollout.images.shape == (T, N, SIZE, SIZE, 3) and rollout.images.dtype == torch.uint8
    assert rollout.tokens.shape == (T, N, 7) and rollout.tokens.dtype == torch.long
    for name in ("logprobs", "values", "rewards"):
        assert getattr(rollout, name).shape == (T, N)
    assert len(rollout.instructions) == T and rollout.instructions[0][2] == "move to the square number 2"
    assert rollout.dones.dtype == torch.bool and rollout.dones.any(1).tolist() == [0, 0, 0, 1, 0, 0]
    assert envs.reset_ids == [[10, 11, 12], [20, 21, 22]]  # at the start and after the done
    assert rollout.episode_ids[:4].eq(torch.tensor([10, 11, 12])).all()
    assert rollout.episode_ids[4:].eq(torch.tensor([20, 21, 22])).all()
    # Rewards follow the recorded actions; one finished episode per env, summed correctly.
    dx = agent.norm_stats.unnormalize(agent.action_tokenizer.decode(rollout.tokens.numpy()))[..., 0]
    np.testing.assert_array_equal(rollout.actions[..., 0], dx)
    assert torch.equal(rollout.rewards, torch.as_tensor((dx > 0).astype(np.float32)))
    np.testing.assert_allclose(rollout.episode_returns, rollout.rewards[:4].sum(0).numpy())
    np.testing.assert_array_equal(rollout.episode_success, dx[3] > 0)
    np.testing.assert_array_equal(rollout.episode_success_once, (dx[:4] > 0).any(0))
    assert rollout.last_obs is not None and rollout.final_images.shape == (N, SIZE, SIZE, 3)
    np.testing.assert_array_equal(rollout.final_images, rollout.last_obs["image"])
    # Flat views are time-major: sample b = t * N + n.
    assert rollout.flat("tokens").shape == (T * N, 7) and torch.equal(rollout.flat("tokens")[N + 1],
                                                                      rollout.tokens[1, 1])
    assert rollout.flat("instructions")[N + 2] == rollout.instructions[1][2]

    # Ending on a done: no pointless reset, nothing to carry over.
    envs = FakeVecEnv()
    rollout = EpisodeLoop(envs).run(agent.as_policy(1.0), num_steps=8)
    assert len(envs.reset_ids) == 2 and len(rollout.episode_returns) == 6
    assert rollout.last_obs is None


def test_episode_loop_carries_observations_across_calls() -> None:
    envs = FakeVecEnv(num_envs=2, max_episode_steps=5)
    rng = np.random.default_rng(0)
    loop = EpisodeLoop(envs, iter([[1, 2], [3, 4], [5, 6]]).__next__)
    seen = []
    policy = common.random_policy(rng)

    def remembering(obs: dict) -> common.ActOutput:
        seen.append(obs["image"].copy())
        return policy(obs)

    first = loop.run(remembering, 3)
    assert envs.reset_ids == [[1, 2]] and first.last_obs is not None
    second = loop.run(remembering, 3)  # steps 4 and 5 of the same episodes, then a new one
    np.testing.assert_array_equal(seen[3], first.final_images)  # went on from where it stopped
    assert envs.reset_ids == [[1, 2], [3, 4]]
    assert second.episode_ids[:, 0].tolist() == [1, 1, 3] and second.dones[:, 0].tolist() == [False, True, False]
    assert len(first.episode_returns) == 0 and len(second.episode_returns) == 2
    # An episode's return is summed across the two calls.
    np.testing.assert_allclose(second.episode_returns,
                               first.rewards.sum(0).numpy() + second.rewards[:2].sum(0).numpy())

    loop.restart()  # e.g. an evaluation reset the envs in between
    third = loop.run(remembering, 1)
    assert envs.reset_ids[-1] == [5, 6] and envs.steps == 1
    assert third.episode_ids[0].tolist() == [5, 6]


def test_episode_loop_stops_early_and_can_drop_images() -> None:
    envs = FakeVecEnv(num_envs=2, max_episode_steps=10)
    loop = EpisodeLoop(envs)
    rollout = loop.run(common.random_policy(np.random.default_rng(0)), 10, keep_images=False,
                       stop=lambda info: True)
    assert len(rollout.actions) == 1 and rollout.images is None and rollout.final_images is None
    assert rollout.tokens is None and rollout.logprobs is None and rollout.values is None
    assert rollout.last_obs is None  # the stopped episodes are abandoned: the next call resets
    loop.run(common.random_policy(np.random.default_rng(0)), 1)
    assert len(envs.reset_ids) == 2 and envs.steps == 1


def test_expert_and_random_policies_on_the_twin() -> None:
    envs = make_vec_env("ind", 8, SIZE, seed=0, env="twin")
    ids = np.arange(8)
    expert = EpisodeLoop(envs, lambda: ids).run(common.expert_policy(envs), envs.max_episode_steps,
                                                keep_images=False)
    random = EpisodeLoop(envs, lambda: ids).run(common.random_policy(np.random.default_rng(0)),
                                                envs.max_episode_steps, keep_images=False)
    assert expert.episode_success.all() and (expert.episode_returns >= 1.1 - 1e-6).all()  # grasp + success
    assert not random.episode_success.any()
    assert (np.abs(random.actions) <= 1).all() and random.actions.dtype == np.float32


# ---------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("critic", ["h0", "separate"])
def test_checkpoint_round_trip(tmp_path: Path, critic: str) -> None:
    stats = NormStats(q01=-0.3 * np.ones(7), q99=0.6 * np.ones(7))
    agent = tiny_agent(critic=critic, seed=3, norm_stats=stats)
    perturb(agent.value_head_parameters(), seed=2, scale=0.1)
    optimizer = torch.optim.AdamW(agent.trainable_parameters(), lr=1e-3)
    state = {"iteration": 7, "optimizer": optimizer.state_dict(), "rng": common.rng_state(),
             "algorithm": "ppo"}
    save_checkpoint(tmp_path / "checkpoint", agent, state)
    assert (tmp_path / "checkpoint" / "adapter" / "adapter_config.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]  # no temp dirs left behind

    loaded, loaded_state = load_checkpoint(tmp_path / "checkpoint", device="cpu")
    assert loaded_state["iteration"] == 7 and loaded.critic_mode == critic
    images, instructions = observations(3), [SHORT, LONG, "pick up the spoon"]
    before, after = agent.act(images, instructions, 0.0), loaded.act(images, instructions, 0.0)
    assert torch.equal(before.tokens, after.tokens)
    np.testing.assert_array_equal(before.actions, after.actions)
    torch.testing.assert_close(after.value, before.value, atol=0, rtol=0)
    torch.testing.assert_close(after.logprob, before.logprob, atol=0, rtol=0)
    np.testing.assert_array_equal(loaded.norm_stats.q01, stats.q01)
    # Without its critic (evaluation, GRPO): the same policy, nothing else built.
    policy_only, _ = load_checkpoint(tmp_path / "checkpoint", critic=None)
    assert policy_only.value_head is None and policy_only.critic_model is None
    assert torch.equal(policy_only.act(images, instructions, 0.0).tokens, before.tokens)


def test_checkpoint_write_is_atomic(tmp_path: Path, monkeypatch) -> None:
    agent = tiny_agent()
    path = tmp_path / "checkpoint"
    save_checkpoint(path, agent, {"iteration": 1, "algorithm": "ppo"})

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(common.torch, "save", crash)  # dies after the adapter was written
    with pytest.raises(OSError):
        save_checkpoint(path, agent, {"iteration": 2, "algorithm": "ppo"})
    with pytest.raises(OSError):
        save_checkpoint(tmp_path / "fresh", agent, {"iteration": 2, "algorithm": "ppo"})
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]  # no half checkpoint anywhere
    assert load_checkpoint(path)[1]["iteration"] == 1  # the old one is intact
    save_checkpoint(path, agent, {"iteration": 3, "algorithm": "ppo"})  # and overwriting works
    assert load_checkpoint(path)[1]["iteration"] == 3


def stale_temp_dir(parent: Path) -> Path:
    """What a save killed mid-write leaves: a half-filled .checkpoint.*.tmp directory."""
    tmp = parent / ".checkpoint.k1ll3d.tmp"
    (tmp / "adapter").mkdir(parents=True)
    (tmp / "adapter" / "adapter_model.safetensors").write_bytes(b"half")
    return tmp


def test_stale_temp_dirs_are_removed_by_the_next_save_or_load(tmp_path: Path) -> None:
    agent = tiny_agent()
    path = tmp_path / "checkpoint"
    tmp = stale_temp_dir(tmp_path)
    save_checkpoint(path, agent, {"iteration": 1, "algorithm": "ppo"})
    assert not tmp.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    tmp = stale_temp_dir(tmp_path)
    assert load_checkpoint(path)[1]["iteration"] == 1
    assert not tmp.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


def test_a_swap_cut_between_its_renames_is_recovered_on_load(tmp_path: Path, monkeypatch) -> None:
    agent = tiny_agent()
    path = tmp_path / "checkpoint"
    save_checkpoint(path, agent, {"iteration": 1, "algorithm": "ppo"})
    real_rename = Path.rename

    def killed_before_the_second_rename(self: Path, target):
        if Path(target) == path:  # the new checkpoint moving into place
            raise KeyboardInterrupt
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", killed_before_the_second_rename)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, agent, {"iteration": 2, "algorithm": "ppo"})
    monkeypatch.undo()
    assert not path.exists()
    (old,) = tmp_path.glob(".checkpoint.*.old")  # the previous checkpoint, moved aside
    assert load_checkpoint(path)[1]["iteration"] == 1  # put back, and loaded
    assert not old.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]

    # A leftover .old beside an intact checkpoint is just removed.
    stale = tmp_path / ".checkpoint.x.old"
    stale.mkdir()
    assert load_checkpoint(path)[1]["iteration"] == 1 and not stale.exists()


def test_non_finite_weights_are_never_saved(tmp_path: Path) -> None:
    agent = tiny_agent()
    path = tmp_path / "checkpoint"
    save_checkpoint(path, agent, {"iteration": 1, "algorithm": "ppo"})
    with torch.no_grad():
        agent.value_head_parameters()[0][0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="value_head") as info:
        save_checkpoint(path, agent, {"iteration": 2, "algorithm": "ppo"})
    assert "\n" not in str(info.value) and "previous checkpoint is kept" in str(info.value)
    loaded, state = load_checkpoint(path)
    assert state["iteration"] == 1
    assert all(torch.isfinite(p).all() for p in loaded.parameters())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


@pytest.mark.parametrize("file", ["adapter/adapter_model.safetensors", "value_head.safetensors"])
def test_loading_refuses_nan_weights_in_one_line(tmp_path: Path, file: str) -> None:
    path = tmp_path / "checkpoint"
    save_checkpoint(path, tiny_agent(), {"iteration": 1, "algorithm": "ppo"})
    tensors = load_file(path / file)
    name = sorted(tensors)[0]
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, path / file)
    with pytest.raises(CheckpointError, match="non-finite weights") as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_checkpoint_errors_are_one_clear_line(tmp_path: Path) -> None:
    agent = tiny_agent()
    path = tmp_path / "checkpoint"

    def expect(match: str, **kwargs) -> None:
        with pytest.raises(CheckpointError, match=match) as info:
            load_checkpoint(path, **kwargs)
        assert "\n" not in str(info.value)

    expect("does not exist")
    save_checkpoint(path, agent, {"iteration": 1, "algorithm": "ppo"})

    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(dict(config, base_fingerprint="0" * 16)))
    expect("different base weights")
    other = json.loads(json.dumps(config))
    other["model_config"]["text_config"]["hidden_size"] = 256
    (path / "config.json").write_text(json.dumps(other))
    expect("another model configuration")
    (path / "config.json").write_text('{"model_path": null, ')
    expect("config.json is corrupt")
    (path / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "lora"}))
    expect("config.json lacks lora")
    (path / "config.json").write_text(json.dumps(config))

    adapter = load_file(path / "adapter" / "adapter_model.safetensors")
    save_file(dict(list(adapter.items())[1:]), path / "adapter" / "adapter_model.safetensors")
    expect("adapter does not fit")
    save_file(adapter, path / "adapter" / "adapter_model.safetensors")

    data = (path / "value_head.safetensors").read_bytes()
    (path / "value_head.safetensors").write_bytes(data[: len(data) // 2])
    expect("value_head.safetensors is corrupt")
    save_file({"0.weight": torch.zeros(3, 3)}, path / "value_head.safetensors")  # another head
    expect("does not fit the value head of critic 'h0'")
    (path / "value_head.safetensors").write_bytes(data)
    (path / "trainer_state.pt").write_bytes(b"not a pickle")
    expect("trainer_state.pt is corrupt")
    (path / "adapter" / "adapter_model.safetensors").unlink()
    expect("missing adapter/adapter_model.safetensors")


def test_global_helpers_on_one_process() -> None:
    assert common.world_info() == (0, 1)
    np.testing.assert_array_equal(common.rank_slice(np.arange(5)), np.arange(5))
    assert common.global_mean([1.0, 2.0, 6.0]) == 3.0 and math.isnan(common.global_mean([]))
    mean, std = common.global_mean_std(torch.tensor([1.0, 2.0, 3.0]))
    assert (mean, std) == pytest.approx((2.0, 1.0))


def test_kl_from_base_estimates_the_joint_kl_of_the_seven_tokens(agent) -> None:
    # Its per-observation estimate (per-token KLs on a base-drawn prefix) must agree with the plain
    # Monte Carlo one, mean over base-drawn sequences of log pi_base(a) - log pi(a); and the base
    # itself (adapters off) is at 0 up to rounding (the cached decode's logits against one full forward).
    images = np.random.default_rng(0).integers(0, 256, (1, agent.image_size, agent.image_size, 3), np.uint8)
    images, instructions = np.repeat(images, 600, 0), ["put red cube on plate"] * 600
    torch.manual_seed(0)
    estimate = agent.kl_from_base(images, instructions)
    assert estimate.shape == (600,) and (estimate >= 0).all()
    with torch.no_grad():
        with agent.policy.disable_adapter():
            tokens = agent.act(images, instructions, 1.0).tokens
            base_logprob, _, _ = agent.score_actions(images, instructions, tokens)
        logprob, _, _ = agent.score_actions(images, instructions, tokens)
    plain = (base_logprob - logprob).double()
    assert plain.mean() > 0.05, "precondition: the perturbed adapters move the policy"
    standard_error = float(plain.std() / math.sqrt(len(plain)))
    assert abs(float(estimate.double().mean() - plain.mean())) < 4 * standard_error + 1e-3
    assert float(estimate.std()) < float(plain.std()), "the per-token sum is the lower-variance estimate"
    with agent.policy.disable_adapter():
        assert float(agent.kl_from_base(images[:4], instructions[:4]).abs().max()) < 1e-5
