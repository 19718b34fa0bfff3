"""The OpenVLA-7B directory as users have it, at reduced LLM depth, through every path that reads it.

The fixture writes its own directory in the official form, NOT through save_openvla_dir:
config.json laid out as openvla's OpenVLAConfig writes it (transformers 4.40; a 4-key
text_config whose other Llama fields are LlamaConfig's defaults, norm_stats of two datasets in
the official nesting), the official preprocessor_config.json (bicubic, bf16-rounded ImageNet
statistics), a 32000-piece Llama-like tokenizer (action ids 31744..31999, as Llama-2's), and
random bf16 weights under the official names in 3 shards with an index. Only
text_config.num_hidden_layers is reduced (to 1): the two ViTs are fixed by their timm ids, so
the directory still holds 1.27B weights (2.5 GB on disk, ~5 GB of RAM in fp32). Measured on the
shared 2-core CPU, one thread: writing it 15-18 s, a load 10 s, act() on one 224 px image 9 s,
the PPO iteration 87 s at 9.6 GB peak RSS; the whole file ~2.5 min. The tests that need the
directory are marked slow and load it as few times as they can (3: the module's agent, PPO's,
evaluate_ood's), one at a time.
"""

from __future__ import annotations

import gc
import importlib
import importlib.util
import json
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import init_empty_weights
from conftest import REPO, SIZE
from safetensors.torch import load_file, save_file

import model
from cli import parse_cli
from common import build_agent, save_checkpoint
from model import (
    DINOV2_TIMM_ID,
    SIGLIP_TIMM_ID,
    CheckpointError,
    ImageTransform,
    NormStats,
    OpenVLA,
    VLAConfig,
    build_tiny_tokenizer,
    build_tiny_vla,
    preprocess_images,
    save_openvla_dir,
)

LLAMA2_TEXT_VOCAB = 32000
OPENVLA_7B_WEIGHTS = 7_541_237_184  # the official checkpoint's parameter count
# The official config.json's text_config, all four keys of it.
OFFICIAL_TEXT_CONFIG = {"model_type": "llama", "pad_token_id": 32000, "torch_dtype": "bfloat16",
                        "vocab_size": 32064}
DATASETS = ("bridge_orig", "fractal20220817_data")
BF16_IMAGENET_MEAN = [0.484375, 0.455078125, 0.40625]  # as the official preprocessor_config has them
BF16_IMAGENET_STD = [0.228515625, 0.2236328125, 0.224609375]


# ---------------------------------------------------------------------------- the official form


def dataset_statistics(seed: int) -> dict:
    """One dataset's entry in the official nesting: action and proprio statistics, counts."""
    rng = np.random.default_rng(seed)
    low = -rng.uniform(0.01, 0.05, 7)
    high = rng.uniform(0.01, 0.05, 7)
    low[6], high[6] = 0.0, 1.0  # the gripper: raw, mask False

    def summary(lo: np.ndarray, hi: np.ndarray) -> dict:
        return {"mean": ((lo + hi) / 2).tolist(), "std": ((hi - lo) / 4).tolist(),
                "max": (1.5 * hi).tolist(), "min": (1.5 * lo).tolist(),
                "q01": lo.tolist(), "q99": hi.tolist()}

    return {"action": {**summary(low, high), "mask": [True] * 6 + [False]},
            "proprio": summary(np.zeros(7), np.zeros(7)),
            "num_transitions": int(rng.integers(10**5, 10**6)),
            "num_trajectories": int(rng.integers(10**3, 10**4))}


def official_config_json(num_hidden_layers: int | None = 1) -> dict:
    """config.json as the official OpenVLA-7B one is laid out (openvla's configuration_prismatic.py
    and HF conversion script, saved by transformers 4.40.1); num_hidden_layers None: full depth."""
    text_config = dict(OFFICIAL_TEXT_CONFIG)
    if num_hidden_layers is not None:
        text_config["num_hidden_layers"] = num_hidden_layers
    return {
        "arch_specifier": "no-align+fused-gelu-mlp",
        "architectures": ["OpenVLAForActionPrediction"],
        "auto_map": {"AutoConfig": "configuration_prismatic.OpenVLAConfig",
                     "AutoModelForVision2Seq": "modeling_prismatic.OpenVLAForActionPrediction"},
        "hf_llm_id": "meta-llama/Llama-2-7b-hf",
        "image_resize_strategy": "resize-naive",
        "image_sizes": [224, 224],
        "llm_backbone_id": "llama2-7b-pure",
        "llm_max_length": 2048,
        "model_type": "openvla",
        "n_action_bins": 256,
        "norm_stats": {name: dataset_statistics(i) for i, name in enumerate(DATASETS)},
        "output_projector_states": False,
        "pad_to_multiple_of": 64,
        "pad_token_id": 32000,
        "return_dict": False,
        "text_config": text_config,
        "timm_model_ids": [DINOV2_TIMM_ID, SIGLIP_TIMM_ID],
        "timm_override_act_layers": [None, None],
        "torch_dtype": "bfloat16",
        "transformers_version": "4.40.1",
        "use_fused_vision_backbone": True,
        "vision_backbone_id": "dinosiglip-vit-so-224px",
    }


def official_preprocessor_config() -> dict:
    """The official preprocessor_config.json (openvla's PrismaticImageProcessor, serialised)."""
    resize = {"antialias": True, "interpolation": 3, "max_size": None, "size": [224, 224]}
    return {
        "auto_map": {"AutoImageProcessor": "processing_prismatic.PrismaticImageProcessor",
                     "AutoProcessor": "processing_prismatic.PrismaticProcessor"},
        "image_processor_type": "PrismaticImageProcessor",
        "image_resize_strategy": "resize-naive",
        "input_sizes": [[3, 224, 224], [3, 224, 224]],
        "interpolations": ["bicubic", "bicubic"],
        "means": [BF16_IMAGENET_MEAN, [0.5, 0.5, 0.5]],
        "processor_class": "PrismaticProcessor",
        "stds": [BF16_IMAGENET_STD, [0.5, 0.5, 0.5]],
        "tvf_crop_params": [{"output_size": [224, 224]}, {"output_size": [224, 224]}],
        "tvf_do_letterbox": False,
        "tvf_letterbox_fill": None,
        "tvf_normalize_params": [
            {"inplace": False, "mean": BF16_IMAGENET_MEAN, "std": BF16_IMAGENET_STD},
            {"inplace": False, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}],
        "tvf_resize_params": [resize, dict(resize)],
        "use_fused_vision_backbone": True,
    }


def random_weight(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """A bf16 tensor that keeps a random network finite: norms 1, biases 0, LayerScale 0.1,
    everything else N(0, 0.02)."""
    if name.endswith("bias"):
        return torch.zeros(shape, dtype=torch.bfloat16)
    if name.endswith("scale_factor"):
        return torch.full(shape, 0.1, dtype=torch.bfloat16)
    if len(shape) == 1 and name.endswith("weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    return (torch.randn(shape, generator=generator) * 0.02).bfloat16()


def write_official_dir(model_dir: Path, num_shards: int = 3) -> None:
    """The official OpenVLA-7B directory at 1 LLM layer (see the module docstring)."""
    model_dir.mkdir(parents=True)
    config_json = official_config_json()
    (model_dir / "config.json").write_text(json.dumps(config_json, indent=2))
    (model_dir / "preprocessor_config.json").write_text(
        json.dumps(official_preprocessor_config(), indent=2))
    build_tiny_tokenizer(LLAMA2_TEXT_VOCAB).save_pretrained(model_dir)

    with init_empty_weights():  # shapes only
        shapes = {name: tuple(t.shape) for name, t in
                  OpenVLA(VLAConfig.from_dict(config_json)).state_dict().items()}
    total = sum(math.prod(s) for s in shapes.values()) * 2  # bf16 bytes
    generator = torch.Generator().manual_seed(0)
    weight_map, shard, shard_bytes, index = {}, {}, 0, 1
    names = list(shapes)
    for i, name in enumerate(names):  # shard by shard: ~1 GB in memory at a time
        shard[name] = random_weight(name, shapes[name], generator)
        shard_bytes += shard[name].numel() * 2
        if shard_bytes >= total / num_shards * index or i == len(names) - 1:
            filename = f"model-{index:05d}-of-{num_shards:05d}.safetensors"
            save_file(shard, model_dir / filename, metadata={"format": "pt"})
            weight_map.update({n: filename for n in shard})
            shard, index = {}, index + 1
    assert index - 1 == num_shards
    (model_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


@pytest.fixture(scope="module")
def official_dir(tmp_path_factory):
    """The directory, written once for the module and deleted after it (2.5 GB)."""
    path = tmp_path_factory.mktemp("official") / "openvla-7b"
    write_official_dir(path)
    yield path
    for file in path.iterdir():
        file.unlink()
    path.rmdir()


def view(official: Path, where: Path, drop: tuple[str, ...] = (), config: dict | None = None) -> Path:
    """A copy of the official directory made of links, without `drop`, with another config.json."""
    where.mkdir()
    for file in official.iterdir():
        if file.name not in drop and not (config is not None and file.name == "config.json"):
            (where / file.name).symlink_to(file)
    if config is not None:
        (where / "config.json").write_text(json.dumps(config))
    return where


@pytest.fixture(scope="module")
def loaded(official_dir):
    """The agent on the official directory (fp32 on the CPU), with what its load took. A dict,
    so that the last test can drop the agent before it loads the directory again."""
    gc.collect()
    start = time.perf_counter()
    agent = build_agent(str(official_dir), critic="h0", unnorm_key="bridge_orig", device="cpu")
    return {"agent": agent, "seconds": time.perf_counter() - start}


# ---------------------------------------------------------------------------- no weights read


def test_the_official_4_key_text_config_resolves_to_llama_2_7b() -> None:
    config = VLAConfig.from_dict(official_config_json(num_hidden_layers=None))
    text = config.text_config
    assert (text["hidden_size"], text["intermediate_size"], text["num_hidden_layers"],
            text["num_attention_heads"], text["num_key_value_heads"], text["head_dim"]) == \
        (4096, 11008, 32, 32, 32, 128)
    assert text["rms_norm_eps"] == 1e-6 and text["vocab_size"] == 32064
    assert config.hidden_size == 4096
    # The same model written with every field resolves alike, and the resolution is stable.
    full = VLAConfig.from_dict(dict(official_config_json(None), text_config=dict(text)))
    assert full.to_dict() == config.to_dict()
    assert VLAConfig.from_dict(json.loads(json.dumps(config.to_dict()))).to_dict() == config.to_dict()
    with init_empty_weights():
        vla = OpenVLA(config)
    assert sum(p.numel() for p in vla.parameters()) == OPENVLA_7B_WEIGHTS


def test_layerscale_weights_load_under_timm_names_too(tmp_path: Path) -> None:
    """The official conversion stores DINOv2's LayerScale as ls1.scale_factor, timm as ls1.gamma."""
    vla, tokenizer = build_tiny_vla(SIZE)
    save_openvla_dir(tmp_path / "vla", vla, tokenizer, max_shard_bytes=2**21)
    reference = build_agent(str(tmp_path / "vla"))
    renamed = 0
    for shard in (tmp_path / "vla").glob("*.safetensors"):
        tensors = load_file(shard)
        names = {n: n.replace(".ls1.scale_factor", ".ls1.gamma").replace(".ls2.scale_factor", ".ls2.gamma")
                 for n in tensors}
        renamed += sum(a != b for a, b in names.items())
        save_file({names[n]: t for n, t in tensors.items()}, shard)
    assert renamed > 0
    agent = build_agent(str(tmp_path / "vla"))
    assert agent.base_fingerprint == reference.base_fingerprint
    for shard in (tmp_path / "vla").glob("*.safetensors"):  # both names at once: ambiguous
        tensors = load_file(shard)
        gammas = [n for n in tensors if n.endswith(".ls1.gamma")]
        if gammas:
            twin = gammas[0].replace("gamma", "scale_factor")
            save_file(dict(tensors, **{twin: tensors[gammas[0]].clone()}), shard)
            break
    with pytest.raises(CheckpointError, match="stored twice"):
        build_agent(str(tmp_path / "vla"))


def test_a_tokenizer_model_alone_is_converted(tmp_path: Path) -> None:
    """A directory with Llama's SentencePiece tokenizer.model and no tokenizer.json loads, and
    tokenizes as SentencePiece itself does."""
    spm = pytest.importorskip("sentencepiece")
    import io

    text = ["In: What action should the robot take to put the carrot on the plate?",
            "pick up the red block and place it on the green block next to the bowl"] * 20
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(  # Llama-2's kind: BPE with byte fallback, ids 0-2 special
        sentence_iterator=iter(text), model_writer=proto, vocab_size=320, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        allow_whitespace_only_pieces=True, minloglevel=2)
    (tmp_path / "tokenizer.model").write_bytes(proto.getvalue())
    tokenizer = model.load_tokenizer(tmp_path, 320)
    reference = spm.SentencePieceProcessor(model_proto=proto.getvalue())
    prompt = model.build_prompt("put the crème brûlée on the plate")
    assert tokenizer(prompt, add_special_tokens=False).input_ids == reference.encode(prompt)
    with pytest.raises(CheckpointError, match="pad_token_id is 32000"):
        model.load_tokenizer(tmp_path, 32000)


# ---------------------------------------------------------------------------- cheap failures


def quick(call, match: str, seconds: float = 5.0) -> str:
    """call() raises a one-line CheckpointError matching `match`, within `seconds`."""
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=match) as info:
        call()
    assert time.perf_counter() - start < seconds, "read weights before failing?"
    assert "\n" not in str(info.value)
    return str(info.value)


@pytest.mark.slow
def test_what_can_fail_cheaply_fails_before_any_weight_is_read(official_dir, tmp_path: Path,
                                                               monkeypatch) -> None:
    path = str(official_dir)
    message = quick(lambda: build_agent(path), "2 datasets")  # which statistics?
    assert all(name in message for name in DATASETS) and "--unnorm-key" in message
    quick(lambda: build_agent(path, unnorm_key="bridge"), "'bridge' not in")
    # The same, from the flags alone (no torch needed): before SFT collects demonstrations.
    for script in ("ppo_vla", "sft_warmup", "grpo_vla", "dpo_vla"):
        module = importlib.import_module(script)
        with pytest.raises(SystemExit):
            parse_cli(module.Args, module.check_args, argv=["--model-path", path])
        args = parse_cli(module.Args, module.check_args,
                         argv=["--model-path", path, "--unnorm-key", DATASETS[1]])
        assert args.unnorm_key == DATASETS[1]
    evaluate_ood = importlib.import_module("evaluate_ood")
    with pytest.raises(SystemExit):
        parse_cli(evaluate_ood.Args, evaluate_ood.check_args,
                  argv=["--checkpoint", "base", "--model-path", path])

    shards = sorted(official_dir.glob("model-*.safetensors"))
    quick(lambda: build_agent(str(view(official_dir, tmp_path / "a", drop=(shards[1].name,))),
                              unnorm_key="bridge_orig"), shards[1].name)
    quick(lambda: build_agent(str(view(official_dir, tmp_path / "b", drop=("tokenizer.json",))),
                              unnorm_key="bridge_orig"), "tokenizer.json")
    only_model = view(official_dir, tmp_path / "c", drop=("tokenizer.json",))
    (only_model / "tokenizer.model").write_bytes(b"a SentencePiece model")
    monkeypatch.setattr(model, "tokenizer_model_readable", lambda: False)
    message = quick(lambda: build_agent(str(only_model), unnorm_key="bridge_orig"),
                    "tokenizer.model but no tokenizer.json")
    assert "pip install sentencepiece" in message and "save_pretrained" in message
    # A config.json that does not fit the weights: found from the shard headers.
    deeper = official_config_json(num_hidden_layers=2)
    quick(lambda: build_agent(str(view(official_dir, tmp_path / "d", config=deeper)),
                              unnorm_key="bridge_orig"), r"missing \['language_model.model.layers.1")
    # Not enough memory for fp32 on the CPU: said in one line, with what to do.
    monkeypatch.setattr(model, "available_memory", lambda device: 2**30)
    message = quick(lambda: build_agent(path, unnorm_key="bridge_orig"), "GiB")
    assert "1.27B weights need 4.7 GiB in float32" in message and "--dtype bfloat16" in message


# ---------------------------------------------------------------------------- loaded


@pytest.mark.slow
def test_it_loads_with_llama_defaults_and_the_official_image_processor(official_dir, loaded) -> None:
    agent = loaded["agent"]
    print(f"\nload: {loaded['seconds']:.1f} s")
    text = agent.vla_config.text_config
    assert (text["hidden_size"], text["intermediate_size"], text["num_attention_heads"],
            text["num_hidden_layers"], text["rms_norm_eps"]) == (4096, 11008, 32, 1, 1e-6)
    assert agent.image_size == 224 and agent.vla.num_patches == 256
    assert agent.dtype == torch.float32
    assert agent.action_tokenizer.first_id == 31744  # the last 256 of Llama-2's 32000
    stats = json.loads((official_dir / "config.json").read_text())["norm_stats"]["bridge_orig"]
    np.testing.assert_allclose(agent.norm_stats.q99, stats["action"]["q99"])
    assert agent.norm_stats.mask.tolist() == [True] * 6 + [False]

    transform = agent.vla_config.image_transform
    assert transform == ImageTransform(interpolations=["bicubic", "bicubic"],
                                       means=[BF16_IMAGENET_MEAN, [0.5] * 3],
                                       stds=[BF16_IMAGENET_STD, [0.5] * 3])
    # A 160 px camera image resized as the official processor does (torchvision on a PIL image,
    # bicubic, antialiased): within one uint8 level; bilinear is visibly different.
    from PIL import Image
    from torchvision.transforms import functional as TVF

    image = np.random.default_rng(0).integers(0, 256, (1, 160, 160, 3), dtype=np.uint8)
    pixels = agent.prepare_inputs(image, ["go"]).pixel_values[0]
    official = TVF.to_tensor(TVF.resize(Image.fromarray(image[0]), size=[224, 224],
                                        interpolation=TVF.InterpolationMode.BICUBIC, antialias=True))
    for tower, (mean, std) in enumerate(zip(transform.means, transform.stds, strict=True)):
        expected = TVF.normalize(official, mean, std)
        got = pixels[3 * tower:3 * tower + 3]
        assert ((got - expected).abs() * torch.tensor(std).view(3, 1, 1)).max() <= 1.01 / 255
    bilinear = preprocess_images(image, 224, torch.device("cpu"), torch.float32,
                                 ImageTransform(means=transform.means, stds=transform.stds))
    assert ((bilinear[0] - pixels).abs() * 0.5).max() > 10 / 255


@pytest.mark.slow
def test_it_acts_and_scores_its_actions(loaded) -> None:
    agent = loaded["agent"]
    images = np.random.default_rng(1).integers(0, 256, (1, 224, 224, 3), dtype=np.uint8)
    instructions = ["put the carrot on the plate"]
    torch.manual_seed(0)
    start = time.perf_counter()
    out = agent.act(images, instructions)
    print(f"\nact (1 image, 224 px, fp32): {time.perf_counter() - start:.1f} s")
    assert out.tokens.shape == (1, 7)
    assert ((out.tokens >= 31744) & (out.tokens <= 31999)).all()
    assert np.isfinite(out.actions).all() and set(out.actions[:, 6]) <= {-1.0, 1.0}
    q01, q99 = agent.norm_stats.q01[:6], agent.norm_stats.q99[:6]
    assert ((out.actions[:, :6] >= q01 - 1e-6) & (out.actions[:, :6] <= q99 + 1e-6)).all()
    start = time.perf_counter()
    with torch.no_grad():  # the teacher-forced pass PPO trains with
        logprob, entropy, value = agent.score_actions(images, instructions, out.tokens)
    print(f"score_actions: {time.perf_counter() - start:.1f} s")
    # fp32, 4096 wide: the KV-cache decode and the one teacher-forced pass round differently.
    torch.testing.assert_close(logprob, out.logprob, atol=2e-3, rtol=0)
    torch.testing.assert_close(value, out.value, atol=1e-3, rtol=1e-3)
    assert torch.isfinite(entropy).all() and entropy.item() > 0


# ---------------------------------------------------------------------------- the README's commands


def readme_7b_commands(model_dir: Path) -> dict[str, list[str]]:
    """script name -> argv of the README's OpenVLA-7B commands, on `model_dir`."""
    commands = {}
    text = (REPO / "README.md").read_text().replace("\\\n", " ")  # join continued lines
    for line in text.splitlines():
        if line.startswith("python ") and "/weights/openvla-7b" in line:
            words = shlex.split(line.split("  #")[0].replace("/weights/openvla-7b", str(model_dir)))
            commands[words[1].removesuffix(".py")] = words[2:]
    return commands


@pytest.mark.slow
def test_the_readme_7b_commands_run_on_the_official_layout(official_dir, loaded, tmp_path: Path,
                                                           monkeypatch) -> None:
    """Each README command parses and passes its checks on the directory; then, from an SFT-like
    checkpoint of the loaded agent, the PPO command runs one small iteration (1 twin env, 2
    steps, one update through score_actions) and evaluate_ood loads what it saved. Runs last:
    it takes the module's agent away (one 7B-layout model in memory at a time)."""
    monkeypatch.chdir(tmp_path)  # the README's relative runs/... paths land here
    commands = readme_7b_commands(official_dir)
    assert set(commands) == {"sft_warmup", "ppo_vla", "evaluate_ood", "scripts/check_setup"}
    # The GPU user's first command (README, "GPUs") passes its checks on the directory too.
    spec = importlib.util.spec_from_file_location("check_setup", REPO / "scripts" / "check_setup.py")
    check_setup = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "check_setup", check_setup)  # dataclasses look their module up
    spec.loader.exec_module(check_setup)
    setup_args = parse_cli(check_setup.Args, check_setup.check_args, None, commands.pop("scripts/check_setup"))
    assert setup_args.model_path == str(official_dir) and setup_args.unnorm_key == "bridge_orig"
    modules = {name: importlib.import_module(name) for name in commands}
    args = {name: parse_cli(m.Args, m.check_args, getattr(m, "RECIPES", None), commands[name])
            for name, m in modules.items()}
    assert args["sft_warmup"].unnorm_key == "bridge_orig"

    # What sft_warmup leaves: an adapter on this base (as built; B = 0).
    start_checkpoint = Path(args["ppo_vla"].init_checkpoint)
    save_checkpoint(start_checkpoint, loaded.pop("agent"), {"algorithm": "sft", "iteration": 0})
    gc.collect()  # one 7B-layout model in memory at a time

    small = ["--env", "twin", "--num-envs", "1", "--num-steps", "2", "--total-iterations", "1",
             "--minibatch-size", "2", "--grad-accum-steps", "1", "--eval-every", "0",
             "--save-every", "1", "--device", "cpu"]
    ppo = modules["ppo_vla"]
    start = time.perf_counter()
    metrics = ppo.main(parse_cli(ppo.Args, ppo.check_args, ppo.RECIPES, commands["ppo_vla"] + small))
    print(f"\nPPO, 1 iteration of 1 env x 2 steps (load, 3 act, 1 update): "
          f"{time.perf_counter() - start:.0f} s, peak RSS {metrics['memory/peak_gb']:.1f} GB")
    assert math.isfinite(metrics["losses/value_loss"]) and math.isfinite(metrics["losses/grad_norm"])
    gc.collect()

    evaluate_ood = modules["evaluate_ood"]
    eval_args = args["evaluate_ood"]
    (label, path), = [evaluate_ood.parse_checkpoint(spec) for spec in eval_args.checkpoint]
    policy = evaluate_ood.load_policy(path, eval_args, torch.device("cpu"))
    assert policy.value_head is None and policy.image_size == 224
    bridge = NormStats.from_dict(json.loads((official_dir / "config.json").read_text())
                                 ["norm_stats"]["bridge_orig"]["action"])
    np.testing.assert_allclose(policy.norm_stats.q01, bridge.q01)  # the checkpoint's statistics
