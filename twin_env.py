"""A fast 2D twin of the task family "put {object} on {receptacle}", in vectorised numpy.

The same questions as the ManiSkill task (maniskill_env.py), ~100x cheaper: closed-loop control
over many steps, grasp before place, the same potential reward (envs.PotentialReward), the same
7-D action space and the same 16 splits, plus `pretrain`, the twin's stand-in for the robot data
a VLA saw before fine-tuning. The interface is gymnasium's vector env, as described in envs.py.

Mechanics (all lengths in workspace units, the table is [0, 1]^2 seen from above; x -> image
column, y -> image row; geometry constants are at the top of the file):
  * The gripper moves by STEP * (dx, dy) per step (action dims 0-1, rounded to hundredths),
    clipped to the table; dims 2-5 are ignored; dim 6 < 0 closes the gripper, >= 0 opens it
    (+1 open, -1 close).
  * The move comes first, then the gripper command, at the new position. Closing (open ->
    closed) grasps the nearest object whose centre is within GRASP_RADIUS; the object snaps to
    the gripper and is carried while the gripper stays closed. Closing on nothing holds nothing
    until the gripper opens again. Opening drops the held object where the gripper is.
  * Success at a step: the NAMED object rests (not held) with its centre inside the NAMED
    receptacle's footprint (a disc or a square RECEPTACLE_SIZE wide). No early termination:
    every episode lasts max_episode_steps (TWIN_HORIZON by default).
  * Rendering: a muted table texture, the receptacles (pre-rendered at reset), the resting
    objects, then the held object and the gripper, a dark U whose fingers are wide apart when
    open and close together when closed. `segmentation` labels the last frame's pixels
    (0 table, 1 receptacle, 2 object, 3 gripper), as ManiSkill's segmentation camera does.

Episodes: an id fixes the initial state. `ind` draws the receptacle, then the object, on a
7 x 7 grid (GRID_X, GRID_Y) with clearance radii, one of 16 objects (4 shapes x 4 colours),
the plate, one of tables 0-15, the training template, the gripper at GRIPPER_HOME. Every other
split starts from the ind episode of the same id and changes only what it claims (paired
comparisons, as maniskill_env.decode_episode does):
  vision     unseen_table (tables 16-20); texture_weak/strong (a random pattern blended at
             alpha 0.3/0.5 over the gripper and object pixels, new every step); noise_weak/strong
             (random noise over the whole image, alpha 0.3/0.5, new every step)
  semantics  unseen_objects (9 objects: 3 new shapes x 3 new colours); unseen_receptacles (a new
             receptacle replaces the plate); unseen_instructions (16 paraphrases);
             multi_object_seen (a second training object, the target is the ind one);
             multi_object_unseen (two unseen objects, one named); distractor_receptacle (plate +
             an unseen receptacle, target the plate); multi_receptacle (two unseen, one named)
  execution  unseen_position (the target just outside the grid); unseen_robot_pose (the gripper
             starts elsewhere); reposition (right before the action of step REPOSITION_STEP the
             target jumps far away; if it was held it leaves the still-closed gripper, which
             must open before it can grasp again)
  pretrain   the pretraining of docs/STUDY_PROTOCOL.md, drawn afresh rather than edited
             from ind: every OOD factor, none of the exact OOD combinations (72 objects: every
             (shape, colour) pair but unseen_objects'; all 9 receptacles; 48 (verb, frame)
             templates: all but unseen_instructions'; tables 45-116 of all nine families; texture or
             noise overlays from generators of its own; continuous positions, random start poses,
             jumps of the target at random steps). The shipped model's pretraining.
"""

from __future__ import annotations

import string
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

import gymnasium
import numpy as np
from gymnasium import spaces
from gymnasium.vector.utils import batch_space

from tasks import (
    MAX_EPISODE_ID,
    NOISE_ALPHA,
    PRETRAIN_TEMPLATES,
    TEXTURE_ALPHA,
    TRAIN_TEMPLATE,
    TWIN_ONLY_SPLITS,
    UNSEEN_TEMPLATES,
    PotentialReward,
    blend,
    check_split,
    frame_rng,
    make_table_texture,
    pretrain_noise,
    pretrain_pattern,
    random_noise,
    random_pattern,
)

# --------------------------------------------------------------------------------------------
# 1. Geometry, look and layout (tune these for learnability)
# --------------------------------------------------------------------------------------------

TWIN_HORIZON = 30  # ~2x the expert: it needs at most 16 steps on any split (10 on average)
STEP = 0.1  # gripper displacement per unit of action
MOVE_DECIMALS = 2  # dx, dy are rounded to hundredths of a step (see TwinVecEnv._move)
GRASP_RADIUS = 0.08  # closing grasps an object whose centre is this close to the gripper's
OBJECT_SIZE = 0.1875  # 12 px at 64 px: smaller objects were hard for a tiny ViT to find (docs/HISTORY.md)
RECEPTACLE_SIZE = 0.25  # 16 px at 64 px; also the success footprint (disc diameter / square side)
GRIPPER_SIZE = 0.25  # wider than an object, so a held object shows between the fingers
TABLE_GREY, TABLE_CONTRAST = 140.0, 0.5  # table = grey + contrast * (texture - grey): muted
GRIPPER_COLOUR = (15, 15, 15)  # darker than any muted table, object or receptacle fill
# The study's domain (ind and every OOD split) may differ from pretraining by something the base
# must adapt to, as ManiSkill's robot and renders differ from OpenVLA's data (docs/STUDY_PROTOCOL.md,
# section 1): the gripper's look and its step. Calibration knobs, tuned on the base's and the
# warm-up's calibration numbers only: a grey gripper of 108 puts the shipped base at 44.9% on `ind`
# and its warm-up at 50.8%, with 12 of 15 OOD splits in 15-85% and unseen_table at 85.2% (grey
# 103: warm-up 69.9% on `ind`; 105: unseen_table 90.2%; 110: two splits under 15%;
# docs/STUDY_PROTOCOL.md, twentieth and twenty-first entries).
STUDY_GRIPPER_COLOUR = (108, 108, 108)
STUDY_STEP = STEP  # <= 0.11: the expert closes within half a step per axis, inside GRASP_RADIUS

GRID_X = tuple(0.2 + 0.1 * i for i in range(7))  # training placements
GRID_Y = tuple(0.13 + 0.1 * i for i in range(7))
GRIPPER_HOME = (0.5, 0.9)  # below the grid (a robot base at the bottom), the whole U in view
# Clearance radii (half diagonals, rounded up): two things are placed >= r_a + r_b apart.
OBJECT_CLEARANCE, RECEPTACLE_CLEARANCE, GRIPPER_CLEARANCE = 0.14, 0.18, 0.17
OUTSIDE_MARGIN = 0.09  # unseen_position: the target this far outside the grid
ROBOT_POSE_MIN_DISTANCE = 0.3  # unseen_robot_pose: the start this far from GRIPPER_HOME
REPOSITION_STEP = 5  # reposition: the target moves right before this step's action
REPOSITION_MIN_DISTANCE = 0.3
MAX_OBJECTS = 2  # object slots per episode (the multi_object_* splits fill both)
LABEL_TABLE, LABEL_RECEPTACLE, LABEL_OBJECT, LABEL_GRIPPER = 0, 1, 2, 3

# --------------------------------------------------------------------------------------------
# 2. Catalogue: shapes x colours, receptacles, templates, tables. Every word of a training or
#    pretraining name or template is one piece of the tiny tokenizer (its TINY_WORDS)
# --------------------------------------------------------------------------------------------

Mask = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (u, v) in [-1, 1]^2 -> inside
SHAPES: dict[str, Mask] = {
    "square": lambda u, v: np.maximum(abs(u), abs(v)) <= 0.85,
    "ball": lambda u, v: np.hypot(u, v) <= 0.95,
    "cup": lambda u, v: (np.hypot(u, v) <= 1.0) & (np.hypot(u, v) >= 0.45),  # a ring from above
    "block": lambda u, v: (abs(u) <= 1.0) & (abs(v) <= 0.5),  # a flat bar
    "triangle": lambda u, v: abs(u) <= (v + 1.0) / 2,
    "cross": lambda u, v: (abs(u) <= 0.3) | (abs(v) <= 0.3),
    "diamond": lambda u, v: abs(u) + abs(v) <= 1.05,
    "box": lambda u, v: np.maximum(abs(u), abs(v)) >= 0.5,  # a hollow square
    "bottle": lambda u, v: abs(u) <= 0.5,  # a bar standing up
}
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 30, 30), "green": (30, 185, 50), "blue": (40, 80, 235), "yellow": (245, 215, 20),
    "purple": (140, 50, 205), "pink": (255, 120, 195), "orange": (255, 130, 0),
    "white": (250, 250, 250), "brown": (135, 70, 20),
}
TRAIN_SHAPES, TRAIN_COLOURS = ("square", "ball", "cup", "block"), ("red", "green", "blue", "yellow")
UNSEEN_SHAPES, UNSEEN_COLOURS = ("triangle", "cross", "diamond"), ("purple", "pink", "orange")
TRAIN_OBJECTS = tuple(f"{c} {s}" for s in TRAIN_SHAPES for c in TRAIN_COLOURS)
UNSEEN_OBJECTS = tuple(f"{c} {s}" for s in UNSEEN_SHAPES for c in UNSEEN_COLOURS)


@dataclass(frozen=True)
class Receptacle:
    kind: str  # "disc" | "square": the drawn shape and the success footprint
    fill: tuple[int, int, int]
    rim: tuple[int, int, int]


RECEPTACLES: dict[str, Receptacle] = {
    "plate": Receptacle("disc", (240, 240, 235), (120, 120, 120)),
    "bowl": Receptacle("disc", (150, 190, 240), (40, 70, 140)),
    "tray": Receptacle("square", (205, 160, 110), (110, 70, 30)),
    "basket": Receptacle("square", (170, 215, 140), (70, 110, 40)),
    "pan": Receptacle("disc", (100, 105, 125), (45, 45, 55)),
    "towel": Receptacle("square", (170, 230, 230), (60, 130, 130)),
    "cloth": Receptacle("square", (235, 225, 170), (140, 120, 60)),
    "pot": Receptacle("disc", (225, 150, 120), (120, 60, 40)),
    "sink": Receptacle("square", (215, 220, 230), (90, 95, 110)),
}
TRAIN_RECEPTACLE = "plate"
UNSEEN_RECEPTACLES = ("bowl", "tray", "basket", "pan")
TRAIN_TABLES, UNSEEN_TABLES = range(16), range(16, 21)  # tables 21-44 were the first pretraining's

# The pretraining (`pretrain`, docs/STUDY_PROTOCOL.md): every shape and colour but not
# the held-out pairs of unseen_objects, every receptacle as a target, every verb and frame but not
# the held-out pairs of unseen_instructions, tables of all nine families, overlays from generators
# of its own, continuous positions, random start poses and jumps of the target at random steps.
PRETRAIN_OBJECTS = tuple(f"{c} {s}" for s in SHAPES for c in COLOURS if f"{c} {s}" not in UNSEEN_OBJECTS)
PRETRAIN_RECEPTACLES = tuple(RECEPTACLES)
PRETRAIN_TABLES = range(45, 117)
PRETRAIN_OBJECT_AREA = ((0.08, 0.04), (0.92, 0.82))  # covers the grid and unseen_position's ring
PRETRAIN_RECEPTACLE_AREA = ((0.13, 0.1), (0.87, 0.8))  # the whole footprint on the table
PRETRAIN_SECOND_OBJECT_P, PRETRAIN_SECOND_RECEPTACLE_P = 0.5, 0.3
PRETRAIN_RELATED_OBJECT_P = 0.6  # a second object shares the target's shape or colour: both words matter
PRETRAIN_START_POSE_P = 0.5  # the gripper starts anywhere instead of at home
PRETRAIN_REPOSITION_P, PRETRAIN_REPOSITION_STEPS = 0.25, (2, 12)  # the target jumps before such a step
PRETRAIN_OVERLAY_P = {"texture": 0.2, "noise": 0.2}  # else a clean episode
PRETRAIN_OVERLAY_ALPHA = (0.1, 0.6)

# --------------------------------------------------------------------------------------------
# 3. Episode ids -> configurations
# --------------------------------------------------------------------------------------------

XY = tuple[float, float]
Occupied = list[tuple[XY, float]]  # (position, clearance radius) of what is already placed
GRID_POINTS = np.array([(x, y) for y in GRID_Y for x in GRID_X])


@dataclass
class TwinEpisode:
    """Everything that fixes an episode's initial state (and the reposition event)."""

    split: str
    episode_id: int
    table: int
    objects: list[str]  # objects[0] is the target
    object_xy: list[XY]
    receptacles: list[str]  # receptacles[0] is the target
    receptacle_xy: list[XY]
    template: str
    gripper_xy: XY = GRIPPER_HOME
    reposition_xy: XY | None = None
    reposition_step: int = REPOSITION_STEP
    overlay: str | None = None  # pretrain: "texture" | "noise", new at every step
    overlay_alpha: float = 0.0

    @property
    def instruction(self) -> str:
        return self.template.format(object=self.objects[0], receptacle=self.receptacles[0])


def is_clear(xy: XY, radius: float, occupied: Occupied) -> bool:
    return all(np.hypot(xy[0] - o[0], xy[1] - o[1]) >= radius + r for o, r in occupied)


def free_grid_points(radius: float, occupied: Occupied) -> np.ndarray:
    """The grid points [M, 2] clear of everything already placed."""
    if not occupied:
        return GRID_POINTS
    centres, radii = np.array([xy for xy, _ in occupied]), np.array([r for _, r in occupied])
    distance = np.linalg.norm(GRID_POINTS[:, None] - centres[None], axis=-1)  # [36, len(occupied)]
    return GRID_POINTS[(distance >= radius + radii).all(axis=1)]


def grid_xy(rng: np.random.Generator, radius: float, occupied: Occupied) -> XY:
    """A grid point clear of everything already placed (the radii keep one free, see tests)."""
    free = free_grid_points(radius, occupied)
    if len(free) == 0:
        raise RuntimeError("no free grid point")
    x, y = free[rng.integers(len(free))]
    return float(x), float(y)


def uniform_xy(rng: np.random.Generator, low: XY, high: XY, accept: Callable[[XY], bool]) -> XY:
    """Rejection sampling in a rectangle."""
    for _ in range(1000):
        xy = (float(rng.uniform(low[0], high[0])), float(rng.uniform(low[1], high[1])))
        if accept(xy):
            return xy
    raise RuntimeError("could not place")


def outside_xy(rng: np.random.Generator, occupied: Occupied) -> XY:
    """A point OUTSIDE_MARGIN beyond one edge of the training grid (unseen positions)."""
    lo = (GRID_X[0] - OUTSIDE_MARGIN, GRID_Y[0] - OUTSIDE_MARGIN)
    hi = (GRID_X[-1] + OUTSIDE_MARGIN, GRID_Y[-1] + OUTSIDE_MARGIN)
    for _ in range(1000):
        side, along = rng.integers(4), rng.uniform(0.0, 1.0)
        axis = side // 2  # sides 0, 1: left/right edge (x fixed); 2, 3: top/bottom (y fixed)
        fixed = (lo, hi)[side % 2][axis]
        free = lo[1 - axis] + along * (hi[1 - axis] - lo[1 - axis])
        xy = (fixed, free) if axis == 0 else (free, fixed)
        if is_clear(xy, OBJECT_CLEARANCE, occupied):
            return float(xy[0]), float(xy[1])
    raise RuntimeError("could not place outside the grid")


def robot_of(split: str) -> dict[str, Any]:
    """The robot a split shows (gripper colour and step): pretraining's, or the study domain's.
    Demonstration directories record it, so demos of another robot are never mixed in (demos.py)."""
    pretraining = split in TWIN_ONLY_SPLITS
    return {"gripper_colour": list(GRIPPER_COLOUR if pretraining else STUDY_GRIPPER_COLOUR),
            "step": STEP if pretraining else STUDY_STEP}


def ind_episode(episode_id: int) -> TwinEpisode:
    """The in-distribution configuration of an id: every split starts from it."""
    rng = np.random.default_rng([0, episode_id])
    receptacle_xy = grid_xy(rng, RECEPTACLE_CLEARANCE, [])
    object_xy = grid_xy(rng, OBJECT_CLEARANCE, [(receptacle_xy, RECEPTACLE_CLEARANCE)])
    return TwinEpisode(
        split="ind", episode_id=episode_id, table=int(rng.choice(TRAIN_TABLES)),
        objects=[str(rng.choice(TRAIN_OBJECTS))], object_xy=[object_xy],
        receptacles=[TRAIN_RECEPTACLE], receptacle_xy=[receptacle_xy], template=TRAIN_TEMPLATE,
    )


def pretrain_episode(episode_id: int) -> TwinEpisode:
    """A `pretrain` configuration: drawn afresh, not an edit of the ind episode. A layout
    that leaves no room for the next thing (~1 id in 2,000: a start pose and two receptacles in
    the middle) is drawn again from the id's next stream."""
    for attempt in range(100):
        rng = np.random.default_rng([zlib.crc32(b"pretrain"), episode_id, *([attempt] if attempt else [])])
        try:
            return pretrain_layout(rng, episode_id)
        except RuntimeError:
            continue
    raise RuntimeError(f"pretrain episode {episode_id}: no layout in 100 draws")


def pretrain_layout(rng: np.random.Generator, episode_id: int) -> TwinEpisode:
    """One draw of pretrain_episode's; RuntimeError when something cannot be placed."""
    start = GRIPPER_HOME
    if rng.random() < PRETRAIN_START_POSE_P:
        start = (float(rng.uniform(0.1, 0.9)), float(rng.uniform(0.1, 0.9)))
    placed: Occupied = [(start, GRIPPER_CLEARANCE)]

    def place(area: tuple[XY, XY], radius: float) -> XY:
        xy = uniform_xy(rng, area[0], area[1], lambda p: is_clear(p, radius, placed))
        placed.append((xy, radius))
        return xy

    receptacles = [str(n) for n in rng.choice(PRETRAIN_RECEPTACLES, size=2, replace=False)]
    receptacles = receptacles[:2 if rng.random() < PRETRAIN_SECOND_RECEPTACLE_P else 1]
    receptacle_xy = [place(PRETRAIN_RECEPTACLE_AREA, RECEPTACLE_CLEARANCE) for _ in receptacles]
    objects = [str(rng.choice(PRETRAIN_OBJECTS))]
    if rng.random() < PRETRAIN_SECOND_OBJECT_P:
        colour, shape = objects[0].split()
        related = rng.random() < PRETRAIN_RELATED_OBJECT_P
        others = [n for n in PRETRAIN_OBJECTS if n != objects[0]
                  and (not related or n.split()[0] == colour or n.split()[1] == shape)]
        objects.append(str(rng.choice(others)))
    object_xy = [place(PRETRAIN_OBJECT_AREA, OBJECT_CLEARANCE) for _ in objects]
    ep = TwinEpisode(split="pretrain", episode_id=episode_id, table=int(rng.choice(PRETRAIN_TABLES)),
                     objects=objects, object_xy=object_xy, receptacles=receptacles,
                     receptacle_xy=receptacle_xy, template=str(rng.choice(PRETRAIN_TEMPLATES)), gripper_xy=start)
    if rng.random() < PRETRAIN_REPOSITION_P:
        keep_clear = [(xy, RECEPTACLE_CLEARANCE + OBJECT_CLEARANCE) for xy in receptacle_xy]
        keep_clear.append((object_xy[0], REPOSITION_MIN_DISTANCE))
        ep.reposition_step = int(rng.integers(PRETRAIN_REPOSITION_STEPS[0], PRETRAIN_REPOSITION_STEPS[1] + 1))
        ep.reposition_xy = uniform_xy(rng, *PRETRAIN_OBJECT_AREA, lambda xy: is_clear(xy, 0.0, keep_clear))
    overlay = rng.random()
    for kind, p in PRETRAIN_OVERLAY_P.items():
        if overlay < p:
            ep.overlay, ep.overlay_alpha = kind, float(rng.uniform(*PRETRAIN_OVERLAY_ALPHA))
            break
        overlay -= p
    return ep


def decode_episode(split: str, episode_id: int) -> TwinEpisode:
    """Deterministic id -> configuration: the ind episode of the id, edited by the split
    (`pretrain`: drawn afresh)."""
    check_split(split, "twin")
    if split == "pretrain":
        return pretrain_episode(int(episode_id))
    ep = ind_episode(int(episode_id))
    ep.split = split
    # A second stream per split, so the edits below never shift the shared draws above.
    rng = np.random.default_rng([zlib.crc32(split.encode()), int(episode_id)])
    placed = [(ep.receptacle_xy[0], RECEPTACLE_CLEARANCE), (ep.object_xy[0], OBJECT_CLEARANCE)]
    home = [(GRIPPER_HOME, GRIPPER_CLEARANCE)]

    if split == "unseen_table":
        ep.table = int(rng.choice(UNSEEN_TABLES))
    elif split == "unseen_objects":
        ep.objects = [str(rng.choice(UNSEEN_OBJECTS))]
    elif split == "unseen_receptacles":
        ep.receptacles = [str(rng.choice(UNSEEN_RECEPTACLES))]
    elif split == "unseen_instructions":
        ep.template = str(rng.choice(UNSEEN_TEMPLATES))
    elif split == "multi_object_seen":
        ep.objects.append(str(rng.choice([n for n in TRAIN_OBJECTS if n != ep.objects[0]])))
        ep.object_xy.append(grid_xy(rng, OBJECT_CLEARANCE, placed))
    elif split == "multi_object_unseen":
        ep.objects = [str(n) for n in rng.choice(UNSEEN_OBJECTS, size=2, replace=False)]
        ep.object_xy.append(grid_xy(rng, OBJECT_CLEARANCE, placed))
    elif split == "distractor_receptacle":
        ep.receptacles.append(str(rng.choice(UNSEEN_RECEPTACLES)))
        ep.receptacle_xy.append(grid_xy(rng, RECEPTACLE_CLEARANCE, placed))
    elif split == "multi_receptacle":
        ep.receptacles = [str(n) for n in rng.choice(UNSEEN_RECEPTACLES, size=2, replace=False)]
        ep.receptacle_xy.append(grid_xy(rng, RECEPTACLE_CLEARANCE, placed))
    elif split == "unseen_position":
        ep.object_xy[0] = outside_xy(rng, placed[:1] + home)
    elif split == "unseen_robot_pose":
        away = [(GRIPPER_HOME, ROBOT_POSE_MIN_DISTANCE)]
        objects = [(xy, OBJECT_CLEARANCE + GRIPPER_CLEARANCE) for xy in ep.object_xy]
        ep.gripper_xy = uniform_xy(rng, (0.1, 0.1), (0.9, 0.9),
                                   lambda xy: is_clear(xy, 0.0, away + objects))
    elif split == "reposition":
        keep_clear = [(xy, RECEPTACLE_CLEARANCE + OBJECT_CLEARANCE) for xy in ep.receptacle_xy]
        keep_clear.append((ep.object_xy[0], REPOSITION_MIN_DISTANCE))
        ep.reposition_xy = uniform_xy(rng, (GRID_X[0], GRID_Y[0]), (GRID_X[-1], GRID_Y[-1]),
                                      lambda xy: is_clear(xy, 0.0, keep_clear))
    return ep


# --------------------------------------------------------------------------------------------
# 4. Sprites: shape masks and tables, precomputed per image size
# --------------------------------------------------------------------------------------------


def sprite(inside: Mask, pixels: int) -> np.ndarray:
    """A bool [pixels, pixels] mask sampled at pixel centres of the square [-1, 1]^2."""
    c = (np.arange(pixels) + 0.5) / pixels * 2 - 1
    v, u = np.meshgrid(c, c, indexing="ij")  # v: rows (y), u: columns (x)
    return np.asarray(inside(u, v), dtype=bool)


def gripper_sprite(pixels: int, closed: bool) -> np.ndarray:
    """A U seen from above: two fingers joined by a palm on the robot's side (bottom)."""
    inner, outer = (0.25, 0.6) if closed else (0.6, 1.0)
    return sprite(lambda u, v: (abs(u) <= outer) & ((abs(u) >= inner) | (v >= 0.6)), pixels)


def receptacle_sprites(kind: str, pixels: int) -> tuple[np.ndarray, np.ndarray]:
    """(fill, rim) masks of a receptacle kind."""
    radius = {"disc": lambda u, v: np.hypot(u, v),  # 1.0 on the outline
              "square": lambda u, v: np.maximum(abs(u), abs(v))}[kind]
    return (sprite(lambda u, v: radius(u, v) <= 1.0, pixels),
            sprite(lambda u, v: (radius(u, v) <= 1.0) & (radius(u, v) > 0.8), pixels))


@cache
def table_image(index: int, size: int) -> np.ndarray:
    """Table `index` at `size` px (nearest-neighbour), muted toward grey: uint8 [size, size, 3]."""
    texture = make_table_texture(index)[..., :3].astype(np.float32)
    pick = ((np.arange(size) + 0.5) * texture.shape[0] / size).astype(int)
    muted = TABLE_GREY + TABLE_CONTRAST * (texture[pick][:, pick] - TABLE_GREY)
    return np.clip(muted + 0.5, 0, 255).astype(np.uint8)


def stamp(canvas: np.ndarray, labels: np.ndarray, masks: np.ndarray, colours: np.ndarray,
          xy: np.ndarray, active: np.ndarray, label: int, pad: int) -> None:
    """Paint masks [N, S, S] centred at xy [N, 2] in colours [N, 3] where active [N], in place,
    on a padded canvas [N, H + 2 pad, W + 2 pad, 3] and its label map. Vectorised over envs."""
    n = np.nonzero(active)[0]
    if n.size == 0:
        return
    pixels, size = masks.shape[-1], canvas.shape[1] - 2 * pad
    top_left = np.round(xy[n] * size - pixels / 2).astype(int) + pad  # [n, 2] as (col, row)
    rows = top_left[:, 1, None, None] + np.arange(pixels)[None, :, None]
    cols = top_left[:, 0, None, None] + np.arange(pixels)[None, None, :]
    where = (n[:, None, None], rows, cols)
    mask = masks[n]
    canvas[where] = np.where(mask[..., None], colours[n, None, None], canvas[where])
    labels[where] = np.where(mask, label, labels[where])


# --------------------------------------------------------------------------------------------
# 5. The vectorised environment
# --------------------------------------------------------------------------------------------

INSTRUCTION_CHARSET = string.ascii_letters + string.digits + " -'"


class TwinVecEnv(gymnasium.vector.VectorEnv):
    """num_envs twin episodes stepped together; no auto-reset (see envs.py for the interface)."""

    metadata = {"autoreset_mode": gymnasium.vector.AutoresetMode.DISABLED, "render_modes": []}

    def __init__(self, split: str, num_envs: int, image_size: int = 64, seed: int = 0,
                 max_episode_steps: int | None = None):
        check_split(split, "twin")
        self.split, self.num_envs, self.image_size = split, num_envs, image_size
        self.max_episode_steps = TWIN_HORIZON if max_episode_steps is None else max_episode_steps
        self.single_action_space = spaces.Box(-1.0, 1.0, (7,), np.float32)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self.single_observation_space = spaces.Dict(
            image=spaces.Box(0, 255, (image_size, image_size, 3), np.uint8),
            instruction=spaces.Text(128, charset=INSTRUCTION_CHARSET),
        )
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self._np_random, self._np_random_seed = np.random.default_rng(seed), seed

        def px(size: float) -> int:  # a workspace length in pixels
            return max(2, round(size * image_size))

        self.object_sprites = np.stack([sprite(SHAPES[s], px(OBJECT_SIZE)) for s in SHAPES])
        self.gripper_sprites = np.stack([gripper_sprite(px(GRIPPER_SIZE), c) for c in (0, 1)])
        self.receptacle_sprites = {k: receptacle_sprites(k, px(RECEPTACLE_SIZE))
                                   for k in ("disc", "square")}
        self.pad = px(RECEPTACLE_SIZE) // 2 + px(GRIPPER_SIZE)  # every sprite stays inside
        self.t: int | None = None  # None: no episode running (before reset, after set_split)

    # --- gymnasium API ---

    def reset(self, *, seed: int | None = None,
              options: dict[str, Any] | None = None) -> tuple[dict, dict]:
        if seed is not None:
            self._np_random, self._np_random_seed = np.random.default_rng(seed), seed
        ids = (options or {}).get("episode_ids")
        if ids is None:
            ids = self.np_random.integers(0, MAX_EPISODE_ID, size=self.num_envs)
        ids = np.asarray(ids, dtype=np.int64)
        if ids.shape != (self.num_envs,):
            raise ValueError(f"episode_ids must have shape ({self.num_envs},), got {ids.shape}")
        self.episode_ids = ids
        self.episodes = [decode_episode(self.split, i) for i in ids]
        self.instructions = tuple(ep.instruction for ep in self.episodes)
        self._load_state()
        self.background, self.background_labels = self._render_background()
        self.rewards = [PotentialReward() for _ in ids]
        self.t = 0
        return self._observation(), {"episode_id": ids.copy()}

    def step(self, actions: np.ndarray) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray, dict]:
        actions = np.asarray(actions, dtype=np.float32)
        if actions.shape != (self.num_envs, 7):
            raise ValueError(f"actions must have shape ({self.num_envs}, 7), got {actions.shape}")
        if self.t is None or self.t >= self.max_episode_steps:
            raise RuntimeError("episodes are over (or never started): call reset() first")
        self._reposition()
        self._move(np.clip(actions, -1.0, 1.0))
        self.t += 1
        grasped, success = self.held == 0, self.success()
        reward = np.array([r.update(bool(g), bool(s))
                           for r, g, s in zip(self.rewards, grasped, success, strict=True)],
                          dtype=np.float32)
        info = {
            "success": success,
            "success_once": np.array([r.success_once for r in self.rewards]),
            "grasped": grasped,
            "episode_id": self.episode_ids.copy(),
        }
        terminated = np.zeros(self.num_envs, dtype=bool)
        truncated = np.full(self.num_envs, self.t >= self.max_episode_steps)
        return self._observation(), reward, terminated, truncated, info

    @property
    def step_size(self) -> float:
        """The gripper's displacement per unit of action: pretraining's, or the study domain's."""
        return STEP if self.split in TWIN_ONLY_SPLITS else STUDY_STEP

    @property
    def gripper_colour(self) -> tuple[int, int, int]:
        return GRIPPER_COLOUR if self.split in TWIN_ONLY_SPLITS else STUDY_GRIPPER_COLOUR

    def set_split(self, split: str) -> None:
        """Same envs, new split: the next reset decodes its episodes."""
        check_split(split, "twin")
        self.split, self.t = split, None

    def close_extras(self, **kwargs: Any) -> None:
        pass  # nothing outside this process

    # --- state and dynamics ---

    def _load_state(self) -> None:
        """Episode configurations -> state arrays (slot 0 = the target object / receptacle)."""
        n, k = self.num_envs, MAX_OBJECTS
        self.gripper_xy = np.array([ep.gripper_xy for ep in self.episodes])  # [N, 2]
        self.gripper_closed = np.zeros(n, dtype=bool)
        self.held = np.full(n, -1)  # object slot in the gripper, -1: none
        self.object_xy = np.zeros((n, k, 2))
        self.object_present = np.zeros((n, k), dtype=bool)
        self.object_shape = np.zeros((n, k), dtype=int)  # index into SHAPES
        self.object_colour = np.zeros((n, k, 3), dtype=np.uint8)
        shape_index = {s: i for i, s in enumerate(SHAPES)}
        for i, ep in enumerate(self.episodes):
            for j, (name, xy) in enumerate(zip(ep.objects, ep.object_xy, strict=True)):
                colour, shape = name.split()
                self.object_xy[i, j], self.object_present[i, j] = xy, True
                self.object_shape[i, j], self.object_colour[i, j] = shape_index[shape], COLOURS[colour]
        self.receptacle_xy = np.array([ep.receptacle_xy[0] for ep in self.episodes])  # target's
        self.receptacle_is_disc = np.array([RECEPTACLES[ep.receptacles[0]].kind == "disc"
                                            for ep in self.episodes])
        # the step before whose action the target jumps (-1: never), and where to
        self.reposition_step = np.array([-1 if ep.reposition_xy is None else ep.reposition_step
                                         for ep in self.episodes])
        self.reposition_xy = np.array([ep.reposition_xy or (0.0, 0.0) for ep in self.episodes])  # [N, 2]

    def _reposition(self) -> None:
        """The reposition event, right before the action of its step: the target jumps; a held
        target leaves the (closed) gripper."""
        jump = np.flatnonzero(self.reposition_step == self.t)
        self.object_xy[jump, 0] = self.reposition_xy[jump]
        self.held[jump[self.held[jump] == 0]] = -1

    def _move(self, actions: np.ndarray) -> None:
        """Move, carry, then apply the gripper command at the new position."""
        # Moves in hundredths of a step: the action tokenizer's bin centres (+-0.996 for a whole
        # step) would otherwise drift a policy 0.2 px a step off the positions every expert
        # demonstration visits, and the tiny VLA, which never saw a frame 1 px off, stalled there
        # (docs/PRETRAINING.md: 19 of 19 stalled one-object failures; the warm-up on `ind` 77% -> 95%).
        moves = np.round(actions[:, :2].astype(np.float64), MOVE_DECIMALS)
        self.gripper_xy = np.clip(self.gripper_xy + self.step_size * moves, 0, 1)
        carrying = np.nonzero(self.held >= 0)[0]
        self.object_xy[carrying, self.held[carrying]] = self.gripper_xy[carrying]
        close = actions[:, 6] < 0
        self.held[~close] = -1  # opening (or staying open) drops what is held
        distance = np.linalg.norm(self.object_xy - self.gripper_xy[:, None], axis=-1)  # [N, K]
        distance[~self.object_present] = np.inf
        nearest = distance.argmin(axis=1)
        reachable = distance[np.arange(self.num_envs), nearest] <= GRASP_RADIUS
        grasp = np.nonzero(close & ~self.gripper_closed & reachable)[0]  # only when closing
        self.held[grasp] = nearest[grasp]
        self.object_xy[grasp, nearest[grasp]] = self.gripper_xy[grasp]  # snaps into the fingers
        self.gripper_closed = close

    def success(self) -> np.ndarray:
        """bool [N]: the target rests (not held) inside the target receptacle's footprint."""
        offset = np.abs(self.object_xy[:, 0] - self.receptacle_xy)
        inside = np.where(self.receptacle_is_disc, np.hypot(*offset.T), offset.max(axis=1))
        return (inside <= RECEPTACLE_SIZE / 2) & (self.held != 0)

    # --- the scripted expert ---

    def expert_action(self) -> np.ndarray:
        """float32 [N, 7], planned from the live state every step (so it recovers from the
        reposition event): go to the target with the gripper open (whole steps, each axis on
        its own), close once there (a step of its own, as a real grasp is), carry it closed to
        the receptacle's centre, open once there, then wait with the gripper open. A closed
        empty gripper opens first."""
        holding, done = self.held == 0, self.success()
        goal = np.where(holding[:, None], self.receptacle_xy, self.object_xy[:, 0])
        goal = np.where(done[:, None], self.gripper_xy, goal)
        delta = (goal - self.gripper_xy) / self.step_size  # in steps
        # Whole steps, each axis on its own: every action component is -1, 0 or +1, and the
        # goal counts as reached within half a step (GRASP_RADIUS covers the diagonal). A
        # cloned policy then classifies directions instead of regressing fractions of a step.
        there = np.abs(delta).max(axis=1) <= 0.5
        delta = np.where(there[:, None], 0.0, np.clip(np.rint(delta), -1.0, 1.0))
        grip = np.where(holding, np.where(there, 1.0, -1.0),
                        np.where(there & ~self.gripper_closed, -1.0, 1.0))
        grip[done] = 1.0
        actions = np.zeros((self.num_envs, 7), dtype=np.float32)
        actions[:, :2], actions[:, 6] = delta, grip
        return actions

    # --- rendering ---

    def _render_background(self) -> tuple[np.ndarray, np.ndarray]:
        """Table + receptacles, padded: uint8 [N, H + 2 pad, W + 2 pad, 3] and int8 labels."""
        size, pad = self.image_size, self.pad
        canvas = np.zeros((self.num_envs, size + 2 * pad, size + 2 * pad, 3), dtype=np.uint8)
        labels = np.zeros(canvas.shape[:3], dtype=np.int8)
        one = np.ones(1, dtype=bool)
        for i, ep in enumerate(self.episodes):
            canvas[i, pad:pad + size, pad:pad + size] = table_image(ep.table, size)
            for name, xy in zip(ep.receptacles, ep.receptacle_xy, strict=True):
                look = RECEPTACLES[name]
                for mask, colour in zip(self.receptacle_sprites[look.kind], (look.fill, look.rim),
                                        strict=True):
                    stamp(canvas[i:i + 1], labels[i:i + 1], mask[None], np.array([colour], np.uint8),
                          np.array([xy]), one, LABEL_RECEPTACLE, pad)
        return canvas, labels

    def render_frame(self) -> tuple[np.ndarray, np.ndarray]:
        """The current frame before perturbations: uint8 [N, H, W, 3] and labels int8 [N, H, W]."""
        canvas, labels, pad = self.background.copy(), self.background_labels.copy(), self.pad
        # Resting objects first, then the held one, then the gripper on top.
        for holding in (False, True):
            for slot in range(MAX_OBJECTS):
                active = self.object_present[:, slot] & ((self.held == slot) == holding)
                masks = self.object_sprites[self.object_shape[:, slot]]
                stamp(canvas, labels, masks, self.object_colour[:, slot],
                      self.object_xy[:, slot], active, LABEL_OBJECT, pad)
        colours = np.broadcast_to(np.array(self.gripper_colour, np.uint8), (self.num_envs, 3))
        stamp(canvas, labels, self.gripper_sprites[self.gripper_closed.astype(int)], colours,
              self.gripper_xy, np.ones(self.num_envs, dtype=bool), LABEL_GRIPPER, pad)
        crop = (slice(None), slice(pad, pad + self.image_size), slice(pad, pad + self.image_size))
        return canvas[crop], labels[crop]

    def _observation(self) -> dict:
        image, self.segmentation = self.render_frame()
        size = self.image_size
        if self.split in TEXTURE_ALPHA:  # a new pattern over the robot and object pixels
            patterns = np.stack([random_pattern(frame_rng(self.split, i, self.t), size, size)
                                 for i in self.episode_ids])
            image = blend(image, patterns, TEXTURE_ALPHA[self.split],
                          self.segmentation >= LABEL_OBJECT)
        elif self.split in NOISE_ALPHA:  # new noise over the whole image
            noise = np.stack([random_noise(frame_rng(self.split, i, self.t), size, size)
                              for i in self.episode_ids])
            image = blend(image, noise, NOISE_ALPHA[self.split])
        elif self.split == "pretrain":  # the pretraining's own overlays, per episode
            for i, ep in enumerate(self.episodes):
                if ep.overlay is not None:
                    rng = frame_rng(self.split, ep.episode_id, self.t)
                    make, mask = ((pretrain_pattern, self.segmentation[i] >= LABEL_OBJECT)
                                  if ep.overlay == "texture" else (pretrain_noise, None))
                    image[i] = blend(image[i], make(rng, size, size), ep.overlay_alpha, mask)
        return {"image": np.ascontiguousarray(image), "instruction": self.instructions}


# Registered with gymnasium, as ManiSkill registers "PutOn-v1" (the demos' env_info.env_id):
# gymnasium.make_vec("PutOnTwin-v1", num_envs=8, vectorization_mode="vector_entry_point", split="ind")
if "PutOnTwin-v1" not in gymnasium.registry:
    gymnasium.register("PutOnTwin-v1", vector_entry_point=TwinVecEnv, max_episode_steps=TWIN_HORIZON)
