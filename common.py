"""The RL agent on an OpenVLA, the episode loop, checkpoints and the helpers every script shares.

Every algorithm script (SFT, PPO, GRPO, DPO, evaluation) imports this file; the model itself is
in model.py, the tasks in envs.py. Read top to bottom:

  1. actor-critic   the VLA with LoRA is the policy, a value head reads h0: act() samples,
                    score_actions() re-scores given actions (one teacher-forced forward)
  2. agent set-up   build_agent() (fresh), load_checkpoint(); the flags a checkpoint fixes,
                    checked: check_init_checkpoint(), resume_flags() (each script's
                    init_agent() says how a run starts)
  3. episode loop   EpisodeLoop: any policy (agent, expert, random) in a vector env, carrying
                    the last observation across calls; evaluate_policy() on fixed episode ids
  4. checkpoints    atomic save, strict load, stale temp dirs cleaned
  5. helpers        devices, seeds, RNG state, finite checks, torch.distributed

Facts and numbers: arXiv 2505.19789, summarised in docs/PAPER_NOTES.md.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import resource
import shutil
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from tqdm import tqdm
from transformers import PreTrainedTokenizerFast, StaticCache

from cli import nvidia_gpu_present
from model import (
    ACTION_DIM,
    NUM_ACTION_BINS,
    ActionTokenizer,
    CheckpointError,
    NormStats,
    OpenVLA,
    PromptInputs,
    VLAConfig,
    build_tiny_vla,
    cast_parameters,
    load_openvla_dir,
    model_dtype,
    model_image_size,
    parse_file,
    position_ids_from_mask,
    predicting_hidden_states,
    prepare_inputs,
    run_language_model,
    weights_fingerprint,
)
from tasks import MAX_EPISODE_ID, RenderingUnavailable

T = TypeVar("T")  # a script's Args, passed through run_script untouched

CRITIC_MODES = ("h0", "last", "concat", "separate")
DEFAULT_LORA_RANK, DEFAULT_LORA_ALPHA = 32, 16  # arXiv 2505.19789: LoRA rank 32, alpha 16

# =============================================================================================
# 1. Actor-critic
# =============================================================================================


@dataclass
class ActOutput:
    """What a policy returns for a batch of observations. Only `actions` is required: the
    expert and a random policy fill nothing else."""

    actions: np.ndarray  # float32 [B, 7] env space, gripper binarised
    tokens: torch.Tensor | None = None  # long [B, 7] vocab ids
    logprob: torch.Tensor | None = None  # float [B], summed over the 7 tokens
    value: torch.Tensor | None = None  # float [B]


def lora_target_names(vla: OpenVLA) -> list[str]:
    """Every nn.Linear that runs: vision, projector, LLM and lm_head (peft's "all-linear" would
    skip lm_head). Each tower's last block and SigLIP's pooling head never run (features come
    from the second-to-last block), so adapters there would never get a gradient."""
    never_run = []
    for tower in ("featurizer", "fused_featurizer"):
        depth = len(getattr(vla.vision_backbone, tower).blocks)
        never_run += [f"vision_backbone.{tower}.blocks.{depth - 1}.",
                      f"vision_backbone.{tower}.attn_pool."]
    return [name for name, module in vla.named_modules()
            if isinstance(module, nn.Linear) and not name.startswith(tuple(never_run))]


def make_value_head(in_dim: int) -> nn.Sequential:
    """MLP in_dim -> 512 -> 128 -> 1 with GELUs; the small bias-free last layer starts values
    near 0 (arXiv 2505.19789's value head)."""
    head = nn.Sequential(nn.Linear(in_dim, 512), nn.GELU(), nn.Linear(512, 128), nn.GELU(),
                         nn.Linear(128, 1, bias=False))
    nn.init.normal_(head[-1].weight, std=0.01)
    return head


class ActorCritic(nn.Module):
    """The VLA with LoRA as the policy, plus (for PPO) a value head reading its hidden states.

    critic= "h0": value from the last-layer hidden state at the position that predicts the
    first action token (the last prompt token), the paper's choice; "last": at the position
    predicting the 7th token; "concat": the 7 predicting positions concatenated; "separate": a
    second copy of the backbone with its own LoRA, value head on its h0 (~2x memory);
    None: no critic at all (SFT, GRPO, DPO).
    """

    def __init__(self, vla: OpenVLA, tokenizer: PreTrainedTokenizerFast, norm_stats: NormStats, *,
                 model_path: str | None, base_fingerprint: str, critic: str | None = "h0",
                 lora_rank: int = DEFAULT_LORA_RANK, lora_alpha: int = DEFAULT_LORA_ALPHA) -> None:
        super().__init__()
        if critic is not None and critic not in CRITIC_MODES:
            raise ValueError(f"critic must be one of {CRITIC_MODES}, got {critic!r}")
        self.model_path, self.base_fingerprint = model_path, base_fingerprint
        self.critic_mode = critic
        self.vla_config = vla.config
        self.tokenizer = tokenizer
        self.action_tokenizer = ActionTokenizer(tokenizer.vocab_size, vla.config.n_action_bins)
        self.norm_stats = norm_stats
        self.lora_config = LoraConfig(r=lora_rank, lora_alpha=lora_alpha, lora_dropout=0.0,
                                      target_modules=lora_target_names(vla), bias="none")
        critic_copy = copy.deepcopy(vla) if critic == "separate" else None  # before LoRA wraps vla
        # get_peft_model freezes the base and adds B = 0 adapters: the agent starts as the base.
        self.policy: PeftModel = get_peft_model(vla, self.lora_config)
        self.critic_model = (get_peft_model(critic_copy, copy.deepcopy(self.lora_config))
                             if critic_copy is not None else None)
        self.value_head = None
        if critic is not None:
            hidden = vla.config.hidden_size
            self.value_head = make_value_head(hidden * ACTION_DIM if critic == "concat" else hidden)
            self.value_head.to(self.device)  # fp32 even when the model is bf16
        # A frozen copy of the adapter weights, set by freeze_reference(): GRPO's KL anchor.
        self.reference_lora: dict[str, torch.Tensor] | None = None
        self.eval()  # no dropout anywhere: train/eval modes compute the same

    # --- handy views ---------------------------------------------------------------------------

    @property
    def vla(self) -> OpenVLA:
        """The policy's OpenVLA with adapters injected (calls through it use LoRA)."""
        return self.policy.get_base_model()

    @property
    def device(self) -> torch.device:
        return self.vla.projector.fc3.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.vla.projector.fc3.weight.dtype

    @property
    def image_size(self) -> int:
        return self.vla_config.image_size

    def lora_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters() if "lora_" in name and p.requires_grad]

    def value_head_parameters(self) -> list[nn.Parameter]:
        return [] if self.value_head is None else list(self.value_head.parameters())

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # --- action distribution -------------------------------------------------------------------

    def action_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., D] -> fp32 logits [..., 256] of the action ids only."""
        first = self.action_tokenizer.first_id
        return self.vla.language_model.lm_head(hidden)[..., first:first + NUM_ACTION_BINS].float()

    @staticmethod
    def action_distribution(logits: torch.Tensor,
                            temperature: float) -> torch.distributions.Categorical:
        """256-way distribution of logits / temperature; temperature 0 (greedy) is scored at 1.

        In float64: the fp32 log-softmax rounding alone (~4e-6 over 7 tokens) would be most of
        the 1e-5 budget between act() and score_actions(); these tensors are tiny.
        """
        if not temperature >= 0:  # also catches nan
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        temperature = temperature if temperature > 0 else 1.0
        return torch.distributions.Categorical(logits=logits.double() / temperature,
                                               validate_args=False)  # ids checked elsewhere

    def check_action_tokens(self, tokens: np.ndarray | torch.Tensor) -> torch.Tensor:
        tokens = torch.as_tensor(tokens, dtype=torch.long, device=self.device)
        first = self.action_tokenizer.first_id
        last = first + NUM_ACTION_BINS - 1
        if tokens.shape[-1] != ACTION_DIM or ((tokens < first) | (tokens > last)).any():
            raise ValueError(f"tokens must be [B, 7] action ids in {first}..{last}")
        return tokens

    def prepare_inputs(self, images: np.ndarray | torch.Tensor,
                       instructions: Sequence[str]) -> PromptInputs:
        return prepare_inputs(self.vla, self.tokenizer, images, instructions)

    # --- sampling ------------------------------------------------------------------------------

    def sample_action_tokens(self, embeds: torch.Tensor, attention_mask: torch.Tensor,
                             temperature: float, where: str = "sampling"
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decode 7 action tokens with a KV cache.

        embeds [B, L, D] (prompt) -> token ids [B, 7], summed log-prob [B], and the hidden states
        at the 7 positions that predicted them [B, 7, D] (index 0 is h0). One prefill, then 6
        one-token steps: the 7th token's own hidden state is never needed. Non-finite logits (a
        diverged policy) raise NonFiniteError naming `where`, not a sampling error.

        The loop never waits for the device: the cache is preallocated (a DynamicCache would
        torch.cat, i.e. copy, every layer's keys and values at every step) and finiteness is
        checked once, after the loop.
        """
        vla = self.vla
        batch_size, length = attention_mask.shape
        # Slots for the prompt and the 6 tokens fed back; each step writes its one slot in place.
        cache = StaticCache(config=vla.language_model.config, max_cache_len=length + ACTION_DIM - 1)
        # One mask over all slots [B, L + 6], made once: the causal mask hides unwritten slots.
        fed_back = attention_mask.new_ones(batch_size, ACTION_DIM - 1)
        attention_mask = torch.cat([attention_mask, fed_back], 1)
        positions = position_ids_from_mask(attention_mask[:, :length])  # [B, L]
        hidden = run_language_model(vla, embeds, attention_mask, positions, cache)[:, -1]  # h0
        embed_tokens = vla.language_model.get_input_embeddings()
        tokens, logprob, predicting_hidden = [], 0.0, []
        largest = hidden.new_zeros((), dtype=torch.float32)  # max |logit| so far: nan stays nan
        for step in range(ACTION_DIM):
            predicting_hidden.append(hidden)
            logits = self.action_logits(hidden)  # [B, 256]
            largest = torch.maximum(largest, logits.abs().amax())  # on the device: no sync
            # Sample from finite stand-ins, so a diverged policy reaches the check after the loop
            # rather than a sampling error; finite logits pass unchanged (same tokens, same RNG).
            logits = torch.nan_to_num(logits, nan=0.0, posinf=0.0, neginf=0.0)
            action_dist = self.action_distribution(logits, temperature)
            greedy = temperature == 0
            index = action_dist.logits.argmax(-1) if greedy else action_dist.sample()  # [B] in 0..255
            logprob = logprob + action_dist.log_prob(index)
            token = index + self.action_tokenizer.first_id
            tokens.append(token)
            if step == ACTION_DIM - 1:
                break
            positions = positions[:, -1:] + 1  # [B, 1]
            hidden = run_language_model(vla, embed_tokens(token)[:, None], attention_mask,
                                        positions, cache)[:, -1]
        check_finite(where, action_logits=largest)  # the loop's one host sync
        return torch.stack(tokens, 1), logprob, torch.stack(predicting_hidden, 1)

    @torch.no_grad()  # not inference_mode: rollout tensors later meet autograd in the update
    def act(self, images: np.ndarray | torch.Tensor, instructions: Sequence[str],
            temperature: float = 1.0, where: str = "sampling") -> ActOutput:
        """Sample one action per observation (temperature 0: greedy). images: uint8 [B, H, W, 3].
        `where` (e.g. "iteration 3") names the caller in a NonFiniteError."""
        inputs = self.prepare_inputs(images, instructions)
        embeds = self.vla.embed_inputs(inputs.pixel_values, inputs.input_ids)
        tokens, logprob, predicting_hidden = self.sample_action_tokens(
            embeds, inputs.attention_mask, temperature, where)
        value = self.value_from_hidden(inputs, predicting_hidden)  # no extra pass except "separate"
        tokens = tokens.cpu()
        actions = self.norm_stats.unnormalize(self.action_tokenizer.decode(tokens.numpy()))
        return ActOutput(actions, tokens, logprob.float().cpu(),
                         None if value is None else value.cpu())

    def as_policy(self, temperature: float, where: str = "sampling") -> Callable[[dict], ActOutput]:
        """This agent as a policy for EpisodeLoop: observation dict -> ActOutput."""
        return lambda obs: self.act(obs["image"], obs["instruction"], temperature, where)

    # --- teacher-forced scoring ----------------------------------------------------------------

    def score_actions(self, images: np.ndarray | torch.Tensor, instructions: Sequence[str],
                      tokens: np.ndarray | torch.Tensor, temperature: float = 1.0
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Re-score given action tokens [B, 7] in one forward: summed log-prob [B], summed
        entropy of the 256-way distributions [B], value [B] (None without a critic).
        Differentiable. (PPO and GRPO write these lines out in their updates.)"""
        logits, index, value = self.teacher_forced(images, instructions, tokens)
        action_dist = self.action_distribution(logits, temperature)
        logprob, entropy = action_dist.log_prob(index).sum(-1), action_dist.entropy().sum(-1)
        return logprob.float(), entropy.float(), value

    def teacher_forced(self, images: np.ndarray | torch.Tensor, instructions: Sequence[str],
                       tokens: np.ndarray | torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The forward every update trains through, for given action tokens [B, 7]: the logits
        of the 7 action-token distributions [B, 7, 256], the tokens as indices into them
        [B, 7] (0..255), and the critic's value [B] (None without one; --critic h0: the hidden
        state that predicts the first action token)."""
        tokens = self.check_action_tokens(tokens)
        inputs = self.prepare_inputs(images, instructions)
        hidden = predicting_hidden_states(self.vla, inputs, tokens)  # [B, 7, D]
        index = tokens - self.action_tokenizer.first_id  # [B, 7] in 0..255
        return self.action_logits(hidden), index, self.value_from_hidden(inputs, hidden)

    # --- forgetting: how far the policy has moved from its base --------------------------------

    @torch.no_grad()
    def kl_from_base(self, images: np.ndarray | torch.Tensor, instructions: Sequence[str]) -> torch.Tensor:
        """KL(pi_base || pi) of the 7-token action distribution at temperature 1, per observation [B]
        (nats): a token sequence drawn from the base (adapters off), then on its prefixes the sum of
        the 7 per-token KLs, an unbiased estimate of the joint KL. The forgetting measure of "RL's
        Razor" (Shenfeld et al. 2025, arXiv 2509.04259). Draws from torch's generator: callers that
        must not shift their own sampling fork it (torch.random.fork_rng)."""
        with self.policy.disable_adapter():
            inputs = self.prepare_inputs(images, instructions)
            embeds = self.vla.embed_inputs(inputs.pixel_values, inputs.input_ids)
            tokens, _, hidden = self.sample_action_tokens(embeds, inputs.attention_mask, 1.0, "kl_from_base")
            base_logits = self.action_logits(hidden)  # [B, 7, 256]: the draw's own distributions
        logits, _, _ = self.teacher_forced(images, instructions, tokens)
        base, tuned = torch.log_softmax(base_logits.double(), -1), torch.log_softmax(logits.double(), -1)
        return (base.exp() * (base - tuned)).sum((-1, -2)).float()

    # --- a frozen reference policy (GRPO's KL anchor) --------------------------------------------

    def freeze_reference(self, weights: dict[str, torch.Tensor] | None = None) -> None:
        """Keep a frozen copy of the adapter weights (or `weights`, when resuming): the policy
        the run started from. No second backbone: only the LoRA tensors are copied."""
        current = {name: p.detach().clone() for name, p in self.named_parameters() if "lora_" in name}
        self.reference_lora = current if weights is None else {
            name: weights[name].to(current[name].device, current[name].dtype) for name in current}

    @torch.no_grad()
    def reference_logprob(self, images: np.ndarray | torch.Tensor, instructions: Sequence[str],
                          tokens: np.ndarray | torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """Summed log-prob [B] under the frozen reference adapters: the same forward as
        score_actions with the reference LoRA tensors swapped in (torch.func.functional_call
        swaps them for this call only, so the live adapters and their graph are untouched)."""
        if self.reference_lora is None:
            raise RuntimeError("call freeze_reference() first")
        logprob, _, _ = torch.func.functional_call(
            self, self.reference_lora, (images, instructions, tokens, temperature), strict=False)
        return logprob

    def forward(self, images: np.ndarray | torch.Tensor, instructions: Sequence[str],
                tokens: np.ndarray | torch.Tensor, temperature: float = 1.0
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """score_actions, as the module's forward (what torch.func.functional_call calls)."""
        return self.score_actions(images, instructions, tokens, temperature)

    # --- critic --------------------------------------------------------------------------------

    def value_from_hidden(self, inputs: PromptInputs,
                          predicting_hidden: torch.Tensor) -> torch.Tensor | None:
        """predicting_hidden [B, 7, D] of the policy -> value [B] (fp32), None without critic."""
        if self.value_head is None:
            return None
        if self.critic_mode == "separate":
            critic_vla = self.critic_model.get_base_model()
            embeds = critic_vla.embed_inputs(inputs.pixel_values, inputs.input_ids)
            features = run_language_model(critic_vla, embeds, inputs.attention_mask,
                                          position_ids_from_mask(inputs.attention_mask))[:, -1]
        elif self.critic_mode == "h0":
            features = predicting_hidden[:, 0]
        elif self.critic_mode == "last":
            features = predicting_hidden[:, -1]
        else:  # concat
            features = predicting_hidden.flatten(1)
        return self.value_head(features.float()).squeeze(-1)


# =============================================================================================
# 2. Agent set-up: the one way from flags to an agent
# =============================================================================================


def build_agent(model_path: str | None = None, critic: str | None = "h0",
                lora_rank: int | None = None, lora_alpha: int | None = None,
                image_size: int | None = None, device: str | torch.device = "cpu", seed: int = 0,
                norm_stats: NormStats | None = None, unnorm_key: str | None = None,
                dtype: torch.dtype | None = None) -> ActorCritic:
    """A fresh actor-critic on a base VLA: the model directory at model_path (the official
    OpenVLA layout: OpenVLA-7B, or the shipped pretrained tiny VLA), or with model_path None a
    random tiny base built in code. LoRA rank and alpha default to the paper's 32 and 16. `seed`
    draws the LoRA A matrices and the value head; norm_stats overrides the model's; dtype
    defaults to bf16 on CUDA, fp32 on CPU."""
    device = torch.device(device)
    dtype = dtype or model_dtype(device)
    if model_path is None:
        vla, tokenizer = build_tiny_vla(image_size or None)
        cast_parameters(vla, device, dtype)
        fingerprint = weights_fingerprint(vla.state_dict())
        base_stats = NormStats.identity()
    else:
        # Given statistics (a checkpoint's) need no --unnorm-key; a given one is still checked.
        vla, tokenizer, base_stats, fingerprint = load_openvla_dir(
            model_path, device, unnorm_key, dtype, read_stats=norm_stats is None)
        if image_size not in (None, vla.config.image_size):
            raise ValueError(f"{model_path} takes {vla.config.image_size}px images, "
                             f"not --image-size {image_size}")
        model_path = str(model_path)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return ActorCritic(vla, tokenizer, norm_stats or base_stats, model_path=model_path,
                           base_fingerprint=fingerprint, critic=critic,
                           lora_rank=lora_rank or DEFAULT_LORA_RANK, lora_alpha=lora_alpha or DEFAULT_LORA_ALPHA)


def read_checkpoint_config(path: Path, what: str = "checkpoint") -> dict[str, Any]:
    """A checkpoint's config.json, checked for completeness; nothing heavy is read. `what` names
    the path in the errors (e.g. "--init-checkpoint")."""
    clean_stale_temp_dirs(path)
    if path.is_file():  # a file named where a checkpoint directory belongs: say so, not "missing"
        raise CheckpointError(f"{what} {path} is a file, not a checkpoint directory")
    if not path.is_dir():
        raise CheckpointError(f"{what} {path} does not exist")
    missing = [name for name in CHECKPOINT_FILES if not (path / name).exists()]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")
    config = parse_file(path / "config.json", lambda p: json.loads(p.read_text()))
    lacking = [key for key in ("model_path", "model_config", "critic", "lora", "base_fingerprint",
                               "algorithm") if key not in config]
    if lacking:
        raise CheckpointError(f"checkpoint {path}/config.json lacks {', '.join(lacking)}")
    return config


def check_init_checkpoint(path: str | Path, lora_rank: int | None, lora_alpha: int | None,
                          image_size: int | None) -> dict[str, Any]:
    """--init-checkpoint's config, checked against the architecture flags given (None = not
    given): a trained adapter keeps its shape, so a contradicting flag is a one-line error.
    Reads JSON only, so a script can call it before slow set-up (SFT's demonstrations)."""
    config = read_checkpoint_config(Path(path), "--init-checkpoint")
    check_architecture(config, Path(path), "--init-checkpoint",
                       {"lora_rank": lora_rank, "lora_alpha": lora_alpha, "image_size": image_size})
    return config


def check_architecture(config: dict[str, Any], path: Path, what: str, given: dict[str, Any]) -> None:
    """Each given (not None) architecture flag in `given` (lora_rank, lora_alpha, image_size,
    critic) against the checkpoint's config; every one that differs named in one line."""
    saved = {"lora_rank": config["lora"]["rank"], "lora_alpha": config["lora"]["alpha"],
             "image_size": config["model_config"]["image_sizes"][0], "critic": config["critic"]}
    differ = [f"--{k.replace('_', '-')} {v} (checkpoint: {saved[k]})" for k, v in given.items()
              if v is not None and v != saved[k]]
    if differ:
        raise CheckpointError(f"{', '.join(differ)} differ from {what} {path}; drop the flag(s)")


# How each flag of a resumed run relates to the flags the run was saved with (trainer state's
# "args"). A resumed run is the same run continued: a flag is applied from the next step (and
# each change printed) only where continuing under the new value is still that run; any other
# difference is an error, so that the flags saved next are always what ran.
RESUME_FINDS_THE_RUN = ("exp_name", "output_dir", "resume")  # where the run is, and the request:
# never compared (the run directory may have moved; --resume is what makes this a resume).
RESUME_NOT_GIVEN_IS_THE_RUNS = (  # None = "not given": the resumed run takes the run's value
    "model_path", "unnorm_key", "init_checkpoint", "lora_rank", "lora_alpha", "image_size",
    "critic", "max_episode_steps", "demo_dir", "pairs_from", "wandb_entity")
RESUME_CHECKED_ELSEWHERE = (  # a given value is checked where the truth is kept:
    "lora_rank", "lora_alpha", "image_size", "critic",  # the checkpoint's config (check_architecture)
    "num_demos", "demo_dir")  # sft_warmup.py: the demonstrations its trainer state names
RESUME_APPLIES = (
    "learning_rate", "value_learning_rate",  # a plain AdamW, no schedule: e.g. lower after a divergence
    "total_iterations", "total_steps", "rounds",  # longer or shorter: nothing anneals with the length
    "eval_every", "eval_episodes", "eval_temperature", "val_every", "save_every",  # what is measured, saved when
    "device", "dtype", "model_path",  # where it runs, in what precision; the base's new place (fingerprinted)
    "track", "wandb_project_name", "wandb_entity", "capture_video")  # where the curves and videos go
RESUME_APPLIES_MEMORY = {  # knobs that only split the same gradient differently (per script: PPO's
    # and GRPO's --grad-accum-steps sets the optimizer step's size, SFT's does not)
    "sft": ("grad_accum_steps", "gradient_checkpointing"),
    "dpo": ("chunk_size",),
}


def resume_flags(checkpoint: Path, algorithm: str, flags: dict[str, Any]) -> dict[str, Any]:
    """The flags a resumed run continues with -> `flags` with every flag not given (None) set to
    the run's own. The checkpoint must be this algorithm's, each architecture flag given
    (check_architecture) the run's; a changed flag is applied (RESUME_APPLIES, printed as
    "--flag old -> new") or, anything else that differs, a one-line CheckpointError naming
    every such flag. Reads JSON and the trainer state's flags only (memory-mapped)."""
    config = read_checkpoint_config(checkpoint)
    if config["algorithm"] != algorithm:
        raise CheckpointError(f"--resume: {checkpoint} is a {config['algorithm']} checkpoint, not "
                              f"{algorithm}; resume it with its own script or start a new --exp-name")
    check_architecture(config, checkpoint, "the run to resume",
                       {k: flags[k] for k in ("lora_rank", "lora_alpha", "image_size", "critic") if k in flags})
    run_flags = parse_file(checkpoint / "trainer_state.pt", lambda p: torch.load(
        p, map_location="cpu", weights_only=False, mmap=True)).get("args") or {}
    applies = RESUME_APPLIES + RESUME_APPLIES_MEMORY.get(algorithm, ())
    resumed, changes, refused = dict(flags), [], []
    for name, run_value in run_flags.items():
        if name in RESUME_FINDS_THE_RUN or name not in flags:  # a flag since removed
            continue
        given = flags[name]
        if given is None and name in RESUME_NOT_GIVEN_IS_THE_RUNS:
            resumed[name] = run_value
        elif given == run_value or name in RESUME_CHECKED_ELSEWHERE:
            continue
        elif name in applies:
            changes.append(f"--{name.replace('_', '-')} {run_value} -> {given}")
        else:
            refused.append(f"--{name.replace('_', '-')} {given} (the run's: {run_value})")
    if refused:
        raise CheckpointError(f"--resume: {', '.join(refused)} would make it another run than {checkpoint}; "
                              f"give the run's values, or start a new run with another --exp-name")
    if world_info()[0] == 0:
        for change in changes:  # the script applies the new learning rates to its optimizer
            print(f"--resume: {change}", file=sys.stderr)
    return resumed


def planned_image_size(image_size: int | None, model_path: str | None,
                       checkpoint: str | Path | None = None) -> int:
    """The image size a script's agent will take, from flags and JSON files only: --image-size,
    else the checkpoint's (--resume / --init-checkpoint), else the base model's."""
    if image_size is not None:
        return image_size
    if checkpoint is not None:
        return read_checkpoint_config(Path(checkpoint))["model_config"]["image_sizes"][0]
    return model_image_size(model_path)


# =============================================================================================
# 3. The episode loop
# =============================================================================================

Policy = Callable[[dict], ActOutput]  # observation dict -> actions (and tokens, log-probs, values)


def expert_policy(envs: Any) -> Policy:
    """The envs' scripted expert as a policy (it reads the true state, not the observation)."""
    return lambda obs: ActOutput(np.asarray(envs.expert_action(), dtype=np.float32))


def random_policy(rng: np.random.Generator) -> Policy:
    """Uniform actions in [-1, 1]^7: the chance level of a task."""
    return lambda obs: ActOutput(rng.uniform(-1, 1, (len(obs["instruction"]), ACTION_DIM))
                                 .astype(np.float32))


@dataclass
class Rollout:
    """num_steps x num_envs transitions, time-major, on the CPU. Fields a policy does not fill
    (tokens, logprobs, values) are None, and so are images with keep_images=False."""

    images: torch.Tensor | None  # uint8 [T, N, H, W, 3]: the observation each action saw
    instructions: list[list[str]]  # [T][N]
    actions: np.ndarray  # float32 [T, N, 7], env space
    tokens: torch.Tensor | None  # long [T, N, 7]
    logprobs: torch.Tensor | None  # [T, N]
    values: torch.Tensor | None  # [T, N]
    rewards: torch.Tensor  # [T, N]
    dones: torch.Tensor  # bool [T, N]: the episode ended after step t
    success: np.ndarray  # bool [T, N]: success at step t
    episode_ids: torch.Tensor  # long [T, N]
    last_obs: dict | None  # the observation after the last step; None if episodes just ended
    final_images: np.ndarray | None  # uint8 [N, H, W, 3]: the observation after the last step
    # One entry per episode that ended in this rollout:
    episode_returns: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # [E]
    episode_success: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # [E] final step
    episode_success_once: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # [E]

    def flat(self, name: str) -> Any:
        """A [T, N, ...] field as [T * N, ...] (b = t * N + n); instructions as a flat list."""
        if name == "instructions":
            return [text for step in self.instructions for text in step]
        return getattr(self, name).flatten(0, 1) if name in ("images", "tokens") else \
            getattr(self, name).flatten()


class EpisodeLoop:
    """Steps a vector env with a policy, carrying the last observation across calls (as
    CleanRL does): a rollout of num_steps < horizon continues its episodes in the next call,
    and the next call starts where this one stopped. After episodes end (all together: fixed
    horizon, no early termination) the next step resets with next_episode_ids() (None: the env
    draws ids from its own seeded generator)."""

    def __init__(self, envs: Any, next_episode_ids: Callable[[], np.ndarray | None] | None = None):
        self.envs = envs
        self.next_episode_ids = next_episode_ids or (lambda: None)
        self.obs: dict | None = None  # what the next step acts on; None: reset first
        self.running_return = np.zeros(envs.num_envs)

    def restart(self) -> None:
        """Abandon the episodes in progress (e.g. after another user of the envs reset them)."""
        self.obs = None

    def reset(self) -> None:
        ids = self.next_episode_ids()
        options = None if ids is None else {"episode_ids": np.asarray(ids, dtype=np.int64)}
        self.obs, _ = self.envs.reset(options=options)
        self.running_return[:] = 0.0

    def run(self, policy: Policy, num_steps: int, keep_images: bool = True,
            stop: Callable[[dict], bool] | None = None) -> Rollout:
        """num_steps steps of `policy`, or fewer if stop(info) says so after a step (the
        episodes in progress are then abandoned: the next call resets)."""
        steps: list[dict] = []
        returns, success, success_once = [], [], []
        final_images = None
        for _ in range(num_steps):
            if self.obs is None:
                self.reset()
            obs = self.obs
            out = policy(obs)
            next_obs, reward, terminated, truncated, info = self.envs.step(out.actions)
            done = np.asarray(terminated) | np.asarray(truncated)
            steps.append(dict(
                image=torch.from_numpy(np.array(obs["image"], dtype=np.uint8)) if keep_images else None,
                instruction=list(obs["instruction"]), action=np.asarray(out.actions, np.float32),
                tokens=out.tokens, logprob=out.logprob, value=out.value,
                reward=torch.as_tensor(reward, dtype=torch.float32),
                done=torch.as_tensor(done), success=np.asarray(info["success"], dtype=bool),
                episode_id=torch.as_tensor(info["episode_id"], dtype=torch.long)))
            self.running_return += reward
            final_images = np.asarray(next_obs["image"]) if keep_images else None
            self.obs = next_obs
            if done.any():
                if not done.all():
                    raise RuntimeError("EpisodeLoop expects every env's episode to end at the same "
                                       "step (fixed horizon, no early termination)")
                returns += self.running_return.tolist()
                success += np.asarray(info["success"], dtype=bool).tolist()
                success_once += np.asarray(info["success_once"], dtype=bool).tolist()
                self.obs = None
            if stop is not None and stop(info):
                self.obs = None
                break

        def stacked(key: str) -> torch.Tensor | None:
            return None if steps[0][key] is None else torch.stack([s[key] for s in steps])

        return Rollout(
            images=stacked("image"), instructions=[s["instruction"] for s in steps],
            actions=np.stack([s["action"] for s in steps]), tokens=stacked("tokens"),
            logprobs=stacked("logprob"), values=stacked("value"), rewards=stacked("reward"),
            dones=stacked("done"), success=np.stack([s["success"] for s in steps]),
            episode_ids=stacked("episode_id"), last_obs=self.obs, final_images=final_images,
            episode_returns=np.asarray(returns, dtype=np.float32),
            episode_success=np.asarray(success, dtype=bool),
            episode_success_once=np.asarray(success_once, dtype=bool),
        )


def evaluation_episode_ids(seed: int, split: str, count: int) -> np.ndarray:
    """The episode ids of (seed, split): a pure function, so every checkpoint meets the same
    initial states; crc32 rather than hash() because Python salts string hashes per process."""
    rng = np.random.default_rng([seed, zlib.crc32(split.encode())])
    return rng.integers(0, MAX_EPISODE_ID, size=count)


# Calibration ids lie above every id drawn for training or evaluation ([0, MAX_EPISODE_ID)):
# disjoint by construction (docs/STUDY_PROTOCOL.md, section 3).
CALIBRATION_ID_OFFSET = 2**31


def calibration_episode_ids(split: str, count: int) -> np.ndarray:
    """The episode ids the study's base and warm-up are calibrated on: no evaluation, demo or
    RL episode ever uses one, so tuning against them leaves the study's numbers untouched."""
    rng = np.random.default_rng([zlib.crc32(b"calibration"), zlib.crc32(split.encode())])
    return CALIBRATION_ID_OFFSET + rng.integers(0, MAX_EPISODE_ID, size=count)


@dataclass
class EpisodeOutcomes:
    """The episodes of one evaluation; arrays of length len(episode_ids)."""

    episode_ids: np.ndarray
    success: np.ndarray  # object on the receptacle at the final step: the paper's metric
    success_once: np.ndarray  # succeeded at some step (a policy may knock the object off again)
    returns: np.ndarray
    seconds: float
    videos: list[np.ndarray] = field(default_factory=list)  # uint8 [T + 1, H, W, 3] each
    kl_from_base: np.ndarray | None = None  # mean KL(pi_base || pi) over each episode's states (evaluate_ood --kl)

    @property
    def success_rate(self) -> float:
        return float(np.mean(self.success))


def evaluate_policy(policy: Policy, envs: Any, episode_ids: np.ndarray, num_videos: int = 0,
                    on_batch: Callable[[int], None] | None = None) -> EpisodeOutcomes:
    """Play exactly these episodes, num_envs at a time, each to the end of the horizon.

    The last batch is padded by repeating its final id and the padding's results are dropped.
    Returns every episode's outcome and the frames of the first num_videos episodes.
    """
    start_time, n = time.perf_counter(), envs.num_envs
    success, success_once, returns, videos = [], [], [], []
    for start in range(0, len(episode_ids), n):
        batch = np.asarray(episode_ids[start:start + n])
        padded = np.concatenate([batch, np.repeat(batch[-1:], n - len(batch))])
        keep = len(videos) < num_videos
        rollout = EpisodeLoop(envs, lambda padded=padded: padded).run(
            policy, envs.max_episode_steps, keep_images=keep)
        k = len(batch)
        success.append(rollout.episode_success[:k])
        success_once.append(rollout.episode_success_once[:k])
        returns.append(rollout.episode_returns[:k])
        for i in range(min(num_videos - len(videos), k) if keep else 0):
            videos.append(np.concatenate([rollout.images[:, i].numpy(), rollout.final_images[None, i]]))
        if on_batch is not None:
            on_batch(k)
    return EpisodeOutcomes(np.asarray(episode_ids), np.concatenate(success),
                           np.concatenate(success_once), np.concatenate(returns),
                           time.perf_counter() - start_time, videos)


def rank_share_of_step(minibatch_size: int, grad_accum_steps: int, world: int) -> int:
    """Samples of one optimizer step that each rank computes. --minibatch-size x
    --grad-accum-steps samples make ONE optimizer step over all ranks together (the paper's
    8 x 20 = 160 on one GPU), so a recipe takes the same steps on 1 rank as on 16."""
    per_step = minibatch_size * grad_accum_steps
    if per_step % world:
        raise ValueError(f"--minibatch-size x --grad-accum-steps ({minibatch_size} x {grad_accum_steps} = "
                         f"{per_step} samples per optimizer step, over all ranks) must be a multiple of "
                         f"the number of ranks ({world})")
    return per_step // world


def optimizer_step(optimizer: torch.optim.Optimizer, params: list[nn.Parameter],
                   max_grad_norm: float, where: str) -> float:
    """Average the accumulated gradients across ranks, clip them, stop if they are not finite,
    step and clear. Returns the gradient norm before clipping."""
    all_reduce_gradients(params)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    check_finite(where, grad_norm=grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm.item()


# =============================================================================================
# 4. Checkpoints
# =============================================================================================

CHECKPOINT_FILES = ("config.json", "norm_stats.json", "trainer_state.pt",
                    "adapter/adapter_config.json", "adapter/adapter_model.safetensors")


def writer_is_gone(leftover: Path) -> bool:
    """A temp dir is named .NAME.PID.XXXX.tmp: is the process that was writing it gone? (So a
    load never deletes what a live run is saving.)"""
    try:
        pid = int(leftover.name.split(".")[2])
        if pid == os.getpid():  # this process is not saving while it cleans up
            return True
        os.kill(pid, 0)
    except (ValueError, IndexError, ProcessLookupError):
        return True
    except PermissionError:  # alive, under another user
        return False
    return False


def clean_stale_temp_dirs(path: Path) -> None:
    """Tidy what an interrupted save left beside `path`: temp dirs of dead writers are deleted,
    and if a swap was cut between its two renames (no `path`, an intact `.NAME.*.old`), the old
    checkpoint is put back."""
    if not path.parent.is_dir():
        return
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        if writer_is_gone(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    for old in sorted(path.parent.glob(f".{path.name}.*.old")):
        if not writer_is_gone(old):
            continue
        if not path.exists() and all((old / name).exists() for name in CHECKPOINT_FILES):
            old.rename(path)
        else:
            shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(path: str | Path, agent: ActorCritic, state: dict[str, Any]) -> None:
    """Write the agent's trainable part and `state` (optimizer, iteration, RNG, args) to a dir.

    Everything goes to a temp dir beside `path`, renamed into place at the end, so a crash never
    leaves a half-written checkpoint at `path`. Non-finite weights are never written: the last
    good checkpoint stays (a diverged run raises NonFiniteError instead).
    """
    path = Path(path)
    for name, param in agent.named_parameters():
        if param.requires_grad and not torch.isfinite(param).all():
            raise NonFiniteError(f"not saving {path}: weight {name} is not finite; "
                                 f"the previous checkpoint is kept")
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temp_dirs(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent))
    try:
        # save_embedding_layers=False: LoRA on lm_head must not drag the base lm_head along.
        agent.policy.save_pretrained(tmp / "adapter", save_embedding_layers=False)
        if agent.critic_model is not None:
            agent.critic_model.save_pretrained(tmp / "critic_adapter", save_embedding_layers=False)
        if agent.value_head is not None:
            value_head = {k: v.detach().cpu() for k, v in agent.value_head.state_dict().items()}
            save_file(value_head, tmp / "value_head.safetensors")
        config = {
            "model_path": agent.model_path, "model_config": agent.vla_config.to_dict(),
            "critic": agent.critic_mode, "algorithm": state.get("algorithm"),
            "lora": {"rank": agent.lora_config.r, "alpha": agent.lora_config.lora_alpha,
                     "dropout": agent.lora_config.lora_dropout},
            "base_fingerprint": agent.base_fingerprint,
        }
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (tmp / "norm_stats.json").write_text(json.dumps(agent.norm_stats.to_dict()))
        torch.save(state, tmp / "trainer_state.pt")
        if path.exists():  # replace an older checkpoint: move it aside, then swap
            old = tmp.with_suffix(".old")
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu",
                    model_path: str | None = None, unnorm_key: str | None = None,
                    critic: str | None = "saved", dtype: torch.dtype | None = None,
                    seed: int = 0) -> tuple[ActorCritic, dict[str, Any]]:
    """Rebuild the agent saved by save_checkpoint -> (agent, trainer state).

    model_path: where the base weights are now, if they moved since training. critic: "saved"
    (the checkpoint's own), None (no critic), or a mode (its value head if the checkpoint has
    that mode, else a fresh one, drawn with `seed`).
    """
    path = Path(path)
    config = read_checkpoint_config(path)
    critic = config["critic"] if critic == "saved" else critic
    if critic is not None and config["critic"] != critic and world_info()[0] == 0:
        had = "no" if config["critic"] is None else f"a {config['critic']!r}"
        print(f"note: {path} has {had} value head; a new {critic!r} value head starts from "
              f"scratch", file=sys.stderr)
    stats = parse_file(path / "norm_stats.json",
                       lambda p: NormStats.from_dict(json.loads(p.read_text())))
    agent = build_agent(model_path or config["model_path"], critic=critic,
                        lora_rank=config["lora"]["rank"], lora_alpha=config["lora"]["alpha"],
                        image_size=config["model_config"]["image_sizes"][0], device=device,
                        norm_stats=stats, unnorm_key=unnorm_key, dtype=dtype, seed=seed)
    try:  # resolved as the base's config is (a checkpoint may predate a field's default)
        saved_config = VLAConfig.from_dict(config["model_config"]).to_dict()
    except (TypeError, ValueError, AttributeError):
        saved_config = config["model_config"]
    if agent.vla_config.to_dict() != saved_config:
        raise CheckpointError(f"checkpoint {path} was trained on another model configuration "
                              f"than its base builds now (was the tiny preset changed?)")
    if agent.base_fingerprint != config["base_fingerprint"]:
        raise CheckpointError(f"checkpoint {path} was trained on different base weights "
                              f"(fingerprint {config['base_fingerprint']}, "
                              f"base now {agent.base_fingerprint})")

    def read_safetensors(file: Path) -> dict[str, torch.Tensor]:
        return parse_file(file, lambda p: load_file(p, device=str(agent.device)))

    adapters = [(agent.policy, "adapter")]
    if agent.critic_model is not None and config["critic"] == "separate":
        adapters.append((agent.critic_model, "critic_adapter"))
    for model, folder in adapters:
        weights = read_safetensors(path / folder / "adapter_model.safetensors")
        lora_count = sum("lora_" in name for name, _ in model.named_parameters())
        try:
            result = set_peft_model_state_dict(model, weights)
        except RuntimeError:  # shape mismatch
            result = None
        if result is None or result.unexpected_keys or len(weights) != lora_count:
            raise CheckpointError(f"checkpoint {path}/{folder} does not fit the model "
                                  f"({len(weights)} tensors for {lora_count} LoRA weights)")
    if agent.value_head is not None and config["critic"] == agent.critic_mode:
        value_head = read_safetensors(path / "value_head.safetensors")  # corrupt: says so
        try:
            agent.value_head.load_state_dict(value_head)
        except RuntimeError:
            raise CheckpointError(f"checkpoint {path}/value_head.safetensors does not fit the "
                                  f"value head of critic {agent.critic_mode!r}") from None
    for name, param in agent.named_parameters():
        if not torch.isfinite(param).all():
            raise CheckpointError(f"checkpoint {path} holds non-finite weights ({name})")
    state = parse_file(path / "trainer_state.pt",
                       lambda p: torch.load(p, map_location="cpu", weights_only=False))
    return agent, state


# =============================================================================================
# 5. Helpers the scripts share
# =============================================================================================


class NonFiniteError(RuntimeError):
    """A loss, gradient or weight became inf or nan: training stops, the last checkpoint stays."""


def check_finite(where: str, **quantities: float | torch.Tensor) -> None:
    """Stop at the first non-finite loss or gradient norm, naming it, before it reaches the
    weights (an optimizer step on a nan gradient would poison every later checkpoint)."""
    for name, value in quantities.items():
        value = value.detach().item() if isinstance(value, torch.Tensor) else float(value)
        if not math.isfinite(value):
            raise NonFiniteError(f"{name} is {value} at {where}: training diverged; "
                                 f"the last checkpoint is kept (try a lower learning rate)")


def unusable_gpu_message(name: str) -> str:
    """Why torch sees no GPU on a machine that has one: almost always a torch wheel built for a
    newer CUDA than the driver supports (the pinned wheel is a recent CUDA build)."""
    return (f"--device {name}: this machine has an NVIDIA GPU but torch {torch.__version__} (built for "
            f"CUDA {torch.version.cuda}) cannot use it, most likely because the driver is older than that "
            f"CUDA needs: install the torch wheel for your driver's CUDA (README, 'GPUs'), or pass "
            f"--device cpu to run on the CPU on purpose")


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """"auto" -> this rank's GPU (cuda:LOCAL_RANK under torchrun) when torch can use one, else cpu;
    "cuda" -> this rank's GPU. A machine whose GPU torch cannot use is an error, not a silent
    CPU run (a 7B model in fp32 on the CPU would take days to say nothing)."""
    if name == "auto":
        if not torch.cuda.is_available() and nvidia_gpu_present():
            raise ValueError(unusable_gpu_message(name))
        name = "cuda" if torch.cuda.is_available() else "cpu"
    # Where a launcher shows each rank only its own GPU (SLURM's per-task CUDA_VISIBLE_DEVICES),
    # that GPU is device 0 of every rank.
    rank_gpu = 0 if torch.cuda.is_available() and torch.cuda.device_count() == 1 else local_rank
    try:
        device = torch.device(f"cuda:{rank_gpu}" if name == "cuda" else name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device torch knows; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: the scripts run on cpu or cuda, not {device.type}")
    if device.type == "cuda" and not torch.cuda.is_available():
        if nvidia_gpu_present():
            raise ValueError(unusable_gpu_message(name))
        raise ValueError(f"--device {name}: this machine has no CUDA GPU (torch sees none); "
                         f"use --device cpu or auto")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) here"
                         + (f" (this is local rank {local_rank})" if local_rank else ""))
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """--dtype: "auto" is bf16 on CUDA (as the paper trains) and fp32 on the CPU."""
    return {"auto": model_dtype(device), "float32": torch.float32,
            "bfloat16": torch.bfloat16}[name]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states, for trainer_state.pt (exact resume). On a GPU, the
    state of this rank's own device only: a resume on a host with another number of GPUs
    (each rank still on one) restores it as well."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()  # the current device: init_distributed() set it
    return state


def restore_rng_state(states: list[dict[str, Any]], rank: int = 0, world: int = 1) -> None:
    """Put back this rank's generators from the list save_run gathered (gather_objects)."""
    if len(states) != world:
        raise CheckpointError(f"the run to resume had {len(states)} rank(s); resume it with "
                              f"{len(states)}, not {world}")
    state = states[rank]
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, list):  # checkpoints written before: every device's state, one per GPU
            device = torch.cuda.current_device()
            cuda = cuda[device] if device < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)


def peak_memory_gb(device: torch.device) -> float:
    """Peak GPU memory allocated by torch, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def tensorboard_hint(run_dir: Path) -> str:
    """The command that opens a run's curves, with this interpreter (tensorboard may not be on PATH)."""
    return f"TensorBoard: {sys.executable} -m tensorboard.main --logdir {run_dir}"


# --- torch.distributed (torchrun) ------------------------------------------------------------


# How long ranks wait for rank 0 alone (collecting demonstrations: 16k SFT demos take hours),
# instead of the process group's timeout (30 minutes for "cpu:gloo,cuda:nccl", gloo and NCCL alike).
RANK_ZERO_WAIT = timedelta(hours=12)


def process_group_backend(device: torch.device) -> str:
    """torch.distributed's backend for a rank on `device`: per device type, so that the CPU
    tensors the scripts reduce (metrics, advantage moments, pair counts, RNG states) go through
    gloo and the GPU gradients through NCCL, which rejects CPU tensors."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "cpu:gloo"


def init_distributed(device_name: str = "auto") -> tuple[int, int, torch.device]:
    """(rank, world size, this rank's device) from --device. Under torchrun (RANK set) joins the
    process group with the backend that --device needs (so `--device cpu` on a GPU host runs
    gloo only); plain `python script.py` is rank 0 of 1."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = resolve_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # this rank's GPU: NCCL, RNG states and caches use it
    if "RANK" not in os.environ:
        return 0, 1, device
    dist.init_process_group(process_group_backend(device))
    return dist.get_rank(), dist.get_world_size(), device


def wait_for_rank_zero() -> None:
    """Every rank waits here until rank 0 arrives (e.g. from collecting demonstrations), for up
    to RANK_ZERO_WAIT. A barrier goes through the CPU backend (gloo), with its own timeout."""
    if world_info()[1] > 1:
        dist.barrier(timeout=RANK_ZERO_WAIT)


def world_info() -> tuple[int, int]:
    """(rank, world size): (0, 1) outside torchrun."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def rank_slice(values: np.ndarray) -> np.ndarray:
    """This rank's share of a globally drawn array (episode ids): contiguous, as even as can be."""
    rank, world = world_info()
    return np.array_split(np.asarray(values), world)[rank]


def all_reduce_gradients(params: list[nn.Parameter]) -> None:
    """Average gradients across ranks before the optimizer step, in one flat all-reduce.

    Done by hand rather than by wrapping the agent in DistributedDataParallel: the updates call
    agent.score_actions(), not the module's forward that DDP hooks, and only the few trainable
    tensors (LoRA and value head) need syncing. With equal per-rank batches the average over
    ranks is the gradient of the global batch, so N ranks take the step one process would."""
    rank, world = world_info()
    if world == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.flatten().float() for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for param, grad in zip(params, grads, strict=True):
        param.grad = flat[offset:offset + grad.numel()].view_as(grad).to(grad.dtype)
        offset += grad.numel()


def global_mean(values: np.ndarray | list[float]) -> float:
    """Mean over every rank's values (nan if none): the metrics logged are the global ones."""
    values = np.asarray(values, dtype=np.float64)
    _, world = world_info()
    if world == 1:
        return float(values.mean()) if values.size else float("nan")
    total = torch.tensor([values.sum(), values.size], dtype=torch.float64)
    dist.all_reduce(total)
    return float(total[0] / total[1]) if total[1] else float("nan")


def global_mean_std(x: torch.Tensor) -> tuple[float, float]:
    """Mean and (unbiased) std of a tensor spread over ranks, e.g. advantages for normalisation."""
    _, world = world_info()
    if world == 1:
        return x.mean().item(), x.std().item()
    x = x.double().flatten()
    moments = torch.tensor([x.sum(), (x * x).sum(), x.numel()], dtype=torch.float64)
    dist.all_reduce(moments)
    total, squares, count = moments.tolist()
    mean = total / count
    return mean, math.sqrt(max(squares - count * mean * mean, 0.0) / max(count - 1, 1))


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj` (picklable, e.g. an RNG's state), in rank order, on every rank: what
    rank 0 saves so that a resume is exact on every rank."""
    _, world = world_info()
    if world == 1:
        return [obj]
    objects: list[Any] = [None] * world
    dist.all_gather_object(objects, obj)
    return objects


def log_scalars(writer: Any, metrics: dict[str, float], step: int) -> None:
    """Every metric at this step, on rank 0 (the writer is None elsewhere)."""
    if writer is not None:
        for name, value in metrics.items():
            writer.add_scalar(name, value, step)


def make_writer(run_path: Path, flags: dict[str, Any], purge_step: int, track: bool = False,
                wandb_project: str = "cleanvla", wandb_entity: str | None = None) -> Any:
    """TensorBoard writer on rank 0 (None elsewhere). purge_step: the last step the checkpoint
    being resumed covers (0 for a new run). A resumed run purges what the killed run logged
    after it, so every curve has one point per step. (SummaryWriter purges steps >= its
    purge_step: the checkpoint's own step, already logged, is kept.) track: mirror the
    TensorBoard scalars to Weights & Biases (as CleanRL's --track), one W&B run per run
    directory: its id is kept in RUN/wandb_id, so a resumed run continues the same W&B run."""
    if world_info()[0] != 0:
        return None
    from torch.utils.tensorboard import SummaryWriter

    if track:
        try:
            import wandb  # only when asked: an optional dependency
        except ImportError:
            raise ValueError("--track logs to Weights & Biases: pip install wandb (or drop --track)") from None

        id_file = run_path / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.exists() else os.urandom(8).hex()
        run_path.mkdir(parents=True, exist_ok=True)
        id_file.write_text(run_id)
        wandb.init(project=wandb_project, entity=wandb_entity, name=run_path.name, id=run_id,
                   resume="allow", config=flags, dir=str(run_path), sync_tensorboard=True)
    writer = SummaryWriter(str(run_path), purge_step=purge_step + 1 if purge_step > 0 else None)
    if purge_step == 0:
        writer.add_text("args", "\n".join(f"{k}: {v}" for k, v in flags.items()))
    return writer


def close_writer(writer: Any) -> None:
    """Flush TensorBoard (rank 0; None elsewhere) and end the W&B run if one is open."""
    if writer is not None:
        writer.close()
    finish_wandb_run()


def finish_wandb_run(exit_code: int = 0) -> None:
    """End the W&B run of --track, if one is open (also when a run stops on an error)."""
    wandb = sys.modules.get("wandb")  # imported only by make_writer(track=True)
    if wandb is not None and wandb.run is not None:
        wandb.finish(exit_code=exit_code)


def evaluate_during_training(agent: ActorCritic, envs: Any, episode_ids: np.ndarray, temperature: float,
                             label: str, loop: EpisodeLoop | None = None, video_dir: Path | None = None
                             ) -> dict[str, float]:
    """Success and return on this rank's `episode_ids` (the same at every evaluation: a
    script's rank_slice of evaluation_episode_ids), sampled at `temperature`; rank 0 prints
    "LABEL: eval success x" (e.g. "iteration 3"). The evaluation resets the envs: `loop`
    restarts. video_dir (--capture-video): rank 0 saves its first VIDEOS_PER_EVALUATION
    episodes in video_dir/LABEL. Its samples come from a fork of torch's generators: how often a
    run is evaluated does not change what it trains on."""
    agent.eval()
    rank = world_info()[0]
    videos = VIDEOS_PER_EVALUATION if video_dir is not None and rank == 0 else 0
    with torch.random.fork_rng(devices=[agent.device] if agent.device.type == "cuda" else []):
        outcome = evaluate_policy(agent.as_policy(temperature), envs, episode_ids, videos)
    if video_dir is not None:
        save_videos(outcome, video_dir / label.replace(" ", "_"))
    if loop is not None:
        loop.restart()
    metrics = {"eval/success": global_mean(outcome.success), "eval/return": global_mean(outcome.returns)}
    if rank == 0:
        tqdm.write(f"{label}: eval success {metrics['eval/success']:.3f}")
    return metrics


VIDEOS_PER_EVALUATION = 2  # --capture-video: a look at the policy, not a dataset


def video_format() -> str:
    """mp4 when an ffmpeg binary is around (the imageio-ffmpeg package ships one), else gif."""
    try:
        import imageio_ffmpeg

        imageio_ffmpeg.get_ffmpeg_exe()
        return "mp4"
    except (ImportError, RuntimeError):
        return "gif"


def save_videos(outcomes: EpisodeOutcomes, folder: Path, prefix: str = "") -> list[Path]:
    """One file per recorded episode, named by prefix, episode id and outcome -> the paths."""
    import imageio.v2 as imageio

    if not outcomes.videos:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    extension, paths = video_format(), []
    for frames, episode_id, ok in zip(outcomes.videos, outcomes.episode_ids, outcomes.success, strict=False):
        path = folder / f"{prefix}ep{episode_id}_{'success' if ok else 'fail'}.{extension}"
        if extension == "mp4":  # block size 1: keep the frame size instead of rescaling to 16k
            imageio.mimsave(path, list(frames), fps=10, macro_block_size=1)
        else:
            imageio.mimsave(path, list(frames), duration=100, loop=0)
        paths.append(path)
    return paths


def iteration_metrics(rollout: Rollout, batch_size: int, rollout_time: float, update_time: float,
                      device: torch.device) -> dict[str, float]:
    """What every RL iteration logs about its rollout (global means over ranks; nan when no
    episode ended in it) and its cost."""
    return {
        "rollout/success": global_mean(rollout.episode_success),
        "rollout/success_once": global_mean(rollout.episode_success_once),
        "rollout/episodic_return": global_mean(rollout.episode_returns),
        "time/env_steps_per_s": batch_size / rollout_time,
        "time/rollout_s": rollout_time,
        "time/update_s": update_time,
        "memory/peak_gb": peak_memory_gb(device),
    }


def show_progress(bar: Any, metrics: dict[str, float]) -> None:
    """The progress bar's postfix: return, success, approx KL and env-steps/s of the iteration."""
    bar.set_postfix(ret=f"{metrics['rollout/episodic_return']:.2f}", success=f"{metrics['rollout/success']:.2f}",
                    kl=f"{metrics.get('losses/approx_kl', float('nan')):.3f}",
                    sps=f"{metrics['time/env_steps_per_s']:.0f}", refresh=False)


def save_run(checkpoint: Path, agent: ActorCritic, state: dict[str, Any], flags: dict[str, Any],
             snapshot: str | None = None) -> None:
    """Checkpoint a training run: every rank calls (their RNG states are gathered), rank 0
    writes `checkpoint` with the run's flags and the RNG states added to the trainer state, and
    with `snapshot` also keeps a copy as RUN/snapshots/SNAPSHOT (success along training:
    scripts/matched_ind.py compares methods at the same in-distribution success)."""
    state = {**state, "rng": gather_objects(rng_state()), "args": flags}
    if world_info()[0] == 0:
        save_checkpoint(checkpoint, agent, state)
        if snapshot is not None:
            shutil.copytree(checkpoint, checkpoint.parent / "snapshots" / snapshot, dirs_exist_ok=True)


USER_ERRORS = (CheckpointError, NonFiniteError, ValueError, FileNotFoundError, RenderingUnavailable)


def run_script(main: Callable[[T], Any], args: T, algorithm: str, run_path: Path) -> None:
    """Run a training script's main(args): one line, no traceback, for what a user can fix; on
    Ctrl-C, say what is kept and how to continue; under torchrun, leave the process group.
    run_path: OUTPUT_DIR/EXP_NAME, named in the messages."""
    try:
        main(args)
        if world_info()[0] == 0:
            print(f"checkpoint: {run_path / 'checkpoint'}\n{tensorboard_hint(run_path)}")
    except KeyboardInterrupt:
        sys.exit(f"interrupted: the last checkpoint of this {algorithm} run, if any, is kept in "
                 f"{run_path / 'checkpoint'}; run the same command with --resume to continue")
    except USER_ERRORS as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        rank, world = world_info()
        sys.exit(f"error{f' (rank {rank})' if world > 1 else ''}: {message}")
    finally:
        finish_wandb_run(exit_code=1 if sys.exc_info()[0] is not None else 0)
        if dist.is_initialized():
            dist.destroy_process_group()
