"""Do the rollout's and the update's log-probs of the same actions agree, in fp32 and in bf16?

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_bf16_logprob.py
    python benchmarks/bench_bf16_logprob.py --device cuda        # the same on a GPU

PPO's ratio is exp(update log-prob - rollout log-prob). The rollout's come from act(): a
KV-cache decode at the rollout's batch (64 envs) with its padding; the update's from
score_actions(): one teacher-forced forward per minibatch of 8 (shuffled, as
ppo_vla.minibatches does), so other padding and other kernels. Before any update the ratio
should be 1: every sample whose |ratio - 1| > clip (0.2, PPO's) is clipped for rounding alone.

For each agent (the random tiny base at 64 px: near-uniform, the worst case for rounding;
the shipped pretrained one: near-deterministic) and each dtype, one batch of 64 twin
observations from reset (twin prompts, then mixed-length ones): act() at temperature 1, then
score_actions() on the same tokens. Prints max / mean |delta log-prob| and that clip fraction;
in bf16 also for scoring twice in differently shuffled minibatches (what would remain if the
rollout's log-probs were recomputed with the update's pass), and bf16 act() against fp32
scoring: the size of bf16 rounding, which bounds what other kernels (a GPU's: decode and
prefill pick different ones) could add. Not a test: CPU bf16 kernels are not a GPU's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import ActorCritic, build_agent  # noqa: E402  (the repo root is not a package)
from envs import make_vec_env  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PRETRAINED = REPO / "assets" / "tiny-openvla-twin"


@torch.no_grad()
def score_in_minibatches(agent: ActorCritic, obs: dict, tokens: torch.Tensor,
                         minibatch_size: int, seed: int) -> torch.Tensor:
    """score_actions() log-probs [N] of tokens [N, 7], in shuffled minibatches like the update's."""
    order = torch.randperm(len(tokens), generator=torch.Generator().manual_seed(seed))
    logprob = torch.empty(len(tokens))
    for part in order.split(minibatch_size):
        instructions = [obs["instruction"][i] for i in part.tolist()]
        logprob[part] = agent.score_actions(obs["image"][part.numpy()], instructions,
                                            tokens[part], 1.0)[0].float().cpu()
    return logprob


def compare(old: torch.Tensor, new: torch.Tensor, clip: float) -> tuple[float, float, float]:
    """Log-probs [N] of the same actions -> (max |delta|, mean |delta|, fraction clipped)."""
    delta = (new - old).abs()
    clipped = ((new - old).exp() - 1).abs() > clip
    return delta.max().item(), delta.mean().item(), clipped.float().mean().item()


def twin_observations(image_size: int, num_envs: int, mixed_lengths: bool) -> dict:
    """One batch of twin observations from reset. The twin's prompts all tokenize to one
    length (no padding anywhere); mixed_lengths appends 0-3 extra words so that act() and each
    minibatch pad differently, as instructions of other task families do."""
    obs, _ = make_vec_env("ind", num_envs, image_size, seed=0, env="twin").reset(seed=0)
    if mixed_lengths:
        obs = {**obs, "instruction": tuple(text + " now" * (i % 4)
                                           for i, text in enumerate(obs["instruction"]))}
    return obs


def measure(model_path: Path | None, args: argparse.Namespace) -> list[str]:
    """RESULT lines for one agent: each dtype x {twin, mixed-length} prompts, and the bf16
    rounding itself (bf16 act() against fp32 scoring of the same tokens, same weights)."""
    name = "random tiny" if model_path is None else "pretrained"
    agents = {dtype: build_agent(None if model_path is None else str(model_path), critic="h0",
                                 image_size=64 if model_path is None else None,
                                 device=args.device, dtype=dtype)
              for dtype in (torch.float32, torch.bfloat16)}
    lines = []

    def line(what: str, old: torch.Tensor, new: torch.Tensor) -> None:
        largest, mean, clipfrac = compare(old, new, args.clip)
        lines.append(f"RESULT {name}, {what}: |delta log-prob| max {largest:.2e}, mean "
                     f"{mean:.2e}; |ratio - 1| > {args.clip}: {clipfrac:.1%} of {len(old)}")

    for mixed in (False, True):
        prompts = "mixed-length prompts" if mixed else "twin prompts"
        obs = twin_observations(agents[torch.float32].image_size, args.num_envs, mixed)
        for dtype, agent in agents.items():
            torch.manual_seed(0)
            out = agent.act(obs["image"], obs["instruction"], 1.0)  # rollout: KV cache, batch 64
            update = score_in_minibatches(agent, obs, out.tokens, args.minibatch_size, seed=1)
            dtype_name = str(dtype).removeprefix("torch.")
            line(f"{dtype_name}, {prompts}, act vs update", out.logprob, update)
            if dtype == torch.bfloat16:
                again = score_in_minibatches(agent, obs, out.tokens, args.minibatch_size, seed=2)
                line(f"bfloat16, {prompts}, update vs reshuffled update", update, again)
                exact = score_in_minibatches(agents[torch.float32], obs, out.tokens,
                                             args.minibatch_size, seed=1)
                line(f"{prompts}, bf16 act vs fp32 update (bf16 rounding itself)",
                     out.logprob, exact)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num-envs", type=int, default=64, help="the rollout's batch")
    parser.add_argument("--minibatch-size", type=int, default=8, help="the update's (ppo_vla)")
    parser.add_argument("--clip", type=float, default=0.2, help="PPO's clip coefficient")
    args = parser.parse_args()
    for model_path in (None, PRETRAINED):
        print("\n".join(measure(model_path, args)), flush=True)


if __name__ == "__main__":
    main()
