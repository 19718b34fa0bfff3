"""Tests of common.py: action tokens, prompt layout, act/evaluate agreement, LoRA, loading,
checkpoints and rollouts. All on the tiny preset, on CPU, with no download."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import common  # noqa: E402
from common import (  # noqa: E402
    ACTION_DIM,
    ActionTokenizer,
    CheckpointError,
    NormStats,
    build_agent,
    build_tiny_tokenizer,
    build_tiny_vla,
    collect_rollout,
    load_checkpoint,
    position_ids_from_mask,
    run_language_model,
    save_checkpoint,
    save_openvla_dir,
    tokenize_prompts,
    weights_fingerprint,
)

SIZE = 56  # 4 x 4 patches per tower: the same code paths as 112 px, 4x cheaper
SHORT, LONG = "go", "put the crème brûlée onto the yellow plate next to the basket"


def observations(n: int, seed: int = 0, size: int = SIZE) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def perturb(params: list[torch.nn.Parameter], seed: int = 0, scale: float = 0.05) -> None:
    """Move adapters off their B = 0 start, so LoRA actually changes the outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(scale * torch.randn(p.shape, generator=generator))


@pytest.fixture(scope="module", autouse=True)
def one_cpu_thread():
    """The tiny model's ops are too small to split across threads; on a shared 2-core machine
    two threads per process made these tests up to 10x slower. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def agent() -> common.ActorCritic:
    agent = build_agent(image_size=SIZE, seed=0)
    perturb(agent.lora_parameters())  # a policy that differs from the base, as after training
    return agent


# ---------------------------------------------------------------------------- action tokenizer


def test_action_tokenizer_edges_and_round_trip() -> None:
    tok = ActionTokenizer(vocab_size=32000)
    ids = tok.encode(np.array([-1.0, 1.0, -7.0, 3.0, 0.0, -0.999, 0.999]))
    # -1 falls in bin 1 -> 31999; +1 in bin 256 -> 31744; values past the range are clipped.
    assert ids.tolist()[:4] == [31999, 31744, 31999, 31744]
    assert ((31744 <= ids) & (ids <= 31999)).all()
    decoded = tok.decode(ids)
    assert decoded[0] == pytest.approx(tok.bin_centers[0]) and decoded[0] > -1
    assert decoded[1] == pytest.approx(tok.bin_centers[-1]) and decoded[1] < 1

    x = np.random.default_rng(0).uniform(-1, 1, (1000, ACTION_DIM))
    assert np.abs(tok.decode(tok.encode(x)) - x).max() <= 1 / 255 + 1e-6  # within one bin width
    np.testing.assert_allclose(tok.decode(tok.encode(tok.bin_centers)), tok.bin_centers, atol=1e-6)
    # Every one of the 256 ids decodes, in decreasing order of value, onto the 255 centres.
    all_values = tok.decode(np.arange(31744, 32000))
    assert (np.diff(all_values) <= 0).all() and len(np.unique(all_values)) == 255


def test_unnormalize_scales_all_but_the_binarised_gripper() -> None:
    q01 = np.array([-0.1, -0.2, -0.3, -0.4, -0.5, -0.6, 0.0])
    q99 = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 10.0])  # gripper stats must be ignored
    stats = NormStats(q01=q01, q99=q99)
    low, high, mid = stats.unnormalize(np.stack([-np.ones(7), np.ones(7), np.zeros(7)]))
    np.testing.assert_allclose(low[:6], q01[:6], atol=1e-6)
    np.testing.assert_allclose(high[:6], q99[:6], atol=1e-6)
    np.testing.assert_allclose(mid[:6], 0.0, atol=1e-6)
    gripper = np.zeros((5, 7))
    gripper[:, 6] = [-1.0, 0.0, 0.5, 0.51, 1.0]
    assert stats.unnormalize(gripper)[:, 6].tolist() == [-1, -1, -1, 1, 1]  # > 0.5 -> open
    assert stats.unnormalize(gripper).dtype == np.float32
    x = np.random.default_rng(0).uniform(-1, 1, (100, 7))
    np.testing.assert_allclose(stats.normalize(stats.unnormalize(x))[:, :6], x[:, :6], atol=1e-6)
    identity = NormStats.identity()
    np.testing.assert_allclose(identity.unnormalize(x)[:, :6], x[:, :6], atol=1e-6)
    assert NormStats.from_dict(json.loads(json.dumps(stats.to_dict()))).to_dict() == stats.to_dict()
    # An official `mask` (False = leave raw) survives the round trip through JSON.
    raw_z = NormStats(q01=q01, q99=q99, mask=[True, True, False, True, True, True, False])
    restored = NormStats.from_dict(json.loads(json.dumps(raw_z.to_dict())))
    assert restored.unnormalize(np.full((1, 7), 0.25))[0, 2] == pytest.approx(0.25)


# ---------------------------------------------------------------------------- tokenizer and prompt


def test_tiny_tokenizer_never_uses_the_action_ids() -> None:
    tokenizer = build_tiny_tokenizer()
    first_action = tokenizer.vocab_size - 256
    assert tokenizer.convert_ids_to_tokens(first_action) == "<action_000>"
    assert tokenizer.pad_token_id == tokenizer.vocab_size  # like OpenVLA's 32000
    empty = tokenizer.convert_tokens_to_ids(common.EMPTY_PIECE)
    instructions = [SHORT, LONG, "Put The RED Cube On The Plate", "move 3.5 cm left, then close!",
                    "place <action_000> and <action_255> near <0x41>", "把胡萝卜放在盘子上 🥕",
                    "tab\tand\nnewline", "x" * 200]
    for instruction, ids in zip(instructions, tokenize_prompts(tokenizer, instructions), strict=True):
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == empty
        assert max(ids) < first_action, instruction
        assert tokenizer.decode(ids[1:-1]) == common.build_prompt(instruction)
    # Built in code, identical every time: checkpoints rely on it.
    assert build_tiny_tokenizer().get_vocab() == tokenizer.get_vocab()


def test_patches_sit_right_after_bos_with_left_padding(agent: common.ActorCritic) -> None:
    images = observations(2)
    inputs = agent.prepare_inputs(images, [SHORT, LONG])
    prompts = tokenize_prompts(agent.tokenizer, [SHORT, LONG])
    patches = agent.vla.num_patches
    for row, prompt in enumerate(prompts):
        ids, mask = inputs.input_ids[row], inputs.attention_mask[row]
        start = len(ids) - len(prompt) - patches  # left padding before it
        assert (mask[:start] == 0).all() and (mask[start:] == 1).all()
        assert ids[start] == agent.tokenizer.bos_token_id
        assert (ids[start + 1:start + 1 + patches] == common.IMAGE_PLACEHOLDER).all()
        assert ids[start + 1 + patches:].tolist() == prompt[1:]

    with torch.no_grad():
        embeds = agent.vla.embed_inputs(inputs.pixel_values, inputs.input_ids)
        projected = agent.vla.projector(agent.vla.vision_backbone(inputs.pixel_values))
        table = agent.vla.language_model.get_input_embeddings().weight
    start = inputs.input_ids.shape[1] - len(prompts[0]) - patches
    torch.testing.assert_close(embeds[0, start], table[agent.tokenizer.bos_token_id])
    torch.testing.assert_close(embeds[0, start + 1:start + 1 + patches], projected[0])
    torch.testing.assert_close(embeds[1, 1:1 + patches], projected[1])  # LONG has no padding
    assert projected.shape[1] == patches == (SIZE // 14) ** 2


def test_h0_is_the_hidden_state_of_the_last_prompt_token(agent: common.ActorCritic) -> None:
    images = observations(2)
    out = agent.act(images, [SHORT, LONG], temperature=0.0)
    with torch.no_grad():  # an independent full forward over the prompt only
        inputs = agent.prepare_inputs(images, [SHORT, LONG])
        embeds = agent.vla.embed_inputs(inputs.pixel_values, inputs.input_ids)
        hidden = run_language_model(agent.vla, embeds, inputs.attention_mask,
                                    position_ids_from_mask(inputs.attention_mask))
        h0 = hidden[:, -1]
        value = agent.value_head(h0).squeeze(-1)
        first_token = agent.action_logits(agent.vla, h0).argmax(-1) + agent.action_tokenizer.first_id
        wrong = agent.value_head(hidden[:, -2]).squeeze(-1)
    torch.testing.assert_close(out.value, value, atol=1e-5, rtol=0)
    assert not torch.allclose(out.value, wrong, atol=1e-5)
    assert out.tokens[:, 0].tolist() == first_token.tolist()


def test_a_sample_does_not_change_when_batched_with_a_longer_prompt(
        agent: common.ActorCritic) -> None:
    images = observations(3)
    alone = agent.act(images[:1], [SHORT], temperature=0.0)
    batched = agent.act(images, [SHORT, LONG, LONG + " and " + LONG], temperature=0.0)
    assert batched.tokens[0].tolist() == alone.tokens[0].tolist()
    torch.testing.assert_close(batched.value[:1], alone.value, atol=1e-5, rtol=0)
    torch.testing.assert_close(batched.logprob[:1], alone.logprob, atol=1e-5, rtol=0)

    tokens = batched.tokens
    with torch.no_grad():
        lp_alone, ent_alone, v_alone = agent.evaluate(images[:1], [SHORT], tokens[:1])
        lp, ent, v = agent.evaluate(images, [SHORT, LONG, LONG + " and " + LONG], tokens)
    torch.testing.assert_close(lp[:1], lp_alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent[:1], ent_alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(v[:1], v_alone, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------- act and evaluate


@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
def test_sampled_logprob_equals_teacher_forced_logprob(agent: common.ActorCritic,
                                                       temperature: float) -> None:
    images = observations(4, seed=1)
    instructions = [SHORT, LONG, "move to the red square", "pick up the spoon"]
    torch.manual_seed(0)
    out = agent.act(images, instructions, temperature)
    with torch.no_grad():
        logprob, entropy, value = agent.evaluate(images, instructions, out.tokens, temperature)
    torch.testing.assert_close(logprob, out.logprob, atol=1e-5, rtol=0)
    torch.testing.assert_close(value, out.value, atol=1e-5, rtol=0)
    assert (entropy > 0).all() and (entropy <= ACTION_DIM * np.log(256) + 1e-4).all()
    assert out.actions.dtype == np.float32 and out.actions.shape == (4, ACTION_DIM)
    expected = agent.norm_stats.unnormalize(agent.action_tokenizer.decode(out.tokens.numpy()))
    np.testing.assert_array_equal(out.actions, expected)
    if temperature == 0.0:  # greedy: every token the most likely one, scored at T = 1
        again = agent.act(images, instructions, 0.0)
        assert torch.equal(again.tokens, out.tokens)


def test_sampled_tokens_are_always_action_ids(agent: common.ActorCritic) -> None:
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
        agent.evaluate(observations(1), [SHORT], torch.full((1, 7), first - 1))


def test_only_lora_and_value_head_train_and_all_get_gradients(agent: common.ActorCritic) -> None:
    trainable = {name for name, p in agent.named_parameters() if p.requires_grad}
    assert trainable == {name for name, _ in agent.named_parameters()
                         if "lora_" in name or name.startswith("value_head.")}
    assert len(agent.lora_parameters()) + len(agent.value_head_parameters()) == len(trainable)
    assert len(agent.trainable_parameters()) == len(trainable)
    # Adapters on every linear layer: both towers, projector, attention, MLP and lm_head.
    lora_a = {name for name in trainable if "lora_A" in name}
    for part in ["featurizer.blocks.0.attn.qkv", "fused_featurizer.blocks.1.mlp.fc2",
                 "projector.fc1", "projector.fc3", "layers.0.self_attn.q_proj",
                 "layers.3.mlp.down_proj", "language_model.lm_head"]:
        assert any(part in name for name in lora_a), part
    assert agent.lora_config.r == 32 and agent.lora_config.lora_alpha == 16

    agent.zero_grad()
    logprob, entropy, value = agent.evaluate(observations(2), [SHORT, LONG],
                                             agent.act(observations(2), [SHORT, LONG]).tokens)
    (logprob.sum() + value.sum()).backward()
    for name, p in agent.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    agent.zero_grad()


@pytest.mark.parametrize("critic", ["last", "concat", "separate"])
def test_other_critics_agree_between_act_and_evaluate(critic: str) -> None:
    agent = build_agent(image_size=SIZE, critic=critic, seed=0)
    perturb(agent.lora_parameters())
    perturb(agent.value_head_parameters(), scale=0.1)
    images, instructions = observations(2), [SHORT, LONG]
    out = agent.act(images, instructions)
    with torch.no_grad():
        logprob, _, value = agent.evaluate(images, instructions, out.tokens)
    torch.testing.assert_close(logprob, out.logprob, atol=1e-5, rtol=0)
    torch.testing.assert_close(value, out.value, atol=1e-5, rtol=0)
    if critic == "separate":  # its own adapters: they move the value, never the policy
        critic_lora = [p for n, p in agent.named_parameters() if "critic_model" in n and "lora_" in n]
        assert critic_lora and all(p.requires_grad for p in critic_lora)
        perturb(critic_lora, seed=1, scale=0.5)
        with torch.no_grad():
            logprob2, _, value2 = agent.evaluate(images, instructions, out.tokens)
        torch.testing.assert_close(logprob2, logprob)
        assert not torch.allclose(value2, value)


def test_reference_logprob_is_the_frozen_base(agent: common.ActorCritic) -> None:
    base = build_agent(image_size=SIZE, seed=0)  # adapters at B = 0: exactly the base
    images, instructions = observations(2), [SHORT, LONG]
    tokens = agent.act(images, instructions).tokens
    with torch.no_grad():
        adapted, _, _ = agent.evaluate(images, instructions, tokens)
        base_logprob, _, _ = base.evaluate(images, instructions, tokens)
    reference = agent.reference_logprob(images, instructions, tokens)
    torch.testing.assert_close(reference, base_logprob, atol=1e-5, rtol=0)
    assert not torch.allclose(reference, adapted, atol=1e-3)
    with torch.no_grad():  # and the adapters are back on afterwards
        torch.testing.assert_close(agent.evaluate(images, instructions, tokens)[0], adapted)


def test_images_of_another_size_are_resized(agent: common.ActorCritic) -> None:
    out = agent.act(observations(2, size=SIZE + 30), [SHORT, LONG])
    assert out.tokens.shape == (2, ACTION_DIM)


def test_tiny_base_is_deterministic_and_leaves_the_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    vla_a, _ = build_tiny_vla(SIZE)
    after = torch.rand(3)
    vla_b, _ = build_tiny_vla(SIZE)
    torch.testing.assert_close(after, expected)  # the caller's random stream is untouched
    state_a, state_b = vla_a.state_dict(), vla_b.state_dict()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert weights_fingerprint(state_a) == weights_fingerprint(state_b)
    # bf16 on CUDA, fp32 on CPU: the same base, the same fingerprint.
    assert weights_fingerprint({k: v.bfloat16() for k, v in state_a.items()}) == \
        weights_fingerprint(state_a)
    assert weights_fingerprint(state_a) != weights_fingerprint(build_tiny_vla(SIZE + 14)[0].state_dict())
    # The seed draws the adapters (LoRA A) and the value head, not the base.
    a0, a0_again, a1 = (build_agent(image_size=SIZE, seed=s) for s in (0, 0, 1))
    assert torch.equal(a0.lora_parameters()[0], a0_again.lora_parameters()[0])
    assert not torch.equal(a0.lora_parameters()[0], a1.lora_parameters()[0])
    assert a0.base_fingerprint == a1.base_fingerprint


def test_default_tiny_preset_shape() -> None:
    agent = build_agent()
    assert agent.image_size == 112 and agent.vla.num_patches == 64
    config = agent.vla_config.text_config
    assert config["vocab_size"] % 64 == 0 and config["vocab_size"] > agent.vla_config.pad_token_id
    assert agent.action_tokenizer.vocab_size == agent.vla_config.pad_token_id
    assert next(agent.vla.parameters()).dtype == torch.float32


# ---------------------------------------------------------------------------- official layout


def llm_logits(vla: common.OpenVLA, inputs: common.PromptInputs) -> torch.Tensor:
    with torch.no_grad():
        embeds = vla.embed_inputs(inputs.pixel_values, inputs.input_ids)
        return vla.language_model(inputs_embeds=embeds, attention_mask=inputs.attention_mask,
                                  position_ids=position_ids_from_mask(inputs.attention_mask)).logits


def test_official_layout_round_trip(tmp_path) -> None:
    vla, tokenizer = build_tiny_vla(SIZE)
    stats = {"bridge_orig": NormStats(q01=-0.5 * np.ones(7), q99=np.ones(7)),
             "fractal": NormStats(q01=-2 * np.ones(7), q99=2 * np.ones(7))}
    save_openvla_dir(tmp_path / "vla", vla, tokenizer, stats, max_shard_bytes=2**21)
    config = json.loads((tmp_path / "vla" / "config.json").read_text())
    for key in ("timm_model_ids", "image_sizes", "text_config", "norm_stats", "n_action_bins",
                "pad_token_id", "pad_to_multiple_of", "use_fused_vision_backbone"):
        assert key in config
    index = json.loads((tmp_path / "vla" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    names = set(index["weight_map"])
    for name in ["vision_backbone.featurizer.blocks.0.ls1.scale_factor",
                 "vision_backbone.featurizer.reg_token", "vision_backbone.fused_featurizer.attn_pool.latent",
                 "projector.fc1.weight", "projector.fc3.bias", "language_model.lm_head.weight",
                 "language_model.model.layers.0.self_attn.q_proj.weight"]:
        assert name in names, name

    agent = build_agent("openvla-7b", str(tmp_path / "vla"), unnorm_key="fractal", image_size=SIZE)
    np.testing.assert_allclose(agent.norm_stats.q99, 2.0)
    reference = build_agent(image_size=SIZE)
    inputs = reference.prepare_inputs(observations(2), [SHORT, LONG])
    assert torch.equal(llm_logits(vla, inputs), llm_logits(agent.policy.get_base_model(), inputs))
    assert agent.base_fingerprint == reference.base_fingerprint
    assert tokenize_prompts(agent.tokenizer, [LONG]) == tokenize_prompts(tokenizer, [LONG])
    with pytest.raises(CheckpointError, match="bridge_orig"):  # two datasets: which one?
        build_agent("openvla-7b", str(tmp_path / "vla"), image_size=SIZE)

    # The other place OpenVLA keeps statistics: dataset_statistics.json.
    config["norm_stats"] = {}
    (tmp_path / "vla" / "config.json").write_text(json.dumps(config))
    (tmp_path / "vla" / "dataset_statistics.json").write_text(
        json.dumps({"only": {"action": stats["fractal"].to_dict()}}))
    np.testing.assert_allclose(build_agent("openvla-7b", str(tmp_path / "vla")).norm_stats.q01, -2.0)


def test_official_layout_errors_name_what_is_missing(tmp_path) -> None:
    vla, tokenizer = build_tiny_vla(SIZE)
    model_dir = tmp_path / "vla"
    save_openvla_dir(model_dir, vla, tokenizer, max_shard_bytes=2**21)

    with pytest.raises(CheckpointError, match="config.json"):
        build_agent("openvla-7b", str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="model_path"):
        build_agent("openvla-7b", None)

    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    shard = model_dir / sorted(set(index["weight_map"].values()))[-1]
    tensors = load_file(shard)
    dropped = sorted(tensors)[0]
    save_file({k: v for k, v in tensors.items() if k != dropped}, shard)
    with pytest.raises(CheckpointError, match=dropped.replace(".", r"\.")):
        build_agent("openvla-7b", str(model_dir))
    save_file(dict(tensors, extra_weight=torch.zeros(1)), shard)
    with pytest.raises(CheckpointError, match="extra_weight"):
        build_agent("openvla-7b", str(model_dir))
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        build_agent("openvla-7b", str(model_dir))
    (model_dir / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        build_agent("openvla-7b", str(model_dir))


# ---------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("critic", ["h0", "separate"])
def test_checkpoint_round_trip(tmp_path, critic: str) -> None:
    stats = NormStats(q01=-0.3 * np.ones(7), q99=0.6 * np.ones(7))
    agent = build_agent(image_size=SIZE, critic=critic, seed=3, norm_stats=stats)
    perturb(agent.lora_parameters(), seed=1)
    perturb(agent.value_head_parameters(), seed=2, scale=0.1)
    optimizer = torch.optim.AdamW(agent.trainable_parameters(), lr=1e-3)
    state = {"iteration": 7, "optimizer": optimizer.state_dict(), "rng": common.rng_state()}
    save_checkpoint(tmp_path / "ckpt", agent, state)
    assert (tmp_path / "ckpt" / "adapter" / "adapter_config.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temp dirs left behind

    loaded, loaded_state = load_checkpoint(tmp_path / "ckpt", device="cpu")
    assert loaded_state["iteration"] == 7 and loaded.critic_mode == critic
    images, instructions = observations(3), [SHORT, LONG, "pick up the spoon"]
    before, after = agent.act(images, instructions, 0.0), loaded.act(images, instructions, 0.0)
    assert torch.equal(before.tokens, after.tokens)
    np.testing.assert_array_equal(before.actions, after.actions)
    torch.testing.assert_close(after.value, before.value, atol=0, rtol=0)
    torch.testing.assert_close(after.logprob, before.logprob, atol=0, rtol=0)
    np.testing.assert_array_equal(loaded.norm_stats.q01, stats.q01)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch) -> None:
    agent = build_agent(image_size=SIZE)
    path = tmp_path / "ckpt"
    save_checkpoint(path, agent, {"iteration": 1})

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(common.torch, "save", crash)  # dies after the adapter was written
    with pytest.raises(OSError):
        save_checkpoint(path, agent, {"iteration": 2})
    with pytest.raises(OSError):
        save_checkpoint(tmp_path / "fresh", agent, {"iteration": 2})
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no half checkpoint anywhere
    assert load_checkpoint(path)[1]["iteration"] == 1  # the old one is intact
    save_checkpoint(path, agent, {"iteration": 3})  # and overwriting works
    assert load_checkpoint(path)[1]["iteration"] == 3


def test_checkpoint_errors_are_one_clear_line(tmp_path) -> None:
    agent = build_agent(image_size=SIZE)
    path = tmp_path / "ckpt"

    def expect(match: str, **kwargs) -> None:
        with pytest.raises(CheckpointError, match=match) as info:
            load_checkpoint(path, **kwargs)
        assert "\n" not in str(info.value)

    expect("does not exist")
    save_checkpoint(path, agent, {"iteration": 1})
    expect("preset 'tiny', not 'openvla-7b'", preset="openvla-7b")

    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(dict(config, base_fingerprint="0" * 16)))
    expect("different base weights")
    other = json.loads(json.dumps(config))
    other["model_config"]["text_config"]["hidden_size"] = 256
    (path / "config.json").write_text(json.dumps(other))
    expect("different model configuration")
    (path / "config.json").write_text('{"preset": "tiny", ')
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
    (path / "value_head.safetensors").write_bytes(data)
    (path / "trainer_state.pt").write_bytes(b"not a pickle")
    expect("trainer_state.pt is corrupt")
    (path / "adapter" / "adapter_model.safetensors").unlink()
    expect("missing adapter/adapter_model.safetensors")


# ---------------------------------------------------------------------------- rollout


class FakeVecEnv:
    """DESIGN.md's VecEnv in miniature: reward 1 whenever dx > 0; success = dx > 0 at the end."""

    def __init__(self, num_envs: int = 3, max_episode_steps: int = 4, image_size: int = SIZE):
        self.num_envs, self.max_episode_steps, self.image_size = num_envs, max_episode_steps, image_size
        self.split = "fake"
        self.rng = np.random.default_rng(0)
        self.reset_ids: list[list[int]] = []
        self.steps = 0

    def observe(self) -> dict:
        return {"image": self.rng.integers(0, 256, (self.num_envs, self.image_size, self.image_size, 3),
                                           dtype=np.uint8),
                "instruction": [f"move to the square number {i}" for i in range(self.num_envs)]}

    def reset(self, episode_ids=None) -> dict:
        if episode_ids is None:
            episode_ids = self.rng.integers(0, 1000, self.num_envs)
        self.ids = np.asarray(episode_ids)
        self.reset_ids.append(self.ids.tolist())
        self.steps, self.ever = 0, np.zeros(self.num_envs, dtype=bool)
        return self.observe()

    def step(self, actions: np.ndarray):
        assert actions.shape == (self.num_envs, 7) and actions.dtype == np.float32
        self.steps += 1
        success = actions[:, 0] > 0
        self.ever |= success
        done = np.full(self.num_envs, self.steps >= self.max_episode_steps)
        info = {"success": success, "success_once": self.ever.copy(),
                "grasped": np.zeros(self.num_envs, dtype=bool), "episode_id": self.ids.copy()}
        return self.observe(), success.astype(np.float32), done, info


def test_collect_rollout_records_resets_and_episodes(agent: common.ActorCritic) -> None:
    envs = FakeVecEnv()
    id_batches = iter([[10, 11, 12], [20, 21, 22]])
    rollout = collect_rollout(agent, envs, num_steps=6, temperature=1.0,
                              episode_ids_fn=lambda: next(id_batches))
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
    assert torch.equal(rollout.rewards, torch.as_tensor((dx > 0).astype(np.float32)))
    np.testing.assert_allclose(rollout.episode_returns, rollout.rewards[:4].sum(0).numpy())
    np.testing.assert_array_equal(rollout.episode_success, dx[3] > 0)
    np.testing.assert_array_equal(rollout.episode_success_once, (dx[:4] > 0).any(0))
    assert rollout.next_value.shape == (N,) and (rollout.next_value != 0).all()  # mid-episode

    # Ending on a done: no pointless reset, nothing to bootstrap.
    envs = FakeVecEnv()
    rollout = collect_rollout(agent, envs, num_steps=8, temperature=1.0)
    assert len(envs.reset_ids) == 2 and len(rollout.episode_returns) == 6
    assert torch.equal(rollout.next_value, torch.zeros(3))


def test_evaluate_policy_uses_the_same_episodes_every_time(agent: common.ActorCritic) -> None:
    envs = FakeVecEnv(max_episode_steps=2)
    metrics = common.evaluate_policy(agent, envs, num_episodes=5, temperature=0.0, seed=4)
    again = FakeVecEnv(max_episode_steps=2)  # same images, and the env's own RNG is not used
    assert common.evaluate_policy(agent, again, 5, 0.0, seed=4) == metrics
    assert again.reset_ids == envs.reset_ids and len(envs.reset_ids) == 2  # ceil(5 / 3) rounds
    assert set(metrics) == {"success", "success_once", "return"}
