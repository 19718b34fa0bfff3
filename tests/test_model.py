"""Tests of model.py: action tokens, normalisation, the tiny tokenizer and preset, the prompt
layout, and the official checkpoint layout (loader and writer). Tiny preset, CPU, no download."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import LONG, SHORT, SIZE, observations
from safetensors.torch import load_file, save_file

import model
from common import build_agent
from model import (
    ACTION_DIM,
    ActionTokenizer,
    CheckpointError,
    NormStats,
    build_tiny_tokenizer,
    build_tiny_vla,
    model_image_size,
    position_ids_from_mask,
    save_openvla_dir,
    tokenize_prompts,
    weights_fingerprint,
)


def patch_size(vla: model.OpenVLA) -> int:
    size = vla.vision_backbone.featurizer.patch_embed.patch_size
    return size[0] if isinstance(size, tuple) else size


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
    empty = tokenizer.convert_tokens_to_ids(model.EMPTY_PIECE)
    instructions = [SHORT, LONG, "Put The RED Cube On The Plate", "move 3.5 cm left, then close!",
                    "place <action_000> and <action_255> near <0x41>", "把胡萝卜放在盘子上 🥕",
                    "tab\tand\nnewline", "x" * 200]
    for instruction, ids in zip(instructions, tokenize_prompts(tokenizer, instructions), strict=True):
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == empty
        assert max(ids) < first_action, instruction
        assert tokenizer.decode(ids[1:-1]) == model.build_prompt(instruction)
    # Built in code, identical every time: checkpoints rely on it.
    assert build_tiny_tokenizer().get_vocab() == tokenizer.get_vocab()


def test_patches_sit_right_after_bos_with_left_padding(agent) -> None:
    images = observations(2)
    inputs = agent.prepare_inputs(images, [SHORT, LONG])
    prompts = tokenize_prompts(agent.tokenizer, [SHORT, LONG])
    patches = agent.vla.num_patches
    for row, prompt in enumerate(prompts):
        ids, mask = inputs.input_ids[row], inputs.attention_mask[row]
        start = len(ids) - len(prompt) - patches  # left padding before it
        assert (mask[:start] == 0).all() and (mask[start:] == 1).all()
        assert ids[start] == agent.tokenizer.bos_token_id
        assert (ids[start + 1:start + 1 + patches] == model.IMAGE_PLACEHOLDER).all()
        assert ids[start + 1 + patches:].tolist() == prompt[1:]

    with torch.no_grad():
        embeds = agent.vla.embed_inputs(inputs.pixel_values, inputs.input_ids)
        projected = agent.vla.projector(agent.vla.vision_backbone(inputs.pixel_values))
        table = agent.vla.language_model.get_input_embeddings().weight
    start = inputs.input_ids.shape[1] - len(prompts[0]) - patches
    torch.testing.assert_close(embeds[0, start], table[agent.tokenizer.bos_token_id])
    torch.testing.assert_close(embeds[0, start + 1:start + 1 + patches], projected[0])
    torch.testing.assert_close(embeds[1, 1:1 + patches], projected[1])  # LONG has no padding
    assert projected.shape[1] == patches == (SIZE // patch_size(agent.vla)) ** 2


def test_action_token_loss_over_actions_is_the_policy_log_prob(agent) -> None:
    images, instructions = observations(3), [SHORT, LONG, "pick up the spoon"]
    tokens = agent.act(images, instructions).tokens
    inputs = agent.prepare_inputs(images, instructions)
    with torch.no_grad():
        full, predicted = model.action_token_loss(agent.vla, inputs, tokens, "full")
        action, _ = model.action_token_loss(agent.vla, inputs, tokens, "action")
        logprob, _, _ = agent.score_actions(images, instructions, tokens)
    # Over the 256 action ids the loss is the policy's own log-prob (mean over 7 tokens); the
    # full softmax also spends probability on text ids, so its loss is larger.
    assert action.item() == pytest.approx(-logprob.mean().item() / ACTION_DIM, rel=1e-5)
    assert full.item() > action.item()
    first = agent.action_tokenizer.first_id
    assert predicted.shape == (3, ACTION_DIM) and bool(((predicted >= first) & (predicted < first + 256)).all())


# ---------------------------------------------------------------------------- the tiny preset


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
    assert weights_fingerprint(state_a) != weights_fingerprint(build_tiny_vla(2 * SIZE)[0].state_dict())
    # The seed draws the adapters (LoRA A) and the value head, not the base.
    a0, a0_again, a1 = (build_agent(image_size=SIZE, seed=s) for s in (0, 0, 1))
    assert torch.equal(a0.lora_parameters()[0], a0_again.lora_parameters()[0])
    assert not torch.equal(a0.lora_parameters()[0], a1.lora_parameters()[0])
    assert not torch.equal(a0.value_head_parameters()[0], a1.value_head_parameters()[0])
    assert a0.base_fingerprint == a1.base_fingerprint


def test_default_tiny_preset_shape() -> None:
    agent = build_agent()
    patch = patch_size(agent.vla)
    assert agent.image_size == model.TINY_IMAGE_SIZE == model_image_size(None)
    assert agent.vla.num_patches == (agent.image_size // patch) ** 2
    config = agent.vla_config.text_config
    assert config["vocab_size"] % 64 == 0 and config["vocab_size"] > agent.vla_config.pad_token_id
    assert agent.action_tokenizer.vocab_size == agent.vla_config.pad_token_id
    assert next(agent.vla.parameters()).dtype == torch.float32


def test_image_size_must_fit_the_patches() -> None:
    with pytest.raises(ValueError, match="multiple of the patch size"):
        build_tiny_vla(SIZE + 1)


# ---------------------------------------------------------------------------- official layout


def llm_logits(vla: model.OpenVLA, inputs: model.PromptInputs) -> torch.Tensor:
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
    assert model_image_size(tmp_path / "vla") == SIZE  # from config.json alone

    agent = build_agent(str(tmp_path / "vla"), unnorm_key="fractal", image_size=SIZE)
    np.testing.assert_allclose(agent.norm_stats.q99, 2.0)
    assert agent.model_path == str(tmp_path / "vla")
    reference = build_agent(image_size=SIZE)
    inputs = reference.prepare_inputs(observations(2), [SHORT, LONG])
    assert torch.equal(llm_logits(vla, inputs), llm_logits(agent.policy.get_base_model(), inputs))
    assert agent.base_fingerprint == reference.base_fingerprint
    assert tokenize_prompts(agent.tokenizer, [LONG]) == tokenize_prompts(tokenizer, [LONG])
    with pytest.raises(CheckpointError, match="bridge_orig"):  # two datasets: which one?
        build_agent(str(tmp_path / "vla"), image_size=SIZE)
    with pytest.raises(ValueError, match=f"takes {SIZE}px images"):  # the model fixes the size
        build_agent(str(tmp_path / "vla"), unnorm_key="fractal", image_size=2 * SIZE)

    # The other place OpenVLA keeps statistics: dataset_statistics.json.
    config["norm_stats"] = {}
    (tmp_path / "vla" / "config.json").write_text(json.dumps(config))
    (tmp_path / "vla" / "dataset_statistics.json").write_text(
        json.dumps({"only": {"action": stats["fractal"].to_dict()}}))
    np.testing.assert_allclose(build_agent(str(tmp_path / "vla")).norm_stats.q01, -2.0)


def test_official_layout_errors_name_what_is_missing(tmp_path) -> None:
    vla, tokenizer = build_tiny_vla(SIZE)
    model_dir = tmp_path / "vla"
    save_openvla_dir(model_dir, vla, tokenizer, max_shard_bytes=2**21)

    with pytest.raises(CheckpointError, match="config.json"):
        build_agent(str(tmp_path / "nowhere"))
    with pytest.raises(CheckpointError, match="config.json"):
        model_image_size(tmp_path / "nowhere")

    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    shard = model_dir / sorted(set(index["weight_map"].values()))[-1]
    tensors = load_file(shard)
    dropped = sorted(tensors)[0]
    save_file({k: v for k, v in tensors.items() if k != dropped}, shard)
    with pytest.raises(CheckpointError, match=dropped.replace(".", r"\.")):
        build_agent(str(model_dir))
    save_file(dict(tensors, extra_weight=torch.zeros(1)), shard)
    with pytest.raises(CheckpointError, match="extra_weight"):
        build_agent(str(model_dir))
    shard.write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match=f"{shard.name} is corrupt"):
        build_agent(str(model_dir))
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        build_agent(str(model_dir))
    (model_dir / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        build_agent(str(model_dir))


def test_the_light_cli_knows_the_tiny_patch_size() -> None:
    import cli
    import model

    assert cli.TINY_PATCH_SIZE == model.TINY_PATCH_SIZE
    assert model.tiny_vla_config(64, 1000).timm_model_kwargs[0]["patch_size"] == model.TINY_PATCH_SIZE
