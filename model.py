"""OpenVLA: the model, its tokenizers and action tokens, the tiny preset, the official layout.

nanoGPT-style, the model lives here, apart from training (common.py holds the RL agent built on
it). Read top to bottom; the sections follow the data:

  1. config and presets   `tiny` (random weights, built in code) | `openvla-7b` (weights on disk)
  2. action tokenizer     256 bins on [-1, 1] <-> the LAST 256 ids of the text vocabulary
  3. model                DINOv2 + SigLIP patches -> projector -> Llama, patches right after BOS
  4. loading              the official checkpoint layout (and writing it, for tests and exports)

Facts and numbers: arXiv 2406.09246 (OpenVLA) and 2505.19789 (the study), summarised in
docs/PAPER_NOTES.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from accelerate import init_empty_weights
from safetensors import safe_open
from safetensors.torch import save_file
from timm.layers import LayerScale
from tokenizers import Tokenizer, decoders, models, normalizers
from transformers import (
    Cache,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaTokenizerFast,
    PreTrainedTokenizerFast,
)
from transformers.utils import is_protobuf_available, is_sentencepiece_available

# =============================================================================================
# 1. Config and presets
# =============================================================================================

ACTION_DIM = 7  # dx, dy, dz, droll, dpitch, dyaw, gripper
GRIPPER_DIM = 6
NUM_ACTION_BINS = 256
PROMPT_TEMPLATE = "In: What action should the robot take to {}?\nOut:"
EMPTY_PIECE = "\u2581"  # SentencePiece's bare word boundary "▁" (Llama id 29871): ends prompts

DINOV2_TIMM_ID = "vit_large_patch14_reg4_dinov2.lvd142m"
SIGLIP_TIMM_ID = "vit_so400m_patch14_siglip_224"
# The 6 input channels: the same image normalised once for each tower.
DINOV2_MEAN, DINOV2_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet
SIGLIP_MEAN, SIGLIP_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)

OPENVLA_IMAGE_SIZE = 224  # both towers of OpenVLA-7B take 224 px images
TINY_IMAGE_SIZE = 64  # 64 px / patch 16 = 4 x 4 = 16 patches per tower (docs/PRETRAINING.md)
TINY_PATCH_SIZE = 16
TINY_BASE_SEED = 20250519  # fixed: every tiny base is identical, so any saved LoRA fits any run


class CheckpointError(ValueError):
    """A checkpoint or model directory is missing, corrupt or does not match. One-line message."""


def parse_file(path: Path, reader: Callable[[Path], Any]) -> Any:
    """reader(path), with any parsing failure turned into a one-line CheckpointError."""
    try:
        return reader(path)
    except Exception as err:  # safetensors, pickle and json all raise their own types
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"{path} is corrupt: {message}") from None


# The Llama fields the model is built from, each resolved once (resolve_text_config) from
# LlamaConfig with its defaults filling whatever a config.json leaves out: the official
# OpenVLA-7B config.json's text_config holds only model_type, pad_token_id, torch_dtype and
# vocab_size (openvla's configuration_prismatic.py and HF conversion script), so its Llama-2-7B
# shape (4096 wide, MLP 11008, 32 layers, 32 heads, RMSNorm eps 1e-6) is LlamaConfig's defaults.
LLAMA_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act",
                "max_position_embeddings", "rms_norm_eps", "rope_parameters", "attention_bias",
                "attention_dropout", "mlp_bias", "bos_token_id", "eos_token_id", "pad_token_id",
                "tie_word_embeddings", "initializer_range")


def resolve_text_config(given: dict[str, Any]) -> dict[str, Any]:
    """A config.json's text_config -> every field of LLAMA_FIELDS, LlamaConfig's default where
    not given. An official 4-key text_config and a full one of the same model resolve alike."""
    given = {k: v for k, v in given.items() if k not in ("model_type", "torch_dtype", "dtype")}
    try:
        llama = LlamaConfig(**given).to_dict()
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"text_config is not a Llama config: {err}") from None
    return {name: llama[name] for name in LLAMA_FIELDS}


@dataclass
class ImageTransform:
    """uint8 observation -> each tower's input: resize to the tower's size, scale to [0, 1],
    normalise with the tower's mean and std (one entry per tower: DINOv2, SigLIP).

    The defaults are the tiny preset's. A model directory's preprocessor_config.json overrides
    them (read_image_transform): the official OpenVLA-7B one says "resize-naive", bicubic for
    both towers (torchvision resize, interpolation=3, antialias=True) and bf16-rounded ImageNet
    statistics for DINOv2: means [0.484375, 0.455078125, 0.40625], stds [0.228515625,
    0.2236328125, 0.224609375]; SigLIP 0.5 / 0.5.
    """

    interpolations: list[str] = field(default_factory=lambda: ["bilinear", "bilinear"])
    antialias: bool = True
    means: list[list[float]] = field(default_factory=lambda: [list(DINOV2_MEAN), list(SIGLIP_MEAN)])
    stds: list[list[float]] = field(default_factory=lambda: [list(DINOV2_STD), list(SIGLIP_STD)])
    # "resize-naive" squashes to a square; "resize-crop" and "letterbox" do the same to a square
    # image (all the envs render square ones), and are refused for others (preprocess_images).
    resize_strategy: str = "resize-naive"

    def __post_init__(self) -> None:  # JSON-stable: lists of plain floats, compared on load
        self.interpolations = [str(m) for m in self.interpolations]
        self.means = [[float(v) for v in m] for m in self.means]
        self.stds = [[float(v) for v in s] for s in self.stds]


@dataclass
class VLAConfig:
    """The model's shape. Field names follow the official OpenVLA config.json.

    text_config is resolved on construction (resolve_text_config): whatever config.json gave,
    every size is read from the resolved fields after that, and to_dict() is deterministic
    (checkpoints store it and compare it on load).
    """

    timm_model_ids: list[str]  # [DINOv2 tower, SigLIP tower]
    image_sizes: list[int]  # input resolution of each tower (equal)
    text_config: dict[str, Any]  # LlamaConfig fields; vocab_size is the padded embedding size
    pad_token_id: int  # = size of the text vocabulary (32000): the pad token is appended to it
    timm_override_act_layers: list[str | None] = field(default_factory=lambda: [None, None])
    # Not in the official config: timm keyword overrides that shrink the towers (tiny preset).
    timm_model_kwargs: list[dict[str, Any]] = field(default_factory=lambda: [{}, {}])
    pad_to_multiple_of: int = 64
    n_action_bins: int = NUM_ACTION_BINS
    use_fused_vision_backbone: bool = True
    # Not in config.json: from preprocessor_config.json, where the official checkpoint keeps it.
    image_transform: ImageTransform = field(default_factory=ImageTransform)

    def __post_init__(self) -> None:
        self.text_config = resolve_text_config(self.text_config)
        if isinstance(self.image_transform, dict):
            self.image_transform = ImageTransform(**self.image_transform)
        self.image_sizes = [int(s) for s in self.image_sizes]

    @property
    def image_size(self) -> int:
        return self.image_sizes[0]

    @property
    def hidden_size(self) -> int:
        return self.text_config["hidden_size"]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VLAConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def padded_vocab_size(text_vocab_size: int, multiple: int = 64) -> int:
    """Embedding rows: the text vocabulary + 1 pad token, rounded up (32000 + 1 -> 32064)."""
    return math.ceil((text_vocab_size + 1) / multiple) * multiple


def tiny_vla_config(image_size: int, text_vocab_size: int, patch_size: int = TINY_PATCH_SIZE) -> VLAConfig:
    """The same modules as OpenVLA-7B at toy width and depth: ~1.5M weights (7B: 7.54B).

    Sized for learning on a 2-core CPU (docs/PRETRAINING.md, "Reading the names"): the language model's
    cost grows with its sequence, so 16 patches of 16 px (the 7B has 256 of 14 px), and width
    96 (twice the samples/s of 128 at the same held-out accuracy on the twin).
    """
    return VLAConfig(
        timm_model_ids=[DINOV2_TIMM_ID, SIGLIP_TIMM_ID],
        timm_model_kwargs=[  # DINOv2-L: 1024 wide, 24 deep; SigLIP-So400m: 1152 wide, 27 deep
            dict(embed_dim=64, depth=3, num_heads=2, patch_size=patch_size),
            dict(embed_dim=96, depth=3, num_heads=2, patch_size=patch_size),
        ],
        image_sizes=[image_size, image_size],
        text_config=dict(
            vocab_size=padded_vocab_size(text_vocab_size),
            hidden_size=96,  # Llama-2-7B: 4096, 11008, 32 layers, 32 heads
            intermediate_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=1024,
            rms_norm_eps=1e-6,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=text_vocab_size,
            tie_word_embeddings=False,
            # Llama's default 0.02 leaves a random tiny model's attention uniform and its
            # residual stream blind to the instruction, so LoRA took hundreds of steps to learn
            # even a one-word condition; at 0.1 it takes ~40 (measured on the one-step toy task
            # that preceded the twin).
            initializer_range=0.1,
        ),
        pad_token_id=text_vocab_size,
    )


# Words that get a single "▁word" piece in the tiny tokenizer; anything else is spelled out in
# characters (or UTF-8 bytes), so every instruction can be tokenized.
TINY_WORDS = """
In What action should the robot take to
put place pick move push lift stack grasp grab set drop bring open close turn reach go
on onto in into top of at near next beside left right front behind up down and a an it from
with the this that its is
plate bowl cup mug carrot eggplant spoon fork knife banana apple orange lemon peach pear
strawberry tomato potato corn bread cube block can bottle sponge towel basket box tray pot pan
sink table drawer shelf cloth coke pepsi sprite ball toy object target square receptacle
red green blue yellow white black purple pink brown gray grey
lay get could you please triangle cross diamond
""".split()


def build_tiny_tokenizer(vocab_size: int | None = None) -> PreTrainedTokenizerFast:
    """A Llama-like SentencePiece (unigram) tokenizer built in code: no download, always the same.

    Ids: <unk> <s> </s> (0-2, as in Llama), 256 byte-fallback pieces, "▁", printable characters,
    "▁word" pieces, then 256 pieces that text never produces (they hold the action bins, like
    Llama's last 256 ids), then <pad> (= the text vocabulary size, like OpenVLA's 32000).
    vocab_size: pad the text vocabulary to this size with unused pieces before the action ones
    (32000: the action ids are 31744..31999, as in Llama-2).
    """
    never = -1e4  # a score no character path loses to: text never yields these pieces
    pieces = [("<unk>", never), ("<s>", never), ("</s>", never)]
    pieces += [(f"<0x{b:02X}>", never) for b in range(256)]
    pieces += [(EMPTY_PIECE, -3.0)]
    pieces += [(c, -5.0) for c in string.printable if not c.isspace()]
    pieces += [(EMPTY_PIECE + w, -1.0) for w in dict.fromkeys(TINY_WORDS)] + [("Out", -1.0)]
    if vocab_size is not None:
        filler = vocab_size - len(pieces) - NUM_ACTION_BINS
        if filler < 0:
            raise ValueError(f"vocab_size must be at least {len(pieces) + NUM_ACTION_BINS}")
        pieces += [(f"<unused_{i:05d}>", never) for i in range(filler)]
    pieces += [(f"<action_{i:03d}>", never) for i in range(NUM_ACTION_BINS)]

    backend = Tokenizer(models.Unigram(pieces, unk_id=0, byte_fallback=True))
    # Like Llama: spaces become "▁" and the text starts with one.
    backend.normalizer = normalizers.Sequence(
        [normalizers.Prepend(EMPTY_PIECE), normalizers.Replace(" ", EMPTY_PIECE)]
    )
    backend.decoder = decoders.Sequence(
        [decoders.Replace(EMPTY_PIECE, " "), decoders.ByteFallback(), decoders.Fuse(),
         decoders.Strip(" ", 1, 0)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.add_special_tokens({"pad_token": "<pad>"})  # id = len(pieces), past the text vocab
    return tokenizer


def model_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA (as the paper trains), fp32 on CPU (where bf16 is slow and imprecise)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


# =============================================================================================
# 2. Action tokenizer and normalisation statistics
# =============================================================================================


def first_action_id(text_vocab_size: int, n_bins: int = NUM_ACTION_BINS) -> int:
    """The action ids are the text vocabulary's last n_bins (31744..31999 in OpenVLA-7B): the
    tokenizer and the loss must agree on where they start, so both ask here."""
    return text_vocab_size - n_bins


class ActionTokenizer:
    """Normalised actions in [-1, 1] <-> the last 256 ids of the text vocabulary.

    encode: 256 uniform bin edges, np.digitize -> bin in 1..256, token = vocab_size - bin.
    decode: bin = vocab_size - token, clip(bin - 1, 0, 254) -> one of the 255 bin centres.
    """

    def __init__(self, vocab_size: int, n_bins: int = NUM_ACTION_BINS) -> None:
        self.vocab_size = vocab_size  # text vocabulary without the pad token (32000)
        self.n_bins = n_bins
        self.bins = np.linspace(-1.0, 1.0, n_bins)  # [256] edges
        self.bin_centers = (self.bins[:-1] + self.bins[1:]) / 2  # [255]
        self.first_id = first_action_id(vocab_size, n_bins)  # action ids: first_id .. vocab_size - 1

    def encode(self, actions: np.ndarray) -> np.ndarray:
        """[..., 7] float in [-1, 1] (clipped) -> [..., 7] int64 token ids."""
        x = np.clip(np.asarray(actions, dtype=np.float64), -1.0, 1.0)
        return (self.vocab_size - np.digitize(x, self.bins)).astype(np.int64)

    def decode(self, token_ids: np.ndarray | torch.Tensor) -> np.ndarray:
        """[..., 7] token ids -> [..., 7] float32 normalised actions (bin centres)."""
        bins = self.vocab_size - np.asarray(token_ids, dtype=np.int64)
        return self.bin_centers[np.clip(bins - 1, 0, len(self.bin_centers) - 1)].astype(np.float32)


@dataclass
class NormStats:
    """Per-dimension 1st/99th percentiles of the training actions: a = 0.5 (x + 1)(q99 - q01) + q01.

    `mask` is False where a dimension is left raw (the gripper). The gripper is then binarised:
    > 0.5 -> +1 (open), else -1 (close), the env's convention.
    """

    q01: np.ndarray  # [7]
    q99: np.ndarray  # [7]
    mask: np.ndarray = field(default_factory=lambda: np.arange(ACTION_DIM) != GRIPPER_DIM)

    def __post_init__(self) -> None:
        self.q01 = np.asarray(self.q01, dtype=np.float64)
        self.q99 = np.asarray(self.q99, dtype=np.float64)
        self.mask = np.asarray(self.mask, dtype=bool)

    @classmethod
    def identity(cls) -> NormStats:
        """No statistics: q01 = -1, q99 = 1, so actions pass through unchanged."""
        return cls(q01=-np.ones(ACTION_DIM), q99=np.ones(ACTION_DIM))

    def unnormalize(self, x: np.ndarray) -> np.ndarray:
        """[..., 7] normalised -> [..., 7] float32 env actions, gripper binarised."""
        x = np.asarray(x, dtype=np.float64)
        a = np.where(self.mask, 0.5 * (x + 1.0) * (self.q99 - self.q01) + self.q01, x)
        a[..., GRIPPER_DIM] = np.where(a[..., GRIPPER_DIM] > 0.5, 1.0, -1.0)
        return a.astype(np.float32)

    def normalize(self, a: np.ndarray) -> np.ndarray:
        """[..., 7] env actions -> [..., 7] float32 in [-1, 1] (gripper left raw): SFT targets."""
        a = np.asarray(a, dtype=np.float64)
        scale = np.maximum(self.q99 - self.q01, 1e-8)
        x = np.where(self.mask, 2.0 * (a - self.q01) / scale - 1.0, a)
        return np.clip(x, -1.0, 1.0).astype(np.float32)

    def to_dict(self) -> dict[str, list]:
        return {"q01": self.q01.tolist(), "q99": self.q99.tolist(), "mask": self.mask.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NormStats:
        mask = d.get("mask")
        if mask is None:
            return cls(q01=d["q01"], q99=d["q99"])
        return cls(q01=d["q01"], q99=d["q99"], mask=mask)


# =============================================================================================
# 3. Model: fused ViTs -> projector -> Llama
# =============================================================================================


class LayerScaleFactor(nn.Module):
    """timm's LayerScale with its weight named `scale_factor`, the official checkpoint's name.

    (Prismatic renamed `gamma` because old Hugging Face loaders rewrote keys containing "gamma".)
    """

    def __init__(self, gamma: torch.Tensor) -> None:
        super().__init__()
        self.scale_factor = nn.Parameter(gamma.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale_factor


def create_vit(config: VLAConfig, tower: int) -> nn.Module:
    """Tower 0 (DINOv2) or 1 (SigLIP): a timm ViT with no classifier head, never pretrained
    (the weights come from our own files), with LayerScale renamed as in the checkpoint."""
    overrides = dict(config.timm_model_kwargs[tower])
    if config.timm_override_act_layers[tower]:
        overrides["act_layer"] = config.timm_override_act_layers[tower]
    vit = timm.create_model(config.timm_model_ids[tower], pretrained=False, num_classes=0,
                            img_size=config.image_sizes[tower], **overrides)
    for block in vit.blocks:
        if isinstance(block.ls1, LayerScale):
            block.ls1 = LayerScaleFactor(block.ls1.gamma)
            block.ls2 = LayerScaleFactor(block.ls2.gamma)
    return vit


def patch_features(vit: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """[B, 3, S, S] -> [B, P, D]: patch tokens of the SECOND-TO-LAST block, prefix tokens dropped.

    (OpenVLA reads that block, as Prismatic found it beats the last one; the last block and the
    pooling head are never run, but stay in the model so the official weights load strictly.)
    """
    (features,) = vit.forward_intermediates(
        pixels, indices=[len(vit.blocks) - 2], stop_early=True, output_fmt="NLC",
        intermediates_only=True,
    )
    return features


class FusedVisionBackbone(nn.Module):
    """DINOv2 (`featurizer`) and SigLIP (`fused_featurizer`) side by side, joined per patch."""

    def __init__(self, config: VLAConfig) -> None:
        super().__init__()
        self.featurizer, self.fused_featurizer = create_vit(config, 0), create_vit(config, 1)
        self.embed_dim = self.featurizer.embed_dim + self.fused_featurizer.embed_dim  # 2176

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        dino_pixels, siglip_pixels = pixels.split([3, 3], dim=1)  # [B, 6, S, S] -> 2 x [B, 3, S, S]
        return torch.cat(
            [patch_features(self.featurizer, dino_pixels),
             patch_features(self.fused_featurizer, siglip_pixels)],
            dim=-1,
        )  # [B, P, 1024 + 1152]


class Projector(nn.Module):
    """Patch features -> LLM embeddings: 2176 -> 8704 -> 4096 -> 4096 with GELUs."""

    def __init__(self, vision_dim: int, llm_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(vision_dim, 4 * vision_dim)
        self.act_fn1 = nn.GELU()
        self.fc2 = nn.Linear(4 * vision_dim, llm_dim)
        self.act_fn2 = nn.GELU()
        self.fc3 = nn.Linear(llm_dim, llm_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.act_fn2(self.fc2(self.act_fn1(self.fc1(x)))))


IMAGE_PLACEHOLDER = -1  # marks the patch positions in input_ids; replaced by projected patches


class OpenVLA(nn.Module):
    """The VLA. Module names match the official checkpoint's weight names."""

    def __init__(self, config: VLAConfig) -> None:
        super().__init__()
        self.config = config
        self.vision_backbone = FusedVisionBackbone(config)
        text_config = LlamaConfig(**config.text_config)
        self.projector = Projector(self.vision_backbone.embed_dim, text_config.hidden_size)
        self.language_model = LlamaForCausalLM(text_config)

    @property
    def num_patches(self) -> int:
        return self.vision_backbone.featurizer.patch_embed.num_patches  # (S / 14)^2

    def embed_inputs(self, pixel_values: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, L] with IMAGE_PLACEHOLDER at patch positions -> embeddings [B, L, D]."""
        patches = self.projector(self.vision_backbone(pixel_values))  # [B, P, D]
        is_patch = input_ids == IMAGE_PLACEHOLDER  # exactly P per row, in order
        embeds = self.language_model.get_input_embeddings()(input_ids.clamp(min=0))
        return embeds.masked_scatter(is_patch.unsqueeze(-1), patches.to(embeds.dtype))


def resize_like_pil(x: torch.Tensor, size: int, mode: str, antialias: bool) -> torch.Tensor:
    """[B, 3, H, W] float uint8 levels (0..255) -> [B, 3, size, size], as PIL resizes a uint8
    image (what the official processor's torchvision resize does to its PIL input): a
    horizontal pass, then a vertical one, each rounded to uint8. Within one level of PIL's
    output (its fixed-point weights); in one float pass, high-frequency content could differ by
    ~20 levels where PIL clips the first pass's overshoot."""
    for shape in ((x.shape[-2], size), (size, size)):
        if tuple(x.shape[-2:]) != shape:
            x = F.interpolate(x, size=shape, mode="nearest-exact" if mode == "nearest" else mode,
                              antialias=antialias and mode != "nearest",
                              align_corners=None if mode == "nearest" else False)
            x = x.round().clamp(0.0, 255.0)
    return x


def preprocess_images(images: np.ndarray | torch.Tensor, image_size: int, device: torch.device,
                      dtype: torch.dtype, transform: ImageTransform | None = None) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> [B, 6, S, S]: resized, normalised for DINOv2 and for SigLIP.

    `transform` (default: the tiny preset's) sets each tower's interpolation, antialiasing and
    statistics; a model directory's preprocessor_config.json fills it (the official OpenVLA one:
    bicubic with antialiasing, by torchvision on a PIL image, which resize_like_pil follows).
    Images already S x S are not resized (PIL returns those unchanged too).
    """
    transform = transform or ImageTransform()
    x = torch.as_tensor(np.asarray(images)).to(device)  # move uint8: 4x less to copy
    x = x.permute(0, 3, 1, 2).float()  # [B, 3, H, W] in 0..255
    height, width = x.shape[-2:]
    if height != width and transform.resize_strategy != "resize-naive":
        raise ValueError(f"images are {height}x{width}: image_resize_strategy "
                         f"{transform.resize_strategy!r} is implemented for square images only")
    resized = {mode: resize_like_pil(x, image_size, mode, transform.antialias) / 255.0
               for mode in dict.fromkeys(transform.interpolations)}  # one resize per mode
    towers = [(resized[mode] - x.new_tensor(mean).view(1, 3, 1, 1)) / x.new_tensor(std).view(1, 3, 1, 1)
              for mode, mean, std in zip(transform.interpolations, transform.means, transform.stds,
                                         strict=True)]
    return torch.cat(towers, dim=1).to(dtype)


def build_prompt(instruction: str) -> str:
    return PROMPT_TEMPLATE.format(instruction.lower())


def tokenize_prompts(tokenizer: PreTrainedTokenizerFast,
                     instructions: list[str]) -> list[list[int]]:
    """Prompt ids per instruction: BOS, the prompt, and "▁" at the end if the text did not end so.

    (OpenVLA was trained with the "▁" last, so the first action token always follows it.)
    """
    empty_id = tokenizer.convert_tokens_to_ids(EMPTY_PIECE)
    texts = tokenizer([build_prompt(i) for i in instructions], add_special_tokens=False).input_ids
    return [[tokenizer.bos_token_id] + ids + ([] if ids[-1] == empty_id else [empty_id])
            for ids in texts]


def build_input_ids(prompt_ids: list[list[int]], num_patches: int,
                    pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded [B, L] ids (patch slots right after BOS) and attention mask.

    Left padding puts every prompt's last token in the last column, where decoding continues.
    """
    rows = [ids[:1] + [IMAGE_PLACEHOLDER] * num_patches + ids[1:] for ids in prompt_ids]
    length = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, length - len(row):] = torch.tensor(row)
        attention_mask[i, length - len(row):] = 1
    return input_ids, attention_mask


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, L] -> [B, L]: 0, 1, 2, ... from each row's first real token (pads get 0)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def run_language_model(vla: OpenVLA, embeds: torch.Tensor, attention_mask: torch.Tensor,
                       position_ids: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
    """Llama decoder over embeds [B, L, D] -> last-layer hidden states [B, L, D].

    With a cache, the new keys and values are written into it. attention_mask [B, K] covers
    cached + new positions (DynamicCache), or every slot of a StaticCache (K = max_cache_len,
    slots not yet written count as real: the causal mask hides them).
    """
    out = vla.language_model.model(
        inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
        past_key_values=cache, use_cache=cache is not None,
    )
    return out.last_hidden_state


@dataclass
class PromptInputs:
    """One batch of observations, ready for the model."""

    pixel_values: torch.Tensor  # [B, 6, S, S]
    input_ids: torch.Tensor  # [B, L] left-padded, IMAGE_PLACEHOLDER at patch slots
    attention_mask: torch.Tensor  # [B, L]


def prepare_inputs(vla: OpenVLA, tokenizer: PreTrainedTokenizerFast,
                   images: np.ndarray | torch.Tensor, instructions: Sequence[str]) -> PromptInputs:
    """uint8 images [B, H, W, 3] and B instructions -> the model's inputs, on its device."""
    if len(images) != len(instructions):
        raise ValueError(f"{len(images)} images but {len(instructions)} instructions")
    input_ids, attention_mask = build_input_ids(tokenize_prompts(tokenizer, list(instructions)),
                                                vla.num_patches, vla.config.pad_token_id)
    weight = vla.projector.fc3.weight
    pixels = preprocess_images(images, vla.config.image_size, weight.device, weight.dtype,
                               vla.config.image_transform)
    return PromptInputs(pixels, input_ids.to(weight.device), attention_mask.to(weight.device))


def predicting_hidden_states(vla: OpenVLA, inputs: PromptInputs, tokens: torch.Tensor) -> torch.Tensor:
    """One teacher-forced forward over prompt + action tokens [B, 7] -> the last-layer hidden
    states at the 7 positions that predict them [B, 7, D] (index 0 is h0). The 7th token is
    left out of the input: its output would predict an 8th token."""
    embeds = vla.embed_inputs(inputs.pixel_values, inputs.input_ids)  # [B, L, D]
    action_embeds = vla.language_model.get_input_embeddings()(tokens[:, :-1])  # [B, 6, D]
    attention_mask = torch.cat([inputs.attention_mask,
                                inputs.attention_mask.new_ones(len(tokens), ACTION_DIM - 1)], 1)
    hidden = run_language_model(vla, torch.cat([embeds, action_embeds], 1), attention_mask,
                                position_ids_from_mask(attention_mask))
    return hidden[:, -ACTION_DIM:]


def action_token_loss(vla: OpenVLA, inputs: PromptInputs, tokens: torch.Tensor,
                      loss_vocab: str = "full") -> tuple[torch.Tensor, torch.Tensor]:
    """OpenVLA's training loss: teacher-forced cross-entropy on the 7 action tokens [B, 7]
    -> (loss, argmax action tokens [B, 7], i.e. greedy decoding given the correct prefix).

    loss_vocab "full": softmax over the whole vocabulary, as OpenVLA trains (the model also
    learns that text ids are wrong here); "action": over the 256 action ids only, the
    distribution RL samples from.
    """
    hidden = predicting_hidden_states(vla, inputs, tokens)
    logits = vla.language_model.lm_head(hidden).float()  # [B, 7, V]
    first = first_action_id(vla.config.pad_token_id, vla.config.n_action_bins)
    action_logits = logits[..., first:first + vla.config.n_action_bins]  # [B, 7, 256]
    if loss_vocab == "full":
        loss = F.cross_entropy(logits.flatten(0, 1), tokens.flatten())
    else:
        loss = F.cross_entropy(action_logits.flatten(0, 1), (tokens - first).flatten())
    return loss, action_logits.argmax(-1) + first


def build_tiny_vla(image_size: int | None = None,
                   patch_size: int = TINY_PATCH_SIZE) -> tuple[OpenVLA, PreTrainedTokenizerFast]:
    """Random tiny OpenVLA on CPU in fp32, identical on every call (fixed base seed)."""
    image_size = image_size or TINY_IMAGE_SIZE
    tokenizer = build_tiny_tokenizer()
    config = tiny_vla_config(image_size, text_vocab_size=tokenizer.vocab_size, patch_size=patch_size)
    patch = config.timm_model_kwargs[0].get("patch_size", 14)
    if image_size % patch:
        raise ValueError(f"image_size must be a multiple of the patch size {patch}, got {image_size}")
    with torch.random.fork_rng():  # leave the caller's RNG streams untouched
        torch.manual_seed(TINY_BASE_SEED)
        vla = OpenVLA(config)
        smooth_action_rows(vla, ActionTokenizer(tokenizer.vocab_size))
        grid_position_embeddings(vla)
    return vla.eval(), tokenizer


@torch.no_grad()
def grid_position_embeddings(vla: OpenVLA) -> None:
    """Give each tower's patch position embeddings a 2D sine-cosine pattern (MAE's fixed
    embedding) instead of timm's random init (std 0.02), for the random tiny base only.

    The language model sees the patches in raster order with 1D rotary positions, from which a
    patch's row is easy to read (index // width) and its column is not (index % width): with
    near-zero random position embeddings the tiny VLA learned dy far faster than dx on the twin
    (held-out token accuracy 0.97 against 0.91 after 2,000 steps). Learned on from here.
    """
    for vit in (vla.vision_backbone.featurizer, vla.vision_backbone.fused_featurizer):
        side = round(vit.patch_embed.num_patches ** 0.5)
        dim = vit.pos_embed.shape[-1]
        rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        quarter = dim // 4
        omega = 1.0 / 100.0 ** (torch.arange(quarter) / max(1, quarter - 1))  # [D / 4]
        angles = [pos.flatten()[:, None].float() * omega[None] for pos in (cols, rows)]  # [P, D / 4]
        table = torch.cat([f(a) for a in angles for f in (torch.sin, torch.cos)], dim=1)  # [P, D]
        vit.pos_embed[0, -side * side:, :table.shape[1]] = table


@torch.no_grad()
def smooth_action_rows(vla: OpenVLA, action_tokenizer: ActionTokenizer, num_features: int = 4) -> None:
    """Make the action tokens' output and input rows smooth functions of their bin's value.

    A pretrained VLA has learned that neighbouring bins mean neighbouring actions; a random
    one has not, and RL must then raise each of the 256 bins' probabilities one by one (the
    toy PPO test stayed at chance for 30 iterations). With rows built from a few Fourier
    features of the bin value, one LoRA direction moves probability mass smoothly towards
    larger or smaller actions, as it does in a pretrained model.
    """
    ids = torch.arange(action_tokenizer.first_id, action_tokenizer.vocab_size)  # [256]
    values = torch.as_tensor(action_tokenizer.decode(ids.numpy()), dtype=torch.float32)  # [256]
    k = torch.arange(1, num_features + 1, dtype=torch.float32)
    features = torch.cat([values[:, None], torch.cos(torch.pi * k * values[:, None] / 2),
                          torch.sin(torch.pi * k * values[:, None] / 2)], dim=1)  # [256, F]
    for weight in (vla.language_model.lm_head.weight, vla.language_model.model.embed_tokens.weight):
        projection = torch.randn(features.shape[1], weight.shape[1]) * weight.std() / features.shape[1] ** 0.5
        weight[ids] = features @ projection + 0.1 * weight[ids]


def weights_fingerprint(state_dict: dict[str, torch.Tensor]) -> str:
    """A short hash of the base weights (names, shapes, a strided sample of values).

    Stored in checkpoints: LoRA adapters only make sense on the exact base they were trained on.
    Values are rounded to bf16 first, so the same base hashes the same in fp32 (CPU) and bf16.
    """
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        flat = state_dict[name].detach().flatten()
        sample = flat[:: max(1, flat.numel() // 4096)].bfloat16().float().cpu().numpy()
        digest.update(f"{name}{tuple(state_dict[name].shape)}".encode())
        digest.update(sample.tobytes())
    return digest.hexdigest()[:16]


def cast_parameters(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Move to device and cast parameters only: buffers such as rotary inv_freq stay fp32
    (in bf16 they would shift every rotary angle)."""
    module.to(device)
    for param in module.parameters():
        param.data = param.data.to(dtype)
    return module


# =============================================================================================
# 4. Loading the official checkpoint layout
# =============================================================================================
#
# What the official OpenVLA-7B directory holds (huggingface.co/openvla/openvla-7b): config.json
# (openvla's OpenVLAConfig: timm_model_ids, image_sizes, a 4-key text_config, pad_token_id,
# norm_stats of many datasets, ...), preprocessor_config.json (the image processor), three
# safetensors shards with model.safetensors.index.json, and the Llama-2 tokenizer (tokenizer.json
# and tokenizer.model). load_openvla_dir checks everything that can fail cheaply (config, dataset
# statistics, tokenizer, shard list, every weight's name and shape from the shard headers, memory)
# before it reads a byte of weights: on a 7B directory a wrong --unnorm-key fails in seconds.

OFFICIAL_ARCH = "fused-gelu-mlp"  # the official arch_specifier: "no-align+fused-gelu-mlp"
RESIZE_STRATEGIES = ("resize-naive", "resize-crop", "letterbox")  # Prismatic's
# torchvision's (and PIL's) interpolation codes, as the official tvf_resize_params store them.
INTERPOLATION_CODES = {"nearest": 0, "bilinear": 2, "bicubic": 3}


def read_config_json(model_dir: Path) -> dict[str, Any]:
    """config.json, checked for the fields the model is built from; no weights read."""
    if not (model_dir / "config.json").exists():
        raise CheckpointError(f"{model_dir}/config.json not found: expected an OpenVLA checkpoint "
                              "directory (config.json, safetensors shards, tokenizer files)")
    config_json = parse_file(model_dir / "config.json", lambda p: json.loads(p.read_text()))
    missing_fields = [k for k in ("timm_model_ids", "image_sizes", "text_config", "pad_token_id")
                      if k not in config_json]
    if missing_fields:
        raise CheckpointError(f"{model_dir}/config.json lacks {', '.join(missing_fields)}")
    return config_json


def read_norm_stats(model_dir: Path, config_json: dict, unnorm_key: str | None) -> NormStats:
    """Action statistics from config.json's `norm_stats` or dataset_statistics.json.

    Both map dataset name -> {"action": {"q01", "q99", "mask", "mean", ...}, "proprio": {...},
    "num_transitions", "num_trajectories"} (the official nesting); pick `unnorm_key` or the
    only key. No statistics at all: identity (-1 / 1).
    """
    stats = config_json.get("norm_stats")
    if not stats and (model_dir / "dataset_statistics.json").exists():
        stats = parse_file(model_dir / "dataset_statistics.json",
                           lambda p: json.loads(p.read_text()))
    if not stats:
        return NormStats.identity()
    if unnorm_key is None:
        if len(stats) != 1:
            raise CheckpointError(f"{model_dir} has action statistics for {len(stats)} datasets; "
                                  f"choose one with --unnorm-key (unnorm_key=) from {sorted(stats)}")
        unnorm_key = next(iter(stats))
    if unnorm_key not in stats:
        raise CheckpointError(f"unnorm_key {unnorm_key!r} not in {model_dir}'s statistics "
                              f"{sorted(stats)}")
    action = stats[unnorm_key].get("action") if isinstance(stats[unnorm_key], dict) else None
    if not isinstance(action, dict) or not {"q01", "q99"} <= set(action):
        raise CheckpointError(f"{model_dir}: the statistics of {unnorm_key!r} lack action q01/q99")
    return NormStats.from_dict(action)


def read_image_transform(model_dir: Path, config_json: dict, image_sizes: list[int]
                         ) -> ImageTransform:
    """preprocessor_config.json (the official image processor's fields: interpolations, means,
    stds, input_sizes, image_resize_strategy, tvf_resize_params) -> ImageTransform.
    Without the file: the preset's defaults (bilinear; see ImageTransform)."""
    path = model_dir / "preprocessor_config.json"
    strategy = config_json.get("image_resize_strategy", "resize-naive")
    if not path.exists():
        return ImageTransform(resize_strategy=strategy)
    pre = parse_file(path, lambda p: json.loads(p.read_text()))
    lacking = [k for k in ("interpolations", "means", "stds") if k not in pre]
    if lacking:
        raise CheckpointError(f"{path} lacks {', '.join(lacking)}")
    towers = len(image_sizes)
    if any(len(pre[k]) != towers for k in ("interpolations", "means", "stds")):
        raise CheckpointError(f"{path}: interpolations, means and stds need one entry per tower "
                              f"({towers})")
    sizes = [list(s) for s in pre.get("input_sizes") or []]
    if sizes and sizes != [[3, s, s] for s in image_sizes]:
        raise CheckpointError(f"{path}: input_sizes {sizes} do not match config.json's "
                              f"image_sizes {image_sizes}")
    unknown = [m for m in pre["interpolations"] if m not in INTERPOLATION_CODES]
    strategy = pre.get("image_resize_strategy", strategy)
    if unknown or strategy not in RESIZE_STRATEGIES:
        raise CheckpointError(f"{path}: unsupported interpolations {unknown} or image_resize_strategy "
                              f"{strategy!r} (supported: {sorted(INTERPOLATION_CODES)}; "
                              f"{', '.join(RESIZE_STRATEGIES)})")
    antialias = all(p.get("antialias", True) for p in pre.get("tvf_resize_params") or [])
    return ImageTransform(interpolations=pre["interpolations"], antialias=antialias,
                          means=pre["means"], stds=pre["stds"], resize_strategy=strategy)


def tokenizer_model_readable() -> bool:
    """Whether transformers can turn a SentencePiece tokenizer.model into a fast tokenizer."""
    return is_sentencepiece_available() and is_protobuf_available()


def load_tokenizer(model_dir: Path, text_vocab_size: int) -> PreTrainedTokenizerFast:
    """tokenizer.json as stored (the official directory ships it), else tokenizer.model converted
    by transformers (needs sentencepiece; seconds per load). Its text vocabulary must be
    config.json's pad_token_id (32000 for OpenVLA-7B)."""
    if (model_dir / "tokenizer.json").exists():
        # As stored, rather than through a Llama class that may rebuild it differently.
        tokenizer = parse_file(model_dir / "tokenizer.json", lambda p: PreTrainedTokenizerFast
                               .from_pretrained(model_dir, local_files_only=True))
    elif (model_dir / "tokenizer.model").exists():
        if not tokenizer_model_readable():
            raise CheckpointError(
                f"{model_dir} has tokenizer.model but no tokenizer.json, and reading "
                f"tokenizer.model needs sentencepiece: pip install sentencepiece protobuf, or make "
                f"tokenizer.json once where it is installed: python -c \"from transformers import "
                f"LlamaTokenizerFast as T; T.from_pretrained('{model_dir}')"
                f".save_pretrained('{model_dir}')\"")
        tokenizer = parse_file(model_dir / "tokenizer.model", lambda p: LlamaTokenizerFast
                               .from_pretrained(model_dir, local_files_only=True))
    else:
        raise CheckpointError(f"{model_dir} has no tokenizer: expected tokenizer.json (or "
                              "tokenizer.model), the tokenizer OpenVLA was trained with")
    if tokenizer.vocab_size != text_vocab_size:
        raise CheckpointError(f"{model_dir}: tokenizer has {tokenizer.vocab_size} text tokens but "
                              f"config.json's pad_token_id is {text_vocab_size}")
    return tokenizer


def weight_files(model_dir: Path) -> list[Path]:
    """The weight files: the shards in model.safetensors.index.json, or model.safetensors."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = parse_file(index, lambda p: json.loads(p.read_text())["weight_map"])
        names = sorted(set(weight_map.values()))
    elif (model_dir / "model.safetensors").exists():
        names = ["model.safetensors"]
    else:
        raise CheckpointError(f"{model_dir} has no weights: expected model.safetensors.index.json "
                              "with its shards, or model.safetensors")
    missing = [name for name in names if not (model_dir / name).exists()]
    if missing:
        raise CheckpointError(f"{model_dir} is missing weight shard(s): {', '.join(missing)}")
    return [model_dir / name for name in names]


def official_weight_name(name: str) -> str:
    """A stored weight name -> the model's. DINOv2's LayerScale is stored as `ls1.scale_factor`
    by the official conversion (see LayerScaleFactor) and as `ls1.gamma` by timm: both load."""
    if name.startswith("vision_backbone.") and name.endswith((".ls1.gamma", ".ls2.gamma")):
        return name[: -len("gamma")] + "scale_factor"
    return name


def read_weight_shapes(files: list[Path]) -> dict[str, tuple[Path, str, tuple[int, ...]]]:
    """model's weight name -> (file, stored name, shape), from the safetensors headers alone."""
    def header(path: Path) -> dict[str, tuple[int, ...]]:
        with safe_open(path, framework="pt") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}

    found: dict[str, tuple[Path, str, tuple[int, ...]]] = {}
    for path in files:
        for stored, shape in parse_file(path, header).items():
            name = official_weight_name(stored)
            if name in found:
                raise CheckpointError(f"{path.parent}: weight {name} is stored twice "
                                      f"({found[name][1]} in {found[name][0].name}, {stored} in "
                                      f"{path.name})")
            found[name] = (path, stored, shape)
    return found


def check_weight_shapes(model_dir: Path, vla: OpenVLA,
                        found: dict[str, tuple[Path, str, tuple[int, ...]]]) -> None:
    """Every weight of the (meta) model stored once with its shape, and nothing else."""
    expected = {name: tuple(t.shape) for name, t in vla.state_dict().items()}
    missing = [n for n in expected if n not in found]
    unexpected = [n for n in found if n not in expected]
    if missing or unexpected:
        raise CheckpointError(f"{model_dir}: weights do not match the model: "
                              f"missing {missing[:5]} ({len(missing)}), "
                              f"unexpected {unexpected[:5]} ({len(unexpected)})")
    wrong = [n for n in expected if found[n][2] != expected[n]]
    if wrong:
        name = wrong[0]
        raise CheckpointError(f"{model_dir}: weights do not fit config.json: {name} is "
                              f"{list(found[name][2])} in {found[name][0].name}, the model's is "
                              f"{list(expected[name])} ({len(wrong)} such)")


def available_memory(device: torch.device) -> int | None:
    """Bytes free for the weights: MemAvailable on the CPU, free memory on a GPU (None: unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_memory(model_dir: Path, num_weights: int, dtype: torch.dtype,
                 device: torch.device) -> None:
    """Refuse, in one line, a load whose weights alone would not fit (OpenVLA-7B: 7.54B weights,
    ~30 GB in fp32 and ~15 GB in bf16), before reading any of them."""
    need = num_weights * torch.empty(0, dtype=dtype).element_size()
    free = available_memory(device)
    if free is None or need <= free:
        return
    where = "GPU" if device.type == "cuda" else "CPU (MemAvailable)"
    hint = ("a GPU with more free memory" if device.type == "cuda" else
            "--dtype bfloat16 (half the memory; slow on a CPU, for inspection runs) or a GPU"
            if dtype != torch.bfloat16 else "a GPU, or free some memory")
    raise CheckpointError(f"{model_dir}: its {num_weights / 1e9:.2f}B weights need "
                          f"{need / 2**30:.1f} GiB in {str(dtype).removeprefix('torch.')} but the "
                          f"{where} has {free / 2**30:.1f} GiB free; use {hint}")


def load_openvla_dir(model_dir: str | Path, device: torch.device, unnorm_key: str | None = None,
                     dtype: torch.dtype | None = None, read_stats: bool = True
                     ) -> tuple[OpenVLA, PreTrainedTokenizerFast, NormStats | None, str]:
    """Load an OpenVLA checkpoint directory (config.json, preprocessor_config.json, safetensors,
    tokenizer, statistics) as the official one is laid out.

    Everything that can fail cheaply is checked before any weight is read. Weights load by their
    official names, strictly. read_stats False (the caller has statistics, e.g. a checkpoint's):
    no `unnorm_key` needed, a given one is still checked. Returns (vla, tokenizer, norm stats or
    None, fingerprint of the weights).
    """
    model_dir = Path(model_dir)
    device = torch.device(device)
    dtype = dtype or model_dtype(device)
    config_json = read_config_json(model_dir)
    # The Llama config is resolved here, once (VLAConfig.__post_init__): the official 4-key
    # text_config + LlamaConfig's defaults; every size is read from the resolved config after.
    try:
        config = VLAConfig.from_dict({k: v for k, v in config_json.items() if k != "image_transform"})
    except CheckpointError as err:
        raise CheckpointError(f"{model_dir}/config.json: {err}") from None
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{model_dir}/config.json is not an OpenVLA config: {err}") from None
    arch = config_json.get("arch_specifier", OFFICIAL_ARCH)
    if (not config.use_fused_vision_backbone or len(config.timm_model_ids) != 2
            or not arch.endswith(OFFICIAL_ARCH)):
        raise CheckpointError(f"{model_dir} is not a fused DINOv2 + SigLIP OpenVLA checkpoint "
                              f"with a fused GELU MLP projector (arch_specifier {arch!r})")
    config.image_transform = read_image_transform(model_dir, config_json, config.image_sizes)
    norm_stats = (read_norm_stats(model_dir, config_json, unnorm_key)
                  if read_stats or unnorm_key is not None else None)
    tokenizer = load_tokenizer(model_dir, config.pad_token_id)
    files = weight_files(model_dir)
    found = read_weight_shapes(files)

    with init_empty_weights():  # parameters on "meta": no time or memory spent on random init
        vla = OpenVLA(config)
    check_weight_shapes(model_dir, vla, found)
    check_memory(model_dir, sum(math.prod(shape) for _, _, shape in found.values()), dtype, device)

    def read_shard(path: Path) -> dict[str, torch.Tensor]:
        with safe_open(path, framework="pt", device=str(device)) as f:
            # Cast tensor by tensor: never a second copy of a whole shard.
            return {official_weight_name(n): f.get_tensor(n).to(dtype) for n in f.keys()}

    state: dict[str, torch.Tensor] = {}
    for path in files:
        state.update(parse_file(path, read_shard))
    try:
        vla.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:  # checked above from the headers; a shard changed meanwhile
        raise CheckpointError(f"{model_dir}: weights do not fit config.json: "
                              f"{str(err).splitlines()[-1].strip()}") from None
    vla.to(device)  # the buffers (rotary inv_freq) were built on CPU
    return vla.eval(), tokenizer, norm_stats, weights_fingerprint(state)


def preprocessor_config(config: VLAConfig) -> dict[str, Any]:
    """config.image_transform as the official preprocessor_config.json lays it out (openvla's
    PrismaticImageProcessor fields, without auto_map: no remote code is shipped here)."""
    t = config.image_transform
    return {
        "image_processor_type": "PrismaticImageProcessor",
        "image_resize_strategy": t.resize_strategy,
        "input_sizes": [[3, s, s] for s in config.image_sizes],
        "interpolations": t.interpolations,
        "means": t.means,
        "processor_class": "PrismaticProcessor",
        "stds": t.stds,
        "tvf_crop_params": [{"output_size": [s, s]} for s in config.image_sizes],
        "tvf_do_letterbox": t.resize_strategy == "letterbox",
        "tvf_letterbox_fill": None,
        "tvf_normalize_params": [{"inplace": False, "mean": m, "std": s}
                                 for m, s in zip(t.means, t.stds, strict=True)],
        "tvf_resize_params": [{"antialias": t.antialias, "interpolation": INTERPOLATION_CODES[m],
                               "max_size": None, "size": [s, s]}
                              for m, s in zip(t.interpolations, config.image_sizes, strict=True)],
        "use_fused_vision_backbone": config.use_fused_vision_backbone,
    }


def save_openvla_dir(model_dir: str | Path, vla: OpenVLA, tokenizer: PreTrainedTokenizerFast,
                     norm_stats: dict[str, NormStats] | None = None,
                     max_shard_bytes: int = 5 * 2**30) -> None:
    """Write `vla` in the official layout: config.json, preprocessor_config.json, safetensors
    shards + index, tokenizer. config.json keeps the full resolved text_config (the official one
    leaves LlamaConfig's defaults out; both load alike).

    Used to test the loader without the real 7B weights, and to export merged weights.
    """
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    config = vla.config.to_dict()
    del config["image_transform"]  # preprocessor_config.json's, as in the official layout
    if not any(config["timm_model_kwargs"]):
        del config["timm_model_kwargs"]  # the real sizes: keep the official fields only
    config.update(
        architectures=["OpenVLAForActionPrediction"], model_type="openvla",
        image_resize_strategy=vla.config.image_transform.resize_strategy,
        text_config=dict(vla.config.text_config, model_type="llama"),
        norm_stats={key: {"action": s.to_dict()} for key, s in (norm_stats or {}).items()},
    )
    (model_dir / "config.json").write_text(json.dumps(config, indent=2))
    (model_dir / "preprocessor_config.json").write_text(
        json.dumps(preprocessor_config(vla.config), indent=2))

    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    for name, tensor in vla.state_dict().items():
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_bytes + size > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = tensor.detach().contiguous().cpu()
        shard_bytes += size
    weight_map = {}
    for i, shard in enumerate(shards):
        filename = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, model_dir / filename, metadata={"format": "pt"})
        weight_map.update({name: filename for name in shard})
    total = sum(t.numel() * t.element_size() for shard in shards for t in shard.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    tokenizer.save_pretrained(model_dir)


def model_image_size(model_path: str | Path | None) -> int:
    """The input size of a base model, from config.json alone (no weights read): what the
    renderer must produce before the model is loaded (e.g. to collect demonstrations)."""
    if model_path is None:
        return TINY_IMAGE_SIZE
    config = Path(model_path) / "config.json"
    if not config.exists():
        raise CheckpointError(f"{config} not found: expected an OpenVLA checkpoint directory")
    sizes = parse_file(config, lambda p: json.loads(p.read_text())).get("image_sizes")
    return int(sizes[0]) if sizes else OPENVLA_IMAGE_SIZE


def enable_gradient_checkpointing(vla: OpenVLA) -> None:
    """Recompute every Llama decoder layer and ViT block in the backward instead of keeping its
    activations: each keeps only its input until then (one recomputed layer at a time). Same
    gradients, ~1 extra forward of those layers. Llama layers checkpoint only in train() mode.

    Non-reentrant checkpointing: with the reentrant kind, a block whose input needs no gradient
    (the first ViT block: patch embedding and positions are frozen) would give its LoRA adapters
    no gradient at all.
    """
    if timm.layers.use_reentrant_ckpt():
        raise ValueError("--gradient-checkpointing with TIMM_REENTRANT_CKPT set: the first ViT block's "
                         "adapters would get no gradient; unset it")
    vla.language_model.activation_checkpointing_enable({"use_reentrant": False})
    # transformers also hooks the input embeddings to require grad, a fix for the reentrant kind:
    # not needed here, and it would only add a gradient for every embedding.
    vla.language_model.disable_input_require_grads()
    for vit in (vla.vision_backbone.featurizer, vla.vision_backbone.fused_featurizer):
        vit.set_grad_checkpointing(True)
