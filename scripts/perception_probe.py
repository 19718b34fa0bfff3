"""Does the tiny VLA's vision tell an object's shape as well as its colour? A probe (issue 31).

    python scripts/perception_probe.py                                   # the shipped base
    python scripts/perception_probe.py --model-path DIR --frames 8192    # another model directory
    python scripts/perception_probe.py --train-steps 1000                # + can the towers learn it?

The shipped base reads the colour word but not the shape word (docs/PRETRAINING.md, "The name
pairs"): either its vision does not tell the shapes apart (perception), or the language model does
not tie the shape word to what it sees (binding). On the first frames of `pretrain` calibration
episodes, a probe (an MLP, one hidden layer, AdamW, full batch) trained on 3/4 of the frames predicts
the target object's shape and its colour on the other 1/4 from: the token the language model
receives for the patch under the object's centre (the projector's output), the same token from a
random tiny VLA of the same architecture (what pretraining added), and the raw pixels of a crop
centred on the object (what the image shows); and the majority class (chance). One more input
separates the patch grid from the training: the raw pixels of the grid patch under the object's
centre (what that token's patch embedding sees). With --train-steps, the vision towers and projector themselves are
trained with a linear head per label on the centre token (a direct signal, not behaviour cloning):
from the model, from the random preset, and from the random preset with --small-patch px patches.
If the random preset learns the shape as well as the small patches do, the 16 px grid is not what
hides it: the pretraining's signal is.
Results: docs/PRETRAINING.md ("What the vision sees", "Can the tiny towers learn the shape at all?").
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's modules, from anywhere

import twin_env  # noqa: E402
from cli import parse_cli, require_finite_positive, require_non_negative, require_positive  # noqa: E402
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
    train_steps: int = 0
    """if > 0: also train the towers and projector directly on the labels for this many AdamW steps"""
    train_learning_rate: float = 1e-3
    """their AdamW learning rate (--train-steps)"""
    small_patch: int = 8
    """patch size of the third directly trained model, from the random preset (--train-steps)"""
    object_size: float | None = None
    """draw the objects this wide (a share of the image; the twin's: 0.1875, 12 px at 64 px) in every frame"""


def check_args(args: Args) -> None:
    if not (Path(args.model_path) / "config.json").is_file():
        raise ValueError(f"--model-path {args.model_path}: no config.json there (an OpenVLA model directory)")
    require_positive(args, "frames", "steps", "hidden", "batch_size", "small_patch")
    require_non_negative(args, "train_steps")
    require_finite_positive(args, "learning_rate", "train_learning_rate")
    defaults = Args()
    for flag in ("train_learning_rate", "small_patch"):  # they only shape the --train-steps runs
        if not args.train_steps and getattr(args, flag) != getattr(defaults, flag):
            raise ValueError(f"--{flag.replace('_', '-')} applies only with --train-steps > 0")
    if args.object_size is not None and not 0 < args.object_size <= 0.5:
        raise ValueError(f"--object-size must be in (0, 0.5] (a share of the image), got {args.object_size}")
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


def patch_tokens(vla: OpenVLA, images: np.ndarray, batch: int) -> torch.Tensor:
    """The projector's output tokens [N, P, D]: what the Llama receives for each image's patches."""
    tokens = []
    with torch.no_grad():
        for start in tqdm(range(0, len(images), batch), desc="patch tokens", unit="batch"):
            pixels = preprocess_images(images[start:start + batch], vla.config.image_size, torch.device("cpu"),
                                       torch.float32, vla.config.image_transform)
            tokens.append(vla.projector(vla.vision_backbone(pixels)))  # [B, P, D]
    return torch.cat(tokens)


def at_patch(tokens: torch.Tensor, where: np.ndarray) -> torch.Tensor:
    """[N, P, D] -> [N, D]: each image's token at its patch WHERE."""
    return tokens[torch.arange(len(tokens)), torch.as_tensor(where)]


def grid_patches(images: np.ndarray, where: np.ndarray, patch: int) -> torch.Tensor:
    """Raw pixels [N, patch * patch * 3] in [0, 1] of the grid patch WHERE (row-major) of each image."""
    side = images.shape[1] // patch
    rows, cols = (where // side) * patch, (where % side) * patch
    cells = np.stack([images[i, r:r + patch, c:c + patch] for i, (r, c) in enumerate(zip(rows, cols, strict=True))])
    return torch.as_tensor(cells).reshape(len(cells), -1).float() / 255


def patch_size_of(vla: OpenVLA) -> int:
    return vla.config.image_size // int(round(vla.num_patches ** 0.5))


def trained_token_accuracy(vla: OpenVLA, frames: dict[str, np.ndarray], args: Args) -> dict[str, float]:
    """Train VLA's towers and projector (in place) with a linear head per label on the centre-patch
    token, on the first 3/4 of the frames; the held-out accuracy of shape and colour."""
    size = vla.config.image_size
    where = torch.as_tensor(centre_patch(frames["xy"], size, patch_size_of(vla)))
    pixels = preprocess_images(frames["images"], size, torch.device("cpu"), torch.float32,
                               vla.config.image_transform)  # [N, 6, S, S]
    labels = {k: torch.as_tensor(frames[k], dtype=torch.long) for k in ("shape", "colour")}
    heads = torch.nn.ModuleDict({"shape": torch.nn.Linear(vla.config.hidden_size, len(SHAPES)),
                                 "colour": torch.nn.Linear(vla.config.hidden_size, len(COLOURS))})
    towers = torch.nn.ModuleList([vla.vision_backbone, vla.projector]).train()
    optimizer = torch.optim.AdamW([*towers.parameters(), *heads.parameters()], lr=args.train_learning_rate)
    split = 3 * len(pixels) // 4
    generator = torch.Generator().manual_seed(0)

    def centre(rows: torch.Tensor) -> torch.Tensor:  # [B] frame indices -> centre tokens [B, D]
        return vla.projector(vla.vision_backbone(pixels[rows]))[torch.arange(len(rows)), where[rows]]

    for _ in tqdm(range(args.train_steps), desc="towers, direct signal", unit="step"):
        rows = torch.randint(0, split, (min(args.batch_size, split),), generator=generator)
        token = centre(rows)
        loss = sum(torch.nn.functional.cross_entropy(heads[k](token), labels[k][rows]) for k in heads)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    towers.eval()
    with torch.no_grad():
        test = torch.arange(split, len(pixels))
        token = torch.cat([centre(rows) for rows in test.split(args.batch_size)])
        return {k: float((heads[k](token).argmax(1) == labels[k][test]).float().mean()) for k in heads}


def object_crops(images: np.ndarray, xy: np.ndarray, size: int) -> torch.Tensor:
    """Raw pixels [N, size * size * 3] in [0, 1] of a SIZE crop centred on each object."""
    image_size, half = images.shape[1], size // 2
    centre = (xy * image_size).astype(int)
    padded = np.pad(images, ((0, 0), (half, half), (half, half), (0, 0)))
    crops = np.stack([padded[i, y:y + size, x:x + size] for i, (x, y) in enumerate(centre)])
    return torch.as_tensor(crops).reshape(len(crops), -1).float() / 255


def main(args: Args) -> dict[str, dict[str, float]]:
    torch.manual_seed(0)
    if args.object_size is not None:  # only the sprites' size: placement and clearances stay the twin's
        twin_env.OBJECT_SIZE = args.object_size
    vla, _, _, _ = load_openvla_dir(args.model_path, torch.device("cpu"), dtype=torch.float32, read_stats=False)
    random_vla, _ = build_tiny_vla(vla.config.image_size)  # the architecture of the tiny preset, untrained
    if random_vla.config.to_dict() != vla.config.to_dict():
        print("note: the random reference is the tiny preset, not this model's architecture", file=sys.stderr)
    size = vla.config.image_size
    patch = patch_size_of(vla)
    if args.train_steps and size % args.small_patch:
        raise SystemExit(f"error: --small-patch {args.small_patch} does not divide the model's image size {size}")
    frames = first_frames(args.frames, size, args.batch_size)
    where = centre_patch(frames["xy"], size, patch)
    features = {"model": at_patch(patch_tokens(vla.eval(), frames["images"], args.batch_size), where),
                "random model": at_patch(patch_tokens(random_vla.eval(), frames["images"], args.batch_size), where),
                "grid patch": grid_patches(frames["images"], where, patch),
                "object crop": object_crops(frames["images"], frames["xy"], patch)}
    test = slice(3 * args.frames // 4, None)
    results: dict[str, dict[str, float]] = {}
    for name, labels, classes in (("shape", frames["shape"], len(SHAPES)), ("colour", frames["colour"], len(COLOURS))):
        results[name] = {kind: probe_accuracy(f, labels, classes, args) for kind, f in features.items()}
        results[name]["chance"] = float(np.bincount(labels[test], minlength=classes).max() / len(labels[test]))
    if args.train_steps:
        trained = {"trained model": vla, "trained random preset": random_vla,
                   f"trained random preset, {args.small_patch} px patches": build_tiny_vla(size, args.small_patch)[0]}
        for kind, net in trained.items():
            for name, accuracy in trained_token_accuracy(net, frames, args).items():
                results[name][kind] = accuracy
    print(f"{args.model_path}: first frames of {args.frames} `pretrain` calibration episodes; MLP probes tested on "
          f"{len(labels[test])}: accuracy from the target object's centre-patch token, the same token of a random "
          f"model, the raw pixels of the {patch} px grid patch under the object's "
          f"centre and of a {patch} px crop centred on it, and chance"
          + (f"; then the towers trained directly for {args.train_steps} steps (linear heads)" if args.train_steps else ""))
    for name, r in results.items():
        print(f"  {name}:")
        for kind, accuracy in r.items():
            print(f"    {kind:40} {accuracy:.3f}")
    return results


if __name__ == "__main__":
    main(parse_cli(Args, check_args))
