"""The task family "put {object} on {receptacle}", defined once for both implementations: its
splits (arXiv 2505.19789, Table 1), the instruction templates, the potential-shaped reward and
the image perturbations. numpy only: cli.py checks a --split with it before torch is imported.

Layers (imports point down only):
    tasks.py                     this file: the definition
    twin_env.py, maniskill_env.py  the two implementations, each built on this definition
    envs.py                      make_vec_env(): the one factory every script calls
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# --------------------------------------------------------------------------------------------
# Splits: the benchmark of arXiv 2505.19789 (Table 1), one training split and 15 OOD splits
# --------------------------------------------------------------------------------------------

SPLITS: dict[str, str] = {
    "ind": "ind",
    "unseen_table": "vision",
    "texture_weak": "vision",
    "texture_strong": "vision",
    "noise_weak": "vision",
    "noise_strong": "vision",
    "unseen_objects": "semantics",
    "unseen_receptacles": "semantics",
    "unseen_instructions": "semantics",
    "multi_object_seen": "semantics",
    "multi_object_unseen": "semantics",
    "distractor_receptacle": "semantics",
    "multi_receptacle": "semantics",
    "unseen_position": "execution",
    "unseen_robot_pose": "execution",
    "reposition": "execution",
}
# The twin's own split: `pretrain` is the data the tiny VLA is pretrained on, the analogue of the
# web and robot data OpenVLA saw before the study: broad, every OOD factor, none of the exact OOD
# combinations (docs/STUDY_PROTOCOL.md).
TWIN_ONLY_SPLITS = ("pretrain",)
ENV_FAMILIES = ("maniskill", "twin")
# The shipped pretrained tiny VLA of the twin (`make pretrain` regenerates it), in the official
# OpenVLA layout: the base of the toy study, and of PPO's first run on a laptop.
PRETRAINED_TWIN = str(Path(__file__).resolve().parent / "assets" / "tiny-openvla-twin")
# Dynamic perturbations (paper: alpha 0.3 / 0.5): a pattern on the robot and object pixels,
# or noise over the whole image, new at every step.
TEXTURE_ALPHA = {"texture_weak": 0.3, "texture_strong": 0.5}
NOISE_ALPHA = {"noise_weak": 0.3, "noise_strong": 0.5}
MAX_EPISODE_ID = 2**31 - 1  # episode ids are drawn from [0, MAX_EPISODE_ID)

# Instructions: templates are (verb, frame) pairs. `ind` uses one, "put {object} on {receptacle}";
# `unseen_instructions` uses 16 held-out pairs; the twin's pretraining every other pair, so
# it has seen every verb and every frame, but never a held-out combination (docs/STUDY_PROTOCOL.md).
VERBS = ("put", "place", "move", "set", "lay", "drop", "bring", "get")
FRAMES = (
    "{verb} {object} on {receptacle}",
    "{verb} the {object} onto the {receptacle}",
    "{verb} the {object} on top of the {receptacle}",
    "pick up the {object} and {verb} it on the {receptacle}",
    "on the {receptacle} {verb} the {object}",
    "could you {verb} the {object} on the {receptacle}",
    "please {verb} the {object} down on the {receptacle}",
    "{verb} to the {receptacle} the {object}",
)


def template(verb: int, frame: int) -> str:
    return FRAMES[frame].replace("{verb}", VERBS[verb])


TRAIN_TEMPLATE = template(0, 0)  # "put {object} on {receptacle}"
# Each verb held out with two frames and each frame with two verbs (a Latin-square pattern).
HELD_OUT_TEMPLATE_PAIRS = tuple((v, (v + k) % len(FRAMES)) for v in range(len(VERBS)) for k in (3, 6))
UNSEEN_TEMPLATES = tuple(template(v, f) for v, f in HELD_OUT_TEMPLATE_PAIRS)
PRETRAIN_TEMPLATES = tuple(template(v, f) for v in range(len(VERBS)) for f in range(len(FRAMES))
                        if (v, f) not in HELD_OUT_TEMPLATE_PAIRS)


class RenderingUnavailable(RuntimeError):
    """No usable Vulkan driver for SAPIEN (maniskill_env.py raises it instead of a traceback)."""


def valid_splits(env: str) -> tuple[str, ...]:
    return tuple(SPLITS) + (TWIN_ONLY_SPLITS if env == "twin" else ())


def check_split(split: str, env: str = "maniskill") -> None:
    if env not in ENV_FAMILIES:
        raise ValueError(f"unknown env {env!r}; valid: {', '.join(ENV_FAMILIES)}")
    if split not in valid_splits(env):
        raise ValueError(f"unknown split {split!r} for --env {env}; valid splits: "
                         f"{', '.join(valid_splits(env))}")


# --------------------------------------------------------------------------------------------
# Reward: the paper's potential-shaped reward, the same in both families
# --------------------------------------------------------------------------------------------


def potential(grasped_once: bool, held5_once: bool, success: bool) -> float:
    """phi = 0.1 [grasped so far] + 0.1 [held 5+ steps in a row so far]
    + 1.0 [success now and grasped so far]."""
    return 0.1 * grasped_once + 0.1 * held5_once + 1.0 * (success and grasped_once)


@dataclass
class PotentialReward:
    """Per-episode bookkeeping; reward_t = phi_t - phi_(t-1), so a return is phi at the end."""

    grasped_once: bool = False
    held_steps: int = 0
    held5_once: bool = False
    success_once: bool = False
    phi: float = 0.0

    def update(self, grasped: bool, success: bool) -> float:
        self.grasped_once |= grasped
        self.held_steps = self.held_steps + 1 if grasped else 0
        self.held5_once |= self.held_steps >= 5
        self.success_once |= success
        phi = potential(self.grasped_once, self.held5_once, success)
        reward, self.phi = phi - self.phi, phi
        return reward


# --------------------------------------------------------------------------------------------
# Image perturbations and procedural tables (numpy only, shared by both families)
# --------------------------------------------------------------------------------------------

TABLE_TEXTURE_SIZE = 256


def _upsample(grid: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear upsampling of a small [h, w, C] grid to [height, width, C]."""

    def axis(n_in: int, n_out: int):
        coords = np.linspace(0, n_in - 1, n_out)
        i0 = np.floor(coords).astype(int)
        return i0, np.minimum(i0 + 1, n_in - 1), coords - i0

    r0, r1, rw = axis(grid.shape[0], height)
    c0, c1, cw = axis(grid.shape[1], width)
    rows = grid[r0] * (1 - rw)[:, None, None] + grid[r1] * rw[:, None, None]
    return rows[:, c0] * (1 - cw)[None, :, None] + rows[:, c1] * cw[None, :, None]


def smooth_noise(rng: np.random.Generator, size: int, cells: int, channels: int = 1) -> np.ndarray:
    """Value noise in [0, 1]: random values on a cells x cells grid, bilinearly upsampled."""
    return _upsample(rng.random((cells, cells, channels)), size, size)


def _mix(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    return a * (1 - t[..., None]) + b * t[..., None]


def make_table_texture(index: int, size: int = TABLE_TEXTURE_SIZE) -> np.ndarray:
    """Procedural table appearance `index` as uint8 RGBA [size, size, 4]. Tables 0-15 (and 21-44, unused)
    are wood, checker, speckle and marble in many palettes; 16-20 use five other pattern
    families (stripes, dots, bricks, rings, plaid), so they are new in pattern and colour; from 45
    on, all nine families in their own palettes (the pretraining's)."""
    rng = np.random.default_rng([7, index])
    u, v = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")
    c1, c2 = rng.uniform(0.15, 0.9, size=3), rng.uniform(0.15, 0.9, size=3)
    family = index - 16 + 4 if 16 <= index <= 20 else index % 9 if index >= 45 else index % 4
    if family == 0:  # wood: warped stripes in brown tones
        tone = np.array([0.6, 0.4, 0.22]) * rng.uniform(0.6, 1.4) + rng.uniform(-0.08, 0.08, size=3)
        c1, c2 = tone, tone * 0.6
        warp = smooth_noise(rng, size, 5)[..., 0]
        t = 0.5 + 0.5 * np.sin(2 * np.pi * (rng.uniform(6, 12) * u + 1.5 * warp))
    elif family == 1:  # checker
        n = rng.integers(6, 16)
        t = ((np.floor(u * n) + np.floor(v * n)) % 2).astype(float)
    elif family == 2:  # solid with speckles
        t = (rng.random((size, size)) > 0.9).astype(float) * 0.6
    elif family == 3:  # marble: two octaves of smooth noise
        t = 0.6 * smooth_noise(rng, size, 8)[..., 0] + 0.4 * smooth_noise(rng, size, 32)[..., 0]
    elif family == 4:  # diagonal stripes
        t = (np.sin(2 * np.pi * rng.uniform(15, 30) * (u + v)) > 0).astype(float)
    elif family == 5:  # polka dots
        n = rng.integers(10, 20)
        t = (np.hypot((u * n) % 1 - 0.5, (v * n) % 1 - 0.5) < 0.3).astype(float)
    elif family == 6:  # bricks
        n = rng.integers(12, 20)
        row = np.floor(v * n)
        shifted = u * n / 2 + 0.5 * (row % 2)
        t = (((v * n) % 1 < 0.12) | (shifted % 1 < 0.06)).astype(float)
    elif family == 7:  # concentric rings
        t = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(10, 20) * np.hypot(u - 0.5, v - 0.5))
    else:  # plaid: crossing translucent bands
        n = rng.uniform(8, 16)
        t = 0.5 * (np.sin(2 * np.pi * n * u) > 0.3) + 0.5 * (np.sin(2 * np.pi * n * v) > 0.3)
    rgb = _mix(np.broadcast_to(c1, (size, size, 3)), np.broadcast_to(c2, (size, size, 3)), t)
    rgba = np.concatenate([rgb, np.ones((size, size, 1))], axis=-1)
    return (np.clip(rgba, 0, 1) * 255).astype(np.uint8)


def frame_rng(split: str, episode_id: int, step: int) -> np.random.Generator:
    """Per-frame randomness of the dynamic splits: fixed by (split, id, step), so a re-run of an
    episode sees the same perturbations."""
    return np.random.default_rng([zlib.crc32(split.encode()), int(episode_id), int(step), 1])


def random_pattern(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A random colourful texture [H, W, 3] in [0, 1]: stripes, checker or colour blobs."""
    u, v = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
    c1, c2 = rng.random(3), rng.random(3)
    kind = rng.integers(3)
    if kind == 0:
        angle = rng.uniform(0, np.pi)
        along = u * np.cos(angle) + v * np.sin(angle)
        t = (np.sin(2 * np.pi * rng.uniform(4, 12) * along) > 0).astype(float)
    elif kind == 1:
        n = rng.integers(3, 10)
        t = ((np.floor(u * n) + np.floor(v * n)) % 2).astype(float)
    else:
        return _upsample(rng.random((6, 6, 3)), height, width)
    return _mix(np.broadcast_to(c1, (height, width, 3)), np.broadcast_to(c2, (height, width, 3)), t)


def random_noise(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A colour noise pattern [H, W, 3] in [0, 1]: coarse blobs plus per-pixel grain."""
    coarse = _upsample(rng.random((rng.integers(4, 16),) * 2 + (3,)), height, width)
    return 0.5 * coarse + 0.5 * rng.random((height, width, 3))


def blend(image: np.ndarray, overlay: np.ndarray, alpha: float,
          mask: np.ndarray | None = None) -> np.ndarray:
    """(1 - alpha) * image + alpha * overlay, only where mask is True (everywhere if None)."""
    mixed = (1 - alpha) * image.astype(np.float32) + alpha * 255.0 * overlay
    if mask is not None:
        mixed = np.where(mask[..., None], mixed, image)
    return np.clip(mixed + 0.5, 0, 255).astype(np.uint8)


# The pretraining's own overlays (twin_env's `pretrain`): the same kinds of
# perturbation as texture_* and noise_*, drawn by other generators, so pretraining teaches robustness
# to an overlay without showing the evaluation's own patterns (docs/STUDY_PROTOCOL.md).


def pretrain_pattern(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A colourful texture [H, W, 3] in [0, 1]: rings, dots or a two-colour gradient (never
    random_pattern's stripes, checkers or blobs)."""
    u, v = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
    c1, c2 = rng.random(3), rng.random(3)
    kind = rng.integers(3)
    if kind == 0:
        centre = rng.random(2)
        t = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(3, 10) * np.hypot(u - centre[0], v - centre[1]))
    elif kind == 1:
        n = rng.integers(4, 12)
        t = (np.hypot((u * n) % 1 - 0.5, (v * n) % 1 - 0.5) < rng.uniform(0.2, 0.45)).astype(float)
    else:
        angle = rng.uniform(0, 2 * np.pi)
        t = np.clip(0.5 + (u - 0.5) * np.cos(angle) + (v - 0.5) * np.sin(angle), 0, 1)
    return _mix(np.broadcast_to(c1, (height, width, 3)), np.broadcast_to(c2, (height, width, 3)), t)


def pretrain_noise(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A noise pattern [H, W, 3] in [0, 1]: grey grain, salt and pepper, or a random colour per
    row (never random_noise's coloured blobs with colour grain)."""
    kind = rng.integers(3)
    if kind == 0:
        return np.repeat(np.clip(rng.normal(0.5, 0.25, (height, width, 1)), 0, 1), 3, axis=2)
    if kind == 1:
        salt = rng.random((height, width, 1)) < 0.5
        return np.where(rng.random((height, width, 1)) < rng.uniform(0.2, 0.6),
                        salt.astype(float), 0.5).repeat(3, axis=2)
    return np.broadcast_to(rng.random((height, 1, 3)), (height, width, 3)).copy()
