"""Does the tiny VLA's vision tell an object's shape as well as its colour? A probe (issue 31).

    python scripts/perception_probe.py                                   # the shipped base
    python scripts/perception_probe.py --model-path DIR --frames 8192    # another model directory

The shipped base reads the colour word but not the shape word (docs/PRETRAINING.md, "The name
pairs"): either its vision does not tell the shapes apart (perception), or the language model does
not tie the shape word to what it sees (binding). On the first frames of `pretrain` calibration
episodes, a probe (an MLP, one hidden layer, AdamW, full batch) trained on 3/4 of the frames predicts
the target object's shape and its colour on the other 1/4 from: the token the language model
receives for the patch under the object's centre (the projector's output), the same token from a
random tiny VLA of the same architecture (what pretraining added), and the raw pixels of a crop
centred on the object (what the image shows); and the majority class (chance).
Results: docs/PRETRAINING.md ("What the vision sees").
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's modules, from anywhere

from cli import parse_cli, require_finite_positive, require_positive  # noqa: E402
from common import calibration_episode_ids  # noqa: E402
from model import OpenVLA, build_tiny_vla, load_openvla_dir, preprocess_images  # noqa: E402
from twin_env import COLOURS, SHAPES, TwinVecEnv  # noqa: E402


@dataclass
class Args:
    """Fit MLP probes of shape and colour on the target object's patch token; print their accuracy."""

    model_path: str = "assets/tiny-openvla-twin"
    """OpenVLA model directory whose vision is probed"""
    frames: int = 4096
    """first frames of `pretrain` calibration episodes (3/4 train the probe, 1/4 test it)"""
    steps: int = 1500
    """full-batch AdamW steps of each probe"""
    hidden: int = 256
    """the probes' hidden width"""
    learning_rate: float = 3e-3
    """the probes' AdamW learning rate"""
    batch_size: int = 256
    """frames per forward pass of the model"""


def check_args(args: Args) -> None:
    if not (Path(args.model_path) / "config.json").is_file():
        raise ValueError(f"--model-path {args.model_path}: no config.json there (an OpenVLA model directory)")
    require_positive(args, "frames", "steps", "hidden", "batch_size")
    require_finite_positive(args, "learning_rate")
    if args.frames < 8:
        raise ValueError(f"--frames must be at least 8 (a quarter of them test the probe), got {args.frames}")


def first_frames(count: int, image_size: int, batch: int) -> dict[str, np.ndarray]:
    """First frames of `pretrain` calibration episodes: images [N, S, S, 3], the target object's
    shape and colour (indices into SHAPES, COLOURS) and its centre (x, y) in [0, 1]."""
    ids = calibration_episode_ids("pretrain", count)
    out: dict[str, list] = {"images": [], "shape": [], "colour": [], "xy": []}
    colour_index = {rgb: i for i, rgb in enumerate(COLOURS.values())}
    for start in range(0, count, batch):
        chunk = ids[start:start + batch]
        env = TwinVecEnv("pretrain", len(chunk), image_size)
        obs, _ = env.reset(options={"episode_ids": chunk})
        out["images"].append(obs["image"])
        out["shape"].append(env.object_shape[:, 0])  # slot 0: the target
        out["colour"].append([colour_index[tuple(int(c) for c in rgb)] for rgb in env.object_colour[:, 0]])
        out["xy"].append(env.object_xy[:, 0])
    return {k: np.concatenate([np.asarray(v) for v in vs]) for k, vs in out.items()}


def centre_patch(xy: np.ndarray, image_size: int, patch: int) -> np.ndarray:
    """Row-major index of the patch under each centre xy [N, 2] (x = column, y = row, in [0, 1])."""
    cell = np.clip((xy * image_size).astype(int) // patch, 0, image_size // patch - 1)
    return cell[:, 1] * (image_size // patch) + cell[:, 0]


def probe_accuracy(features: torch.Tensor, labels: np.ndarray, classes: int, args: Args) -> float:
    """An MLP trained on the first 3/4 of features [N, F] to predict labels; its accuracy on the rest."""
    split = 3 * len(features) // 4
    x = (features - features[:split].mean(0)) / (features[:split].std(0) + 1e-6)  # train statistics only
    y = torch.as_tensor(labels, dtype=torch.long)
    torch.manual_seed(0)
    probe = torch.nn.Sequential(torch.nn.Linear(x.shape[1], args.hidden), torch.nn.GELU(),
                                torch.nn.Linear(args.hidden, classes))
    optimizer = torch.optim.AdamW(probe.parameters(), lr=args.learning_rate, weight_decay=0.05)
    for _ in range(args.steps):
        loss = torch.nn.functional.cross_entropy(probe(x[:split]), y[:split])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return float((probe(x[split:]).argmax(1) == y[split:]).float().mean())


def centre_tokens(vla: OpenVLA, images: np.ndarray, where: np.ndarray, batch: int) -> torch.Tensor:
    """The projector's output token [N, D] at each image's patch WHERE: what the Llama receives."""
    tokens = []
    with torch.no_grad():
        for start in tqdm(range(0, len(images), batch), desc="patch tokens", unit="batch"):
            pixels = preprocess_images(images[start:start + batch], vla.config.image_size, torch.device("cpu"),
                                       torch.float32, vla.config.image_transform)
            patches = vla.projector(vla.vision_backbone(pixels))  # [B, P, D]
            tokens.append(patches[torch.arange(len(pixels)), torch.as_tensor(where[start:start + batch])])
    return torch.cat(tokens)


def object_crops(images: np.ndarray, xy: np.ndarray, size: int) -> torch.Tensor:
    """Raw pixels [N, size * size * 3] in [0, 1] of a SIZE crop centred on each object."""
    image_size, half = images.shape[1], size // 2
    centre = (xy * image_size).astype(int)
    padded = np.pad(images, ((0, 0), (half, half), (half, half), (0, 0)))
    crops = np.stack([padded[i, y:y + size, x:x + size] for i, (x, y) in enumerate(centre)])
    return torch.as_tensor(crops).reshape(len(crops), -1).float() / 255


def main(args: Args) -> dict[str, dict[str, float]]:
    torch.manual_seed(0)
    vla, _, _, _ = load_openvla_dir(args.model_path, torch.device("cpu"), dtype=torch.float32, read_stats=False)
    random_vla, _ = build_tiny_vla(vla.config.image_size)  # the architecture of the tiny preset, untrained
    if random_vla.config.to_dict() != vla.config.to_dict():
        print("note: the random reference is the tiny preset, not this model's architecture", file=sys.stderr)
    size = vla.config.image_size
    patch = size // int(round(vla.num_patches ** 0.5))
    frames = first_frames(args.frames, size, args.batch_size)
    where = centre_patch(frames["xy"], size, patch)
    features = {"model": centre_tokens(vla.eval(), frames["images"], where, args.batch_size),
                "random model": centre_tokens(random_vla.eval(), frames["images"], where, args.batch_size),
                "object crop": object_crops(frames["images"], frames["xy"], patch)}
    test = slice(3 * args.frames // 4, None)
    results: dict[str, dict[str, float]] = {}
    for name, labels, classes in (("shape", frames["shape"], len(SHAPES)), ("colour", frames["colour"], len(COLOURS))):
        results[name] = {kind: probe_accuracy(f, labels, classes, args) for kind, f in features.items()}
        results[name]["chance"] = float(np.bincount(labels[test], minlength=classes).max() / len(labels[test]))
    print(f"{args.model_path}: first frames of {args.frames} `pretrain` calibration episodes; MLP probes tested on "
          f"{len(labels[test])}: accuracy from the target object's centre-patch token, the same token of a random "
          f"model, the raw pixels of a {patch} px crop centred on the object, and chance")
    for name, r in results.items():
        print(f"  {name:6}  token {r['model']:.3f}   random model's token {r['random model']:.3f}   "
              f"object crop {r['object crop']:.3f}   chance {r['chance']:.3f}")
    return results


if __name__ == "__main__":
    main(parse_cli(Args, check_args))
