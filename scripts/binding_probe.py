"""Does a tiny VLA learn to read the object's name? A probe for the pretraining recipe (issue 31).

    python scripts/binding_probe.py --layers 4 --steps 4000             # the recipe's grounding frames
    python scripts/binding_probe.py --layers 4 --steps 2000 --pairs     # each also with the other name
    python scripts/binding_probe.py --init-from assets/tiny-openvla-twin --pairs --learning-rate 5e-4

From the tiny preset's random init or a model directory (all weights, AdamW, warm-up then constant), trains on the
grounding frames of two-object `pretrain` scenes: their first expert steps before the grasp, where
only the name tells which object to go to (pretrain_tiny.py's first phase uses them). --pairs adds
each frame's twin: the same image, the other object named, the expert's move towards it; on the
pairs any name-blind guess is right half the time. Every --test-every steps, on held-out first
frames of other two-object scenes where the two objects ask for different moves: the share whose
teacher-forced greedy (dx, dy) signs both match the expert's towards the named object, with the
true name and with the other one named. A name-blind policy sums to at most ~1, one that reads
the name towards 2. Results: docs/PRETRAINING.md ("A binding probe").
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's modules, from anywhere

import model  # noqa: E402
from cli import parse_cli, require_finite_positive, require_non_negative, require_positive  # noqa: E402
from model import (  # noqa: E402
    ActionTokenizer,
    NormStats,
    action_token_loss,
    build_tiny_vla,
    load_openvla_dir,
    prepare_inputs,
)
from pretrain_tiny import name_pairs  # noqa: E402
from twin_env import decode_episode  # noqa: E402


@dataclass
class Args:
    """Train a random tiny VLA on two-object grounding frames; print how far the name steers it."""

    layers: int = 4
    """Llama layers of the tiny preset (the preset: 4; not with --init-from)"""
    init_from: str | None = None
    """start from this model directory (e.g. assets/tiny-openvla-twin) instead of the preset's random init"""
    steps: int = 2000
    """optimizer steps"""
    pairs: bool = False
    """train on each frame and its twin with the other object named (the expert's move to it)"""
    train_scenes: int = 4096
    """two-object scenes whose first frames are the training set"""
    depth: int = 3
    """first expert steps per training scene (before the grasp), as pretrain_tiny's grounding window"""
    test_scenes: int = 512
    """held-out two-object scenes (their first frame)"""
    test_every: int = 500
    """steps between two measurements"""
    learning_rate: float = 1e-3
    """AdamW peak learning rate (pretrain_tiny's)"""
    batch_size: int = 64
    """frames per step"""


def check_args(args: Args) -> None:
    if args.init_from is not None:
        if args.layers != 4:
            raise ValueError("--layers sets the random preset's depth: it cannot change an --init-from model")
        if not (Path(args.init_from) / "config.json").is_file():
            raise ValueError(f"--init-from {args.init_from}: no config.json there (an OpenVLA model directory)")
    require_positive(args, "layers", "train_scenes", "depth", "test_scenes", "test_every", "batch_size")
    require_non_negative(args, "steps")  # 0: measure the random init only
    require_finite_positive(args, "learning_rate")


def two_object_ids(first: int, count: int) -> np.ndarray:
    """The first COUNT ids from FIRST on whose `pretrain` scene has two objects."""
    ids, i = [], first
    while len(ids) < count:
        if len(decode_episode("pretrain", i).objects) == 2:
            ids.append(i)
        i += 1
    return np.array(ids)


def grounding_frames(ids: np.ndarray, depth: int) -> dict:
    """The first DEPTH expert steps before the grasp of each scene: images, instructions, the
    expert's actions, and the same with the other object named and the expert's move to it
    (pretrain_tiny's object pairs; its receptacle pairs, closed-gripper carrying frames, left out)."""
    images, texts, actions, _ = name_pairs(ids, 64, depth)
    keep = np.flatnonzero(actions[0::2, 6] >= 0)  # the pairs' first halves that do not carry
    return {"images": images[0::2][keep], "named": [texts[2 * i] for i in keep], "expert": actions[0::2][keep],
            "other_named": [texts[2 * i + 1] for i in keep], "other_expert": actions[1::2][keep]}


def main(args: Args) -> None:
    preset = model.tiny_vla_config

    def config(*a, **k):
        c = preset(*a, **k)
        c.text_config["num_hidden_layers"] = args.layers
        return c

    model.tiny_vla_config = config  # build_tiny_vla's preset, deeper or shallower
    torch.manual_seed(0)
    if args.init_from is None:
        vla, tokenizer = build_tiny_vla(64)
        stats = NormStats.identity()
    else:  # all weights trained from the model's, in float32, with its action statistics
        vla, tokenizer, stats, _ = load_openvla_dir(args.init_from, "cpu", dtype=torch.float32)
    vla.train()
    action_tokenizer = ActionTokenizer(tokenizer.vocab_size)

    def tokens_of(actions: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(action_tokenizer.encode(stats.normalize(actions)))

    train = grounding_frames(two_object_ids(10**6, args.train_scenes), args.depth)
    test = grounding_frames(two_object_ids(5 * 10**8, args.test_scenes), 1)
    decides = np.flatnonzero(np.any(np.sign(test["expert"][:, :2]) != np.sign(test["other_expert"][:, :2]), 1))
    images, texts, actions = train["images"], train["named"], train["expert"]
    if args.pairs:
        images = np.concatenate([images, images])
        texts = texts + train["other_named"]
        actions = np.concatenate([actions, train["other_expert"]])
    tokens = tokens_of(actions)
    print(f"{len(tokens)} training frames, {len(decides)} held-out frames where the name decides")

    def agreement(named: str, expert: str) -> float:
        inputs = prepare_inputs(vla, tokenizer, test["images"][decides], [test[named][i] for i in decides])
        _, predicted = action_token_loss(vla, inputs, tokens_of(test[expert][decides]))
        moves = action_tokenizer.decode(predicted.numpy())[:, :2]
        return float(np.mean(np.all(np.sign(np.round(moves, 1)) == np.sign(test[expert][decides, :2]), 1)))

    optimizer = torch.optim.AdamW(vla.parameters(), lr=args.learning_rate, weight_decay=0.01)
    rng, t0 = np.random.default_rng(0), time.perf_counter()
    for step in range(args.steps + 1):
        if step % args.test_every == 0 or step == args.steps:
            vla.eval()
            with torch.no_grad():
                true, swapped = agreement("named", "expert"), agreement("other_named", "other_expert")
            vla.train()
            print(f"step {step}: agreement with the named object's move {true:.3f}, with the other "
                  f"named {swapped:.3f}, sum {true + swapped:.2f} ({time.perf_counter() - t0:.0f} s)", flush=True)
        if step == args.steps:
            break
        for group in optimizer.param_groups:
            group["lr"] = args.learning_rate * min(1.0, (step + 1) / 200)
        index = rng.integers(0, len(tokens), args.batch_size)
        inputs = prepare_inputs(vla, tokenizer, images[index], [texts[i] for i in index])
        loss, _ = action_token_loss(vla, inputs, tokens[index])
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vla.parameters(), 1.0)
        optimizer.step()


if __name__ == "__main__":
    main(parse_cli(Args, check_args))
