"""Activation memory of one SFT micro-batch, with and without sft_warmup.py's bf16 autocast and
--gradient-checkpointing.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_sft_memory.py             # ~1.5 min, 10 GB RAM
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_sft_memory.py --skip-7b   # seconds
    python benchmarks/bench_sft_memory.py --device cuda     # on a GPU: also the real peak (7B)

Counted: the bytes of every tensor autograd saves for the backward during one forward of the
training loss (model.action_token_loss inside sft_warmup.training_precision), each storage once,
weights and buffers left out (resident anyway): the activations a micro-batch holds until its
backward. Four settings: "plain" (bf16 weights, peft's fp32 adapters, no autocast: sft_warmup.py
before), "autocast", "checkpointing" (model.enable_gradient_checkpointing) and "both".

1. The tiny preset (bf16, 64 px), whole model, at micro-batch 16.
2. OpenVLA-7B, estimated: models of its shapes (Llama-2-7B widths, heads and vocabulary; DINOv2
   ViT-L/14-reg4 and SigLIP So400m/14 at 224 px, 256 patches; random bf16 weights; LoRA r=32 on
   every linear layer, as common.ActorCritic puts it) cut to 1 or 2 Llama layers and 1 or 2
   running blocks per tower, at micro-batches 1 and 2 (283 Llama tokens with the prompt and 6
   action inputs). Bytes are linear in the batch (fixed part: autocast's bf16 copies of the LoRA
   weights), and differences give each kind of layer's bytes; the estimate scales them to 32
   Llama layers, 23 DINOv2 and 26 SigLIP blocks (each tower's last block never runs) at
   micro-batch 16, and adds the resident part: bf16 weights, fp32 LoRA weights + gradients +
   AdamW moments. With checkpointing the backward also holds one recomputed Llama layer at a
   time: added too. Not added: the backward's own temporaries and the allocator's slack.
   On the CPU, autocast keeps LayerNorm and softmax in bf16; CUDA's runs them in fp32, which
   adds fp32 copies of the towers' LayerNorm inputs (printed as an upper bound).
3. With --device cuda: the real peak (torch.cuda.max_memory_allocated) of one forward + backward
   of the full-depth random OpenVLA-7B at micro-batch 16, per setting.
Not a test: the measured bytes depend on torch's kernels (e.g. which SDPA kernel saves what).
"""

from __future__ import annotations

import argparse
import gc
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import ActorCritic, build_agent, resolve_device  # noqa: E402  (repo root: no package)
from model import (  # noqa: E402
    DINOV2_TIMM_ID,
    NUM_ACTION_BINS,
    SIGLIP_TIMM_ID,
    NormStats,
    OpenVLA,
    VLAConfig,
    action_token_loss,
    build_tiny_tokenizer,
    cast_parameters,
    enable_gradient_checkpointing,
    padded_vocab_size,
    tokenize_prompts,
)
from sft_warmup import training_precision  # noqa: E402

SETTINGS = ("plain", "autocast", "checkpointing", "both")
AUTOCAST = {"plain": False, "autocast": True, "checkpointing": False, "both": True}
CHECKPOINTING = {"plain": False, "autocast": False, "checkpointing": True, "both": True}
INSTRUCTION = "put the carrot on the plate"
LLAMA2_TEXT_VOCAB = 32000
MICRO_BATCH = 16  # sft_warmup.py's defaults: batch 32, 2 accumulation steps
DEPTH_7B = {"llama": 32, "dino": 23, "siglip": 26}  # layers that run (a tower's last block doesn't)


# =============================================================================================
# Measuring
# =============================================================================================


def saved_activation_bytes(forward: Callable[[], torch.Tensor], resident: list[torch.Tensor]
                           ) -> tuple[dict[torch.dtype, int], torch.Tensor]:
    """(bytes per dtype that autograd saves for the backward while forward() runs, its output).
    Each storage is counted once (q, k and v projections can share one saved input, views share
    storages); storages of `resident` (weights, buffers) are not counted. Saved tensors stay
    referenced by the graph while the output lives, so no two counted storages share an address."""
    seen = {t.untyped_storage().data_ptr() for t in resident}
    by_dtype: dict[torch.dtype, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            by_dtype[t.dtype] = by_dtype.get(t.dtype, 0) + t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        output = forward()
    return by_dtype, output


def sft_inputs(agent: ActorCritic, batch: int, seed: int = 0):
    """A micro-batch as sft_warmup.token_loss builds it: model inputs and action tokens [B, 7]."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (batch, agent.image_size, agent.image_size, 3), dtype=np.uint8)
    inputs = agent.prepare_inputs(images, [INSTRUCTION] * batch)
    first = agent.action_tokenizer.first_id
    tokens = torch.as_tensor(rng.integers(first, first + NUM_ACTION_BINS, (batch, 7)),
                             device=agent.device)
    return inputs, tokens


def training_loss(agent: ActorCritic, inputs, tokens, autocast: bool) -> torch.Tensor:
    """sft_warmup.py's training forward (with or without its precision context)."""
    agent.train()  # transformers checkpoints its layers in train mode only
    if not autocast:
        return action_token_loss(agent.vla, inputs, tokens)[0]
    with training_precision(agent):
        return action_token_loss(agent.vla, inputs, tokens)[0]


def set_checkpointing(agent: ActorCritic, enable: bool) -> None:
    """model.enable_gradient_checkpointing, or back to none (transformers' and timm's switches)."""
    if enable:
        enable_gradient_checkpointing(agent.vla)
        return
    agent.vla.language_model.activation_checkpointing_disable()
    for vit in (agent.vla.vision_backbone.featurizer, agent.vla.vision_backbone.fused_featurizer):
        vit.set_grad_checkpointing(False)


def measure_settings(agent: ActorCritic, batch: int) -> dict[str, dict[torch.dtype, int]]:
    """Saved bytes per dtype of one training forward in each setting."""
    inputs, tokens = sft_inputs(agent, batch)
    resident = [*agent.parameters(), *agent.buffers()]
    result = {}
    for setting in SETTINGS:
        set_checkpointing(agent, CHECKPOINTING[setting])
        result[setting], _ = saved_activation_bytes(
            lambda: training_loss(agent, inputs, tokens, AUTOCAST[setting]), resident)  # noqa: B023
    set_checkpointing(agent, False)
    return result


# =============================================================================================
# OpenVLA-7B's shapes
# =============================================================================================


def openvla_7b_config(llama_layers: int = 32, dino_blocks: int = 23, siglip_blocks: int = 26
                      ) -> VLAConfig:
    """OpenVLA-7B's config with `*_blocks` running blocks per tower (depth + 1: the last is
    built but never run) and `llama_layers` decoder layers."""
    return VLAConfig(
        timm_model_ids=[DINOV2_TIMM_ID, SIGLIP_TIMM_ID],
        timm_model_kwargs=[dict(depth=dino_blocks + 1), dict(depth=siglip_blocks + 1)],
        image_sizes=[224, 224],
        text_config=dict(
            vocab_size=padded_vocab_size(LLAMA2_TEXT_VOCAB), hidden_size=4096,
            intermediate_size=11008, num_hidden_layers=llama_layers, num_attention_heads=32,
            num_key_value_heads=32, max_position_embeddings=2048, rms_norm_eps=1e-5,
            bos_token_id=1, eos_token_id=2, pad_token_id=LLAMA2_TEXT_VOCAB,
            tie_word_embeddings=False,
        ),
        pad_token_id=LLAMA2_TEXT_VOCAB,
    )


def random_agent(config: VLAConfig, device: torch.device) -> ActorCritic:
    """An SFT agent (no critic, LoRA r=32 everywhere) on random bf16 weights, built in bf16 on
    `device` (never an fp32 copy). Its text ids come from the tiny tokenizer: a prompt of
    about the real length, all valid ids in Llama-2's vocabulary."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            vla = OpenVLA(config)
    finally:
        torch.set_default_dtype(previous)  # LoRA adapters are created fp32, as peft does
    cast_parameters(vla, device, torch.bfloat16)
    torch.manual_seed(0)
    return ActorCritic(vla, build_tiny_tokenizer(), NormStats.identity(), model_path=None,
                       base_fingerprint="random-7b", critic=None)


def estimate_7b(device: torch.device) -> dict[str, dict[str, int]]:
    """Per setting: bytes of OpenVLA-7B's activations at MICRO_BATCH (and of one Llama layer's,
    all and fp32 only), from cut models at micro-batches 1 and 2: bytes = fixed + batch x
    per-sample (the fixed part: autocast's bf16 copies of the LoRA weights)."""
    cuts = {"base": (1, 1, 1), "llama": (2, 1, 1), "dino": (1, 2, 1), "siglip": (1, 1, 2)}
    total, fp32 = {}, {}
    for name, depths in cuts.items():
        agent = random_agent(openvla_7b_config(*depths), device)
        one, two = measure_settings(agent, batch=1), measure_settings(agent, batch=2)
        total[name], fp32[name] = {}, {}
        for setting in SETTINGS:
            for result, dtypes in ((total[name], None), (fp32[name], [torch.float32])):
                b1, b2 = (sum(n for d, n in m[setting].items() if dtypes is None or d in dtypes)
                          for m in (one, two))
                result[setting] = 2 * b1 - b2 + MICRO_BATCH * (b2 - b1)  # at MICRO_BATCH
        print(f"  cut model {depths} (Llama layers, DINOv2, SigLIP blocks) at micro-batch "
              f"{MICRO_BATCH}: " + ", ".join(f"{s} {format_bytes(b)}" for s, b in total[name].items()),
              flush=True)
        del agent
        gc.collect()
    estimate = {}
    for setting in SETTINGS:
        per_layer = {kind: total[kind][setting] - total["base"][setting] for kind in DEPTH_7B}
        activations = total["base"][setting] + sum((DEPTH_7B[k] - 1) * per_layer[k] for k in DEPTH_7B)
        estimate[setting] = {"activations": activations, "llama_layer": per_layer["llama"],
                             "llama_layer_fp32": fp32["llama"][setting] - fp32["base"][setting]}
    for setting in ("checkpointing", "both"):  # the backward recomputes one layer at a time
        estimate[setting]["recompute"] = estimate["autocast" if AUTOCAST[setting] else "plain"]["llama_layer"]
    return estimate


def resident_bytes_7b() -> tuple[int, int]:
    """(bf16 weights, fp32 LoRA weights + gradients + 2 AdamW moments) of OpenVLA-7B with
    LoRA r=32 everywhere, counted on the meta device (nothing allocated)."""
    agent = random_agent(openvla_7b_config(), torch.device("meta"))
    lora = sum(p.numel() for p in agent.lora_parameters())
    base = sum(p.numel() for p in agent.parameters()) - lora
    return 2 * base, 16 * lora


def cuda_layernorm_bound() -> int:
    """Upper bound of what CUDA's autocast adds over the CPU's: an fp32 copy of the input of
    both LayerNorms of every running ViT block (the CPU's autocast saves them in bf16)."""
    tokens = {"dino": 256 + 5, "siglip": 256}  # DINOv2 adds a class token and 4 registers
    width = {"dino": 1024, "siglip": 1152}
    return MICRO_BATCH * sum(2 * 4 * tokens[k] * width[k] * DEPTH_7B[k] for k in tokens)


def cuda_peak_gb(device: torch.device) -> dict[str, float]:
    """The real peak of one forward + backward of the full random OpenVLA-7B at MICRO_BATCH."""
    agent = random_agent(openvla_7b_config(), device)
    inputs, tokens = sft_inputs(agent, MICRO_BATCH)
    peaks = {}
    for setting in SETTINGS:
        set_checkpointing(agent, CHECKPOINTING[setting])
        agent.zero_grad(set_to_none=True)
        torch.cuda.reset_peak_memory_stats(device)
        try:
            training_loss(agent, inputs, tokens, AUTOCAST[setting]).backward()
            peaks[setting] = torch.cuda.max_memory_allocated(device) / 2**30
        except torch.OutOfMemoryError:
            peaks[setting] = float("inf")
        gc.collect()
        torch.cuda.empty_cache()
    return peaks


# =============================================================================================
# Report
# =============================================================================================


def format_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def report_tiny(device: torch.device) -> None:
    agent = build_agent(critic=None, device=device, dtype=torch.bfloat16)
    saved = {setting: sum(b.values()) for setting, b in measure_settings(agent, MICRO_BATCH).items()}
    print(f"RESULT tiny preset, bf16, {agent.image_size}px, micro-batch {MICRO_BATCH}, saved for "
          "the backward: " + ", ".join(f"{s} {format_bytes(b)} ({b / saved['plain']:.2f}x)"
                                       for s, b in saved.items()))


def report_7b(device: torch.device) -> None:
    prompt = tokenize_prompts(build_tiny_tokenizer(), [INSTRUCTION])[0]
    print(f"OpenVLA-7B shapes on {device.type}, {len(prompt) + 256 + 6} Llama tokens (prompt, "
          "256 patches, 6 action inputs); cut models, ~30 s each on a CPU:")
    estimate = estimate_7b(device)
    weights, lora_state = resident_bytes_7b()
    plain = estimate["plain"]["activations"]
    for setting, parts in estimate.items():
        total = weights + lora_state + parts["activations"] + parts.get("recompute", 0)
        recompute = (f" + {format_bytes(parts['recompute'])} one recomputed Llama layer"
                     if "recompute" in parts else "")
        print(f"RESULT OpenVLA-7B estimate, micro-batch {MICRO_BATCH}, {setting}: activations "
              f"{format_bytes(parts['activations'])} ({parts['activations'] / plain:.2f}x){recompute}; "
              f"with {format_bytes(weights)} weights and {format_bytes(lora_state)} LoRA state: "
              f"~{format_bytes(total)}. Per Llama layer {format_bytes(parts['llama_layer'])}, "
              f"of which fp32 {format_bytes(parts['llama_layer_fp32'])}")
    if device.type == "cpu":
        print(f"  (on CUDA, autocast's fp32 LayerNorms add at most {format_bytes(cuda_layernorm_bound())} "
              "to the autocast settings)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="'cpu', 'cuda' or 'cuda:N'")
    parser.add_argument("--skip-7b", action="store_true", help="only the tiny preset")
    args = parser.parse_args()
    device = resolve_device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"error: --device {args.device}: no CUDA device is available here")
    report_tiny(device)
    if args.skip_7b:
        return
    report_7b(device)
    if device.type == "cuda":
        peaks = cuda_peak_gb(device)
        print(f"RESULT OpenVLA-7B (random weights) measured peak, micro-batch {MICRO_BATCH}: "
              + ", ".join(f"{s} {gb:.1f} GiB" for s, gb in peaks.items()))


if __name__ == "__main__":
    main()
