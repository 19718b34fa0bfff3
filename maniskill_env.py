"""The real benchmark: "put {object} on {receptacle}" with a Panda arm in ManiSkill3.

The task family of arXiv 2505.19789 (splits, reward and perturbations are shared with the 2D
twin in envs.py). Read top to bottom:
  1. constants (control, layout, camera) and the catalogue of objects, receptacles, tables
  2. `decode_episode`: integer episode id -> one fixed configuration, for every split
  3. `PutOnScene`: the ManiSkill scene (all actors built once, placed per episode), registered
     with ManiSkill as "PutOn-v1"
  4. `ScriptedExpert`: a state-based planner that emits actions in the 7-D action space
  5. `PutOnTask`: one env = scene + reward + perturbations + expert
  6. `VecEnv`: gymnasium's vector-env interface over PutOnTasks, in subprocess workers

Action: 7-D [dx, dy, dz, droll, dpitch, dyaw, gripper] in [-1, 1], ManiSkill's normalised
`pd_ee_delta_pose` space (1.0 = 10 cm / 0.1 rad; gripper +1 open, -1 close). Note that
ManiSkill 3.0.1 scales rotations by its lower bound (-0.1), so +1 on a rotation dimension turns
the gripper by -0.1 rad; the policy only has to be consistent with the expert, which knows this.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import string
import tempfile
import traceback
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from scipy.spatial.transform import Rotation

# Rendering on a CPU-only machine goes through Mesa's lavapipe Vulkan driver. This must be set
# before sapien is imported, and only when no NVIDIA driver is there that it would hide: where
# torch sees a GPU the envs render on it (render_backend below), through NVIDIA's Vulkan driver,
# wherever its ICD file lives (scripts/vulkan_icd.sh makes the same choice for the Makefile).
LAVAPIPE_ICD = "/usr/share/vulkan/icd.d/lvp_icd.json"
NVIDIA_ICDS = (
    "/usr/share/vulkan/icd.d/nvidia_icd.json",
    "/etc/vulkan/icd.d/nvidia_icd.json",
    "/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json",
)
if (os.path.exists(LAVAPIPE_ICD) and not any(os.path.exists(p) for p in NVIDIA_ICDS)
        and not torch.cuda.is_available()):
    os.environ.setdefault("VK_ICD_FILENAMES", LAVAPIPE_ICD)

import sapien  # noqa: E402  (after VK_ICD_FILENAMES)
from mani_skill.envs.sapien_env import BaseEnv  # noqa: E402
from mani_skill.sensors.camera import CameraConfig  # noqa: E402
from mani_skill.utils import sapien_utils  # noqa: E402
from mani_skill.utils.building.ground import build_ground  # noqa: E402
from mani_skill.utils.registration import register_env  # noqa: E402
from mani_skill.utils.structs import Pose  # noqa: E402

from tasks import (  # noqa: E402
    MAX_EPISODE_ID,
    NOISE_ALPHA,
    TEXTURE_ALPHA,
    TRAIN_TEMPLATE,
    UNSEEN_TEMPLATES,
    PotentialReward,
    RenderingUnavailable,
    blend,
    check_split,
    frame_rng,
    make_table_texture,
    random_noise,
    random_pattern,
)

# --------------------------------------------------------------------------------------------
# 1. Constants and catalogue
# --------------------------------------------------------------------------------------------

MAX_EPISODE_STEPS = 80
POS_STEP = 0.1  # metres per unit of action (ManiSkill Panda pd_ee_delta_pose bounds)
ROT_STEP = 0.1  # radians per unit of action
REPOSITION_STEP = 5  # the `reposition` split moves the target right before this step's action
REPOSITION_MIN_DISTANCE = 0.15

ROBOT_BASE = (-0.615, 0.0, 0.0)
# Arm raised and pulled back (TCP near (-0.2, 0, 0.32), pointing down) so the camera sees the
# whole workspace in the first frame; ManiSkill's usual rest pose hides objects under the hand.
REST_QPOS = (0.0, -0.3, 0.0, -2.45, 0.0, 2.15, np.pi / 4, 0.04, 0.04)
TABLE_HALF_SIZE = (0.8, 0.9, 0.45)  # top surface at z = 0
TABLE_CENTER_X = -0.1

# Training placements: a 5 x 7 grid with 7 cm spacing in front of the robot.
GRID_SPACING = 0.07
GRID_X = tuple(-0.1 + GRID_SPACING * i for i in range(-2, 3))
GRID_Y = tuple(GRID_SPACING * i for i in range(-3, 4))
OUTSIDE_MARGIN = 0.03  # `unseen_position` puts the target this far outside the grid
TRAIN_YAWS = (0.0, np.pi / 4, np.pi / 2, 3 * np.pi / 4)
UNSEEN_YAWS = tuple(y + np.pi / 8 for y in TRAIN_YAWS)
# Clearance radii (upper bounds of every footprint), so that any object can replace any other
# without overlapping: two things are placed at least r_a + r_b apart, which with these radii
# keeps every object at least two grid cells (14 cm) from a receptacle's centre.
OBJECT_RADIUS = 0.05
RECEPTACLE_RADIUS = 0.10

CAMERA_EYE = (0.2, 0.45, 0.7)  # in front of the robot, to its left, looking down at ~40 degrees
CAMERA_TARGET = (-0.17, -0.02, 0.08)
CAMERA_FOV = np.deg2rad(55)
ROLLING_DAMPING = 3.0  # angular damping of the objects (1/s)
PARKING_X = 3.0  # unused actors wait on the floor, out of the camera's view
GROUND_Z = -2 * TABLE_HALF_SIZE[2]

RENDER_HELP = (
    "Rendering could not start: SAPIEN needs a Vulkan driver.\n"
    "On a CPU-only Debian bookworm machine install Mesa's lavapipe >= 25 from backports:\n"
    "  apt-get install -t bookworm-backports mesa-vulkan-drivers\n"
    "and point the Vulkan loader at it (envs.py does this when the file exists):\n"
    f"  export VK_ICD_FILENAMES={LAVAPIPE_ICD}\n"
    "On a GPU machine install the NVIDIA driver's Vulkan ICD instead."
)


@dataclass
class Part:
    """One primitive of an actor, in the actor's frame (origin at the bottom centre)."""

    kind: str  # "box" | "sphere" | "capsule" | "cylinder" | "hull"
    size: tuple[float, ...] = ()  # box: half sizes; sphere: (r,); capsule, cylinder: (r, half length)
    pos: tuple[float, float, float] = (0.0, 0.0, 0.0)
    yaw: float = 0.0  # rotation about z (capsules and cylinders lie along their local x)
    upright: bool = False  # stand a capsule/cylinder along z
    points: np.ndarray | None = None  # hull: the convex hull of these points


@dataclass
class ObjectSpec:
    name: str  # used in instructions, e.g. "red cube"
    color: tuple[float, float, float]
    parts: list[Part]
    grasp_height: float  # height above the table at which the fingers close
    grasp_period: float  # yaw symmetry of the grasp in radians; 0 = any yaw works
    grasp_yaw: float = 0.0  # gripper yaw relative to the object's yaw (fingers close along y)

    @property
    def height(self) -> float:
        return max(part_top(p) for p in self.parts)


@dataclass
class ReceptacleSpec:
    name: str
    color: tuple[float, float, float]
    parts: list[Part]
    surface: float  # height of the surface objects rest on
    footprint: tuple[float, ...]  # (radius,) for a disc, (half x, half y) for a rectangle

    def contains_xy(self, dx: float, dy: float) -> bool:
        """Is an offset (dx, dy) from the receptacle's centre inside its footprint?"""
        if len(self.footprint) == 1:
            return bool(np.hypot(dx, dy) <= self.footprint[0])
        return bool(abs(dx) <= self.footprint[0] and abs(dy) <= self.footprint[1])


def part_top(part: Part) -> float:
    """Height of a part's highest point in the actor frame."""
    if part.kind == "hull":
        return float(part.points[:, 2].max())
    if part.kind == "box":
        return part.pos[2] + part.size[2]
    if part.upright:  # capsule or cylinder standing on its axis
        return part.pos[2] + part.size[1] + (part.size[0] if part.kind == "capsule" else 0.0)
    return part.pos[2] + part.size[0]


def box(hx: float, hy: float, hz: float, x: float = 0.0, y: float = 0.0, z: float = 0.0) -> Part:
    """A box resting on z (default: the ground of the actor frame)."""
    return Part("box", (hx, hy, hz), (x, y, z + hz))


def ball(r: float) -> Part:
    return Part("sphere", (r,), (0.0, 0.0, r))


def lying_capsule(r: float, half_length: float) -> Part:
    return Part("capsule", (r, half_length), (0.0, 0.0, r))


def upright_cylinder(r: float, half_height: float, z: float = 0.0) -> Part:
    return Part("cylinder", (r, half_height), (0.0, 0.0, z + half_height), upright=True)


def hull(points: np.ndarray) -> Part:
    return Part("hull", points=np.asarray(points, dtype=np.float32))


def ring_points(radius: float, z: float, n: int, phase: float = 0.0) -> np.ndarray:
    angles = phase + 2 * np.pi * np.arange(n) / n
    return np.stack([radius * np.cos(angles), radius * np.sin(angles), np.full(n, z)], axis=1)


def wall_ring(radius: float, height: float, n: int = 12, thickness: float = 0.004) -> list[Part]:
    """Low walls around a disc, approximated by n thin boxes (bowls and pans)."""
    half_width = radius * np.tan(np.pi / n) + thickness
    return [
        Part(
            "box",
            (thickness / 2, half_width, height / 2),
            (radius * np.cos(a), radius * np.sin(a), height / 2),
            yaw=a,
        )
        for a in 2 * np.pi * np.arange(n) / n
    ]


def rim(hx: float, hy: float, height: float, thickness: float = 0.004) -> list[Part]:
    """Four walls around a rectangle (trays, dishes)."""
    t = thickness / 2
    return [
        box(t, hy, height / 2, x=hx),
        box(t, hy, height / 2, x=-hx),
        box(hx, t, height / 2, y=hy),
        box(hx, t, height / 2, y=-hy),
    ]


QUARTER, HALF = np.pi / 2, np.pi  # grasp symmetries: cubes, and bars / capsules / blocks

# ObjectSpec(name, colour, parts, grasp height, grasp period)
TRAIN_OBJECTS = [
    ObjectSpec("red cube", (0.85, 0.1, 0.1), [box(0.02, 0.02, 0.02)], 0.02, QUARTER),
    ObjectSpec("blue cube", (0.1, 0.25, 0.85), [box(0.018, 0.018, 0.018)], 0.018, QUARTER),
    ObjectSpec("green block", (0.15, 0.65, 0.2), [box(0.03, 0.016, 0.018)], 0.018, HALF),
    ObjectSpec("orange block", (0.95, 0.5, 0.1), [box(0.028, 0.018, 0.015)], 0.015, HALF),
    ObjectSpec("yellow capsule", (0.95, 0.85, 0.15), [lying_capsule(0.016, 0.024)], 0.016, HALF),
    ObjectSpec("pink capsule", (0.95, 0.5, 0.7), [lying_capsule(0.014, 0.02)], 0.014, HALF),
    ObjectSpec("purple ball", (0.5, 0.2, 0.7), [ball(0.02)], 0.02, 0.0),
    ObjectSpec("white ball", (0.92, 0.92, 0.9), [ball(0.022)], 0.022, 0.0),
    ObjectSpec("cyan cylinder", (0.1, 0.8, 0.85), [upright_cylinder(0.018, 0.025)], 0.025, 0.0),
    ObjectSpec("brown can", (0.5, 0.3, 0.12), [upright_cylinder(0.021, 0.03)], 0.03, 0.0),
    ObjectSpec("black cube", (0.08, 0.08, 0.08), [box(0.021, 0.021, 0.021)], 0.021, QUARTER),
    ObjectSpec("teal ball", (0.0, 0.5, 0.5), [ball(0.018)], 0.018, 0.0),
    ObjectSpec("gray bar", (0.5, 0.5, 0.5), [box(0.04, 0.012, 0.012)], 0.012, HALF),
    ObjectSpec("magenta cylinder", (0.8, 0.1, 0.6), [upright_cylinder(0.016, 0.02)], 0.02, 0.0),
    ObjectSpec("lime capsule", (0.6, 0.9, 0.2), [lying_capsule(0.015, 0.03)], 0.015, HALF),
    ObjectSpec("navy block", (0.1, 0.1, 0.4), [box(0.025, 0.02, 0.02)], 0.02, HALF),
]

SQUARE_BASE = np.array([[x, y, 0.0] for x in (-0.024, 0.024) for y in (-0.024, 0.024)])
WEDGE_SECTION = np.array([[0.0, -0.02, 0.0], [0.0, 0.02, 0.0], [0.0, 0.0, 0.03]])
BARREL_RINGS = ((0.017, 0.0), (0.022, 0.02), (0.017, 0.04))  # (radius, height)
UNSEEN_OBJECTS = [
    ObjectSpec(
        "orange pyramid", (0.95, 0.45, 0.05),
        [hull(np.vstack([SQUARE_BASE, [[0, 0, 0.04]]]))], 0.012, QUARTER,
    ),
    ObjectSpec(
        "green cone", (0.1, 0.6, 0.15),
        # Blunt tip: a sharp cone's steep sides slip out of the fingers while carrying.
        [hull(np.vstack([ring_points(0.022, 0.0, 24), ring_points(0.007, 0.045, 12)]))], 0.012, 0.0,
    ),
    ObjectSpec(
        "purple hexagonal prism", (0.55, 0.15, 0.8),
        [hull(np.vstack([ring_points(0.022, 0.0, 6), ring_points(0.022, 0.04, 6)]))],
        0.02, np.pi / 3,
    ),
    ObjectSpec(
        "blue wedge", (0.15, 0.3, 0.95),
        [hull(np.vstack([WEDGE_SECTION + [x, 0, 0] for x in (-0.025, 0.025)]))], 0.01, HALF,
    ),
    ObjectSpec(
        "red dumbbell", (0.8, 0.05, 0.1),
        [
            Part("capsule", (0.008, 0.03), (0.0, 0.0, 0.015)),
            Part("sphere", (0.015,), (0.034, 0.0, 0.015)),
            Part("sphere", (0.015,), (-0.034, 0.0, 0.015)),
        ],
        0.015, HALF,
    ),
    ObjectSpec(
        "yellow L-block", (0.95, 0.8, 0.1),
        [box(0.03, 0.01, 0.015), box(0.01, 0.012, 0.015, x=0.02, y=0.022)], 0.015, HALF,
    ),
    ObjectSpec(
        "white mushroom", (0.95, 0.93, 0.85),
        [upright_cylinder(0.011, 0.014), upright_cylinder(0.024, 0.007, z=0.028)], 0.035, 0.0,
    ),
    ObjectSpec(
        "brown barrel", (0.45, 0.25, 0.1),
        [hull(np.vstack([ring_points(r, z, 16) for r, z in BARREL_RINGS]))], 0.02, 0.0,
    ),
    ObjectSpec(
        "lime cross", (0.55, 0.85, 0.1),
        [box(0.025, 0.008, 0.012), box(0.008, 0.025, 0.012)], 0.012, QUARTER,
    ),
]

# ReceptacleSpec(name, colour, parts, surface height, footprint)
PLATE = ReceptacleSpec("plate", (0.95, 0.95, 0.93), [upright_cylinder(0.075, 0.006)], 0.012, (0.075,))
UNSEEN_RECEPTACLES = [
    ReceptacleSpec("wooden cutting board", (0.65, 0.45, 0.25), [box(0.08, 0.06, 0.008)], 0.016,
                   (0.08, 0.06)),
    ReceptacleSpec("green placemat", (0.2, 0.6, 0.3), [box(0.08, 0.06, 0.002)], 0.004, (0.08, 0.06)),
    ReceptacleSpec("blue tray", (0.2, 0.35, 0.8), [box(0.075, 0.06, 0.004), *rim(0.075, 0.06, 0.02)],
                   0.008, (0.07, 0.055)),
    ReceptacleSpec("red bowl", (0.8, 0.15, 0.15),
                   [upright_cylinder(0.065, 0.004), *wall_ring(0.065, 0.022)], 0.008, (0.06,)),
    ReceptacleSpec("yellow saucer", (0.95, 0.85, 0.3), [upright_cylinder(0.06, 0.005)], 0.01, (0.06,)),
    ReceptacleSpec("black pan", (0.12, 0.12, 0.12),
                   [upright_cylinder(0.07, 0.004), *wall_ring(0.07, 0.015)], 0.008, (0.065,)),
    ReceptacleSpec("pink square dish", (0.95, 0.6, 0.75),
                   [box(0.065, 0.065, 0.005), *rim(0.065, 0.065, 0.012)], 0.01, (0.06, 0.06)),
    ReceptacleSpec("orange frisbee", (0.95, 0.5, 0.1), [upright_cylinder(0.07, 0.007)], 0.014, (0.07,)),
]

OBJECTS = {spec.name: spec for spec in TRAIN_OBJECTS + UNSEEN_OBJECTS}
RECEPTACLES = {spec.name: spec for spec in [PLATE, *UNSEEN_RECEPTACLES]}
TRAIN_OBJECT_NAMES = tuple(spec.name for spec in TRAIN_OBJECTS)
UNSEEN_OBJECT_NAMES = tuple(spec.name for spec in UNSEEN_OBJECTS)
UNSEEN_RECEPTACLE_NAMES = tuple(spec.name for spec in UNSEEN_RECEPTACLES)
TRAIN_TABLES = tuple(range(16))  # table appearances are integers, see make_table_texture
UNSEEN_TABLES = tuple(range(16, 21))

def split_object_names(split: str) -> tuple[str, ...]:
    """The objects a split can put on the table (every one is built into its scene)."""
    if split in ("unseen_objects", "multi_object_unseen"):
        return UNSEEN_OBJECT_NAMES
    return TRAIN_OBJECT_NAMES


def split_receptacle_names(split: str) -> tuple[str, ...]:
    if split in ("unseen_receptacles", "multi_receptacle"):
        return UNSEEN_RECEPTACLE_NAMES
    if split == "distractor_receptacle":
        return (PLATE.name, *UNSEEN_RECEPTACLE_NAMES)
    return (PLATE.name,)


def split_tables(split: str) -> tuple[int, ...]:
    return UNSEEN_TABLES if split == "unseen_table" else TRAIN_TABLES


# --------------------------------------------------------------------------------------------
# 2. Episode ids -> configurations
# --------------------------------------------------------------------------------------------


@dataclass
class Episode:
    """Everything that fixes an episode's initial state (and the reposition event)."""

    split: str
    episode_id: int
    table: int
    objects: list[str]  # objects[0] is the target
    object_xy: list[tuple[float, float]]
    object_yaw: list[float]
    receptacles: list[str]  # receptacles[0] is the target
    receptacle_xy: list[tuple[float, float]]
    template: str
    robot_qpos: tuple[float, ...]
    reposition_xy: tuple[float, float] | None = None

    @property
    def instruction(self) -> str:
        return self.template.format(object=self.objects[0], receptacle=self.receptacles[0])


XY = tuple[float, float]
Occupied = Sequence[tuple[XY, float]]  # (position, clearance radius) of what is already placed


def _is_clear(xy: XY, radius: float, occupied: Occupied) -> bool:
    return all(np.hypot(xy[0] - o[0], xy[1] - o[1]) >= radius + r for o, r in occupied)


def _sample_grid_xy(rng: np.random.Generator, radius: float, occupied: Occupied) -> XY:
    """A grid point clear of everything already placed."""
    for _ in range(1000):
        xy = (GRID_X[rng.integers(len(GRID_X))], GRID_Y[rng.integers(len(GRID_Y))])
        if _is_clear(xy, radius, occupied):
            return xy
    raise RuntimeError("could not place an actor on the grid")  # the radii make this unreachable


def _sample_outside_xy(rng: np.random.Generator, radius: float, occupied: Occupied) -> XY:
    """A point OUTSIDE_MARGIN beyond one edge of the training grid (unseen positions)."""
    lo_x, hi_x = GRID_X[0] - OUTSIDE_MARGIN, GRID_X[-1] + OUTSIDE_MARGIN
    lo_y, hi_y = GRID_Y[0] - OUTSIDE_MARGIN, GRID_Y[-1] + OUTSIDE_MARGIN
    for _ in range(1000):
        side = rng.integers(4)
        if side < 2:
            xy = ((lo_x, hi_x)[side], rng.uniform(lo_y, hi_y))
        else:
            xy = (rng.uniform(lo_x, hi_x), (lo_y, hi_y)[side - 2])
        if _is_clear(xy, radius, occupied):
            return float(xy[0]), float(xy[1])
    raise RuntimeError("could not place an actor outside the grid")


def _sample_reposition_xy(rng: np.random.Generator, ep: Episode) -> XY:
    """A new spot inside the training area, far from the target's start and clear of the rest."""
    occupied = [(xy, RECEPTACLE_RADIUS) for xy in ep.receptacle_xy]
    occupied += [(xy, OBJECT_RADIUS) for xy in ep.object_xy[1:]]
    for _ in range(1000):
        xy = (rng.uniform(GRID_X[0], GRID_X[-1]), rng.uniform(GRID_Y[0], GRID_Y[-1]))
        far = _is_clear(xy, REPOSITION_MIN_DISTANCE, [(ep.object_xy[0], 0.0)])
        if far and _is_clear(xy, OBJECT_RADIUS, occupied):
            return float(xy[0]), float(xy[1])
    raise RuntimeError("could not find a reposition target")


def _training_episode(episode_id: int) -> Episode:
    """The in-distribution configuration of an id: every split starts from it."""
    rng = np.random.default_rng([0, episode_id])
    receptacle_xy = _sample_grid_xy(rng, RECEPTACLE_RADIUS, [])
    object_xy = _sample_grid_xy(rng, OBJECT_RADIUS, [(receptacle_xy, RECEPTACLE_RADIUS)])
    return Episode(
        split="ind",
        episode_id=episode_id,
        table=int(rng.choice(TRAIN_TABLES)),
        objects=[str(rng.choice(TRAIN_OBJECT_NAMES))],
        object_xy=[object_xy],
        object_yaw=[float(rng.choice(TRAIN_YAWS))],
        receptacles=[PLATE.name],
        receptacle_xy=[receptacle_xy],
        template=TRAIN_TEMPLATE,
        robot_qpos=REST_QPOS,
    )


def decode_episode(split: str, episode_id: int) -> Episode:
    """Deterministic id -> configuration. A split starts from the in-distribution episode of the
    same id and changes only what it claims to change, so paired comparisons are clean."""
    check_split(split)
    ep = _training_episode(int(episode_id))
    ep.split = split
    # A second stream per split, so that the edits below never shift the shared draws above.
    rng = np.random.default_rng([zlib.crc32(split.encode()), int(episode_id)])
    receptacle = (ep.receptacle_xy[0], RECEPTACLE_RADIUS)
    placed = [receptacle, (ep.object_xy[0], OBJECT_RADIUS)]

    if split == "unseen_table":
        ep.table = int(rng.choice(UNSEEN_TABLES))
    elif split == "unseen_objects":
        ep.objects = [str(rng.choice(UNSEEN_OBJECT_NAMES))]
    elif split == "unseen_receptacles":
        ep.receptacles = [str(rng.choice(UNSEEN_RECEPTACLE_NAMES))]
    elif split == "unseen_instructions":
        ep.template = str(rng.choice(UNSEEN_TEMPLATES))
    elif split in ("multi_object_seen", "multi_object_unseen"):
        names = split_object_names(split)
        ep.objects = [str(n) for n in rng.choice(names, size=2, replace=False)]
        ep.object_xy.append(_sample_grid_xy(rng, OBJECT_RADIUS, placed))
        ep.object_yaw.append(float(rng.choice(TRAIN_YAWS)))
    elif split == "distractor_receptacle":
        ep.receptacles.append(str(rng.choice(UNSEEN_RECEPTACLE_NAMES)))
        ep.receptacle_xy.append(_sample_grid_xy(rng, RECEPTACLE_RADIUS, placed))
    elif split == "multi_receptacle":
        pair = rng.choice(UNSEEN_RECEPTACLE_NAMES, size=2, replace=False)
        ep.receptacles = [str(n) for n in pair]
        ep.receptacle_xy.append(_sample_grid_xy(rng, RECEPTACLE_RADIUS, placed))
    elif split == "unseen_position":
        ep.object_xy[0] = _sample_outside_xy(rng, OBJECT_RADIUS, [receptacle])
        ep.object_yaw[0] = float(rng.choice(UNSEEN_YAWS))
    elif split == "unseen_robot_pose":
        # Perturb every arm joint by 0.1-0.2 rad with a random sign; the fingers stay open.
        offsets = rng.uniform(0.1, 0.2, size=7) * rng.choice([-1.0, 1.0], size=7)
        ep.robot_qpos = tuple(float(q) for q in np.asarray(REST_QPOS[:7]) + offsets) + REST_QPOS[7:]
    elif split == "reposition":
        ep.reposition_xy = _sample_reposition_xy(rng, ep)
    return ep


# --------------------------------------------------------------------------------------------
# 3. The ManiSkill scene
# --------------------------------------------------------------------------------------------

def _numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def yaw_quat(yaw: float) -> list[float]:
    """Quaternion (w, x, y, z) of a rotation about z."""
    return [float(np.cos(yaw / 2)), 0.0, 0.0, float(np.sin(yaw / 2))]


UPRIGHT = sapien.Pose(q=[np.cos(np.pi / 4), 0.0, np.sin(np.pi / 4), 0.0])  # local x -> z


def _hull_file(points: np.ndarray) -> str:
    """Write a convex hull as .obj (SAPIEN cooks convex collisions from files). The name is the
    content's hash, and writes are atomic, so parallel workers can share the directory."""
    import trimesh

    mesh = trimesh.convex.convex_hull(points)
    digest = hashlib.sha1(np.ascontiguousarray(points).tobytes()).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / "putonenv_meshes" / f"{digest}.obj"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(trimesh.exchange.obj.export_obj(mesh, include_normals=False))
        os.replace(tmp, path)
    return str(path)


def _add_part(builder, part: Part, material) -> None:
    pose = sapien.Pose(p=list(part.pos), q=yaw_quat(part.yaw))
    if part.upright:
        pose = pose * UPRIGHT
    if part.kind == "box":
        builder.add_box_collision(pose, part.size)
        builder.add_box_visual(pose, part.size, material=material)
    elif part.kind == "sphere":
        builder.add_sphere_collision(pose, part.size[0])
        builder.add_sphere_visual(pose, part.size[0], material=material)
    elif part.kind == "capsule":
        builder.add_capsule_collision(pose, *part.size)
        builder.add_capsule_visual(pose, *part.size, material=material)
    elif part.kind == "cylinder":
        builder.add_cylinder_collision(pose, *part.size)
        builder.add_cylinder_visual(pose, *part.size, material=material)
    elif part.kind == "hull":
        filename = _hull_file(part.points)
        builder.add_convex_collision_from_file(filename, pose)
        builder.add_visual_from_file(filename, pose, material=material)
    else:
        raise ValueError(f"unknown part kind {part.kind!r}")


def build_actor(scene, spec: ObjectSpec | ReceptacleSpec, parking_xyz: Sequence[float],
                kinematic: bool):
    builder = scene.create_actor_builder()
    material = sapien.render.RenderMaterial(base_color=[*spec.color, 1.0], roughness=0.6)
    for part in spec.parts:
        _add_part(builder, part, material)
    builder.initial_pose = sapien.Pose(p=list(parking_xyz))
    name = spec.name.replace(" ", "_")
    return builder.build_kinematic(name) if kinematic else builder.build(name)


@register_env("PutOn-v1", max_episode_steps=MAX_EPISODE_STEPS, split="ind", image_size=112)
class PutOnScene(BaseEnv):
    """The simulated scene of one split: every object, receptacle and table texture the split can
    use is built once; `reset(options={"episode": Episode})` places them (unused actors are
    parked on the floor outside the view), so resets never rebuild the scene."""

    SUPPORTED_ROBOTS = ["panda"]

    def __init__(self, split: str, image_size: int, **kwargs):
        self.split = split
        self.image_size = image_size
        self.episode: Episode | None = None
        super().__init__(robot_uids="panda", **kwargs)

    @property
    def _default_sensor_configs(self):
        pose = sapien_utils.look_at(eye=list(CAMERA_EYE), target=list(CAMERA_TARGET))
        size = self.image_size
        # The "minimal" shader is SAPIEN's fastest: flat lighting is enough for a policy's 112 px.
        return [CameraConfig("camera", pose, size, size, CAMERA_FOV, near=0.01, far=10,
                             shader_pack="minimal")]

    def _load_agent(self, options: dict):
        super()._load_agent(options, sapien.Pose(p=list(ROBOT_BASE)))

    def _load_scene(self, options: dict):
        # The table is one box; its appearance is a texture swapped per episode.
        builder = self.scene.create_actor_builder()
        below_top = sapien.Pose(p=[0.0, 0.0, -TABLE_HALF_SIZE[2]])
        builder.add_box_collision(below_top, TABLE_HALF_SIZE)
        self.table_material = sapien.render.RenderMaterial(base_color=[1, 1, 1, 1], roughness=0.8)
        builder.add_box_visual(below_top, TABLE_HALF_SIZE, material=self.table_material)
        builder.initial_pose = sapien.Pose(p=[TABLE_CENTER_X, 0.0, 0.0])
        self.table = builder.build_kinematic("table")
        self.ground = build_ground(self.scene, floor_width=20, altitude=GROUND_Z)
        self.table_textures = {
            i: sapien.render.RenderTexture2D(make_table_texture(i), "R8G8B8A8Unorm")
            for i in split_tables(self.split)
        }
        object_names = split_object_names(self.split)
        receptacle_names = split_receptacle_names(self.split)
        self.parking = {
            name: (PARKING_X + 0.2 * i, 0.0, GROUND_Z + 0.01)
            for i, name in enumerate(object_names + receptacle_names)
        }
        self.objects = {
            n: build_actor(self.scene, OBJECTS[n], self.parking[n], kinematic=False)
            for n in object_names
        }
        for actor in self.objects.values():
            # PhysX has no rolling resistance: without damping a released ball or capsule can
            # keep rolling off the receptacle.
            actor.set_angular_damping(ROLLING_DAMPING)
        # Receptacles never move during an episode: kinematic bodies cost no simulation.
        self.receptacles = {
            n: build_actor(self.scene, RECEPTACLES[n], self.parking[n], kinematic=True)
            for n in receptacle_names
        }

    def _initialize_episode(self, env_idx: torch.Tensor, options: dict):
        # BaseEnv.__init__ resets once without an episode: start from the split's episode 0.
        ep = options.get("episode") or decode_episode(self.split, 0)
        self.episode = ep
        self.agent.reset(np.asarray(ep.robot_qpos, dtype=np.float32))
        self.agent.robot.set_pose(sapien.Pose(p=list(ROBOT_BASE)))
        for name, actor in {**self.objects, **self.receptacles}.items():
            actor.set_pose(Pose.create_from_pq(p=list(self.parking[name])))
        for name, xy, yaw in zip(ep.objects, ep.object_xy, ep.object_yaw, strict=True):
            self.set_object_pose(name, (xy[0], xy[1], 0.0), yaw)
        for name, xy in zip(ep.receptacles, ep.receptacle_xy, strict=True):
            self.receptacles[name].set_pose(Pose.create_from_pq(p=[xy[0], xy[1], 0.0]))
        self.table_material.base_color_texture = self.table_textures[ep.table]
        self.target_object = self.objects[ep.objects[0]]
        self.target_receptacle = self.receptacles[ep.receptacles[0]]

    def set_object_pose(self, name: str, xyz: Sequence[float], yaw: float) -> None:
        """Teleport an object (its bottom centre to xyz) and stop it."""
        actor = self.objects[name]
        actor.set_pose(Pose.create_from_pq(p=[xyz[0], xyz[1], xyz[2] + 1e-3], q=yaw_quat(yaw)))
        actor.set_linear_velocity(torch.zeros(3))
        actor.set_angular_velocity(torch.zeros(3))

    def evaluate(self) -> dict:
        obj, rec = self.target_object, self.target_receptacle
        spec = RECEPTACLES[self.episode.receptacles[0]]
        # Measure from the object's centre: its bottom-centre origin moves when it rolls.
        offset = self.object_center(self.episode.objects[0]) - _numpy(rec.pose.p[0])
        height_gap = abs(offset[2] - OBJECTS[self.episode.objects[0]].height / 2 - spec.surface)
        contact = self.scene.get_pairwise_contact_forces(obj, rec)
        touching = bool(torch.linalg.norm(contact, dim=-1)[0] > 1e-4)
        success = spec.contains_xy(offset[0], offset[1]) and height_gap < 0.02 and touching
        return {"success": torch.tensor([success]), "grasped": self.agent.is_grasping(obj).cpu()}

    def object_center(self, name: str) -> np.ndarray:
        """World position of the centre of an object's bounding box."""
        pose = self.objects[name].pose
        rot = Rotation.from_quat(_numpy(pose.q[0]), scalar_first=True)
        return _numpy(pose.p[0]) + rot.apply([0.0, 0.0, OBJECTS[name].height / 2])

    def segmentation_ids(self) -> np.ndarray:
        """Segmentation ids of the robot's links and of the objects (the `texture_*` mask)."""
        ids = [link._objs[0].entity.per_scene_id for link in self.agent.robot.links]
        ids += [actor._objs[0].per_scene_id for actor in self.objects.values()]
        return np.asarray(ids)


# --------------------------------------------------------------------------------------------
# 4. The scripted expert
# --------------------------------------------------------------------------------------------

HOVER = 0.08  # approach height above the grasp point
CARRY_Z = 0.16  # TCP height while carrying: clears every object and rim
PLACE_GAP = 0.01  # release the object this far above the receptacle's surface
POS_GAIN = 1.6  # the arm covers ~40% of a commanded step in one control step, so aim past it
ROT_GAIN = 1.6
DOWN = np.diag([1.0, -1.0, -1.0])  # TCP orientation pointing down with yaw 0


@dataclass
class ExpertView:
    """Ground-truth state the expert plans from (positions in the world frame)."""

    tcp_pos: np.ndarray
    tcp_rot: np.ndarray  # 3x3
    obj_center: np.ndarray  # centre of the target object's bounding box
    obj_yaw: float
    obj: ObjectSpec
    rec_pos: np.ndarray
    rec: ReceptacleSpec
    grasped: bool


def gripper_yaw(rot: np.ndarray) -> float:
    return float(np.arctan2(rot[1, 0], rot[0, 0]))


def wrap_angle(a: float) -> float:
    return float((a + np.pi) % (2 * np.pi) - np.pi)


def grasp_yaw(view: ExpertView) -> float:
    """The symmetric grasp yaw of the object closest to the gripper's current yaw."""
    current = gripper_yaw(view.tcp_rot)
    if view.obj.grasp_period == 0:
        return current
    base = view.obj_yaw + view.obj.grasp_yaw
    k = np.round((current - base) / view.obj.grasp_period)
    return wrap_angle(base + k * view.obj.grasp_period)


def move_action(view: ExpertView, target: np.ndarray, yaw: float, gripper: float) -> np.ndarray:
    """Proportional step toward a TCP position and a downward orientation with the given yaw."""
    dpos = POS_GAIN * (target - view.tcp_pos)
    dpos *= min(1.0, POS_STEP / (np.linalg.norm(dpos) + 1e-9))
    wanted = Rotation.from_euler("z", yaw).as_matrix() @ DOWN
    drot = ROT_GAIN * Rotation.from_matrix(wanted @ view.tcp_rot.T).as_rotvec()
    drot *= min(1.0, ROT_STEP / (np.linalg.norm(drot) + 1e-9))
    # ManiSkill 3.0.1 scales rotation actions by -ROT_STEP (see the module docstring).
    return np.concatenate([dpos / POS_STEP, -drot / ROT_STEP, [gripper]]).astype(np.float32)


class ScriptedExpert:
    """reach above -> descend -> grasp -> lift -> carry over the receptacle -> lower -> release
    -> retreat. It re-plans from the live state every step: if the object leaves the hand or is
    moved (the `reposition` split), it goes back to reaching."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.phase, self.steps_in_phase = "reach", 0
        self.yaw = 0.0

    def goto(self, phase: str) -> None:
        self.phase, self.steps_in_phase = phase, 0

    def act(self, v: ExpertView) -> np.ndarray:
        self.steps_in_phase += 1
        obj_bottom = v.obj_center[2] - v.obj.height / 2
        grasp_point = np.array([*v.obj_center[:2], obj_bottom + v.obj.grasp_height])
        xy_error = float(np.linalg.norm(grasp_point[:2] - v.tcp_pos[:2]))
        # Where the TCP must go for the object's centre to be over the receptacle's centre.
        over_rec = v.rec_pos[:2] + (v.tcp_pos[:2] - v.obj_center[:2])
        obj_on_rec = v.rec.contains_xy(*(v.obj_center[:2] - v.rec_pos[:2]))

        if self.phase in ("descend", "grasp") and xy_error > 0.03:
            self.goto("reach")  # the object moved away: start over
        if self.phase in ("lift", "carry") and not v.grasped and self.steps_in_phase > 2:
            self.goto("reach")  # dropped it
        if self.phase in ("retreat", "done") and not obj_on_rec:
            self.goto("reach")

        if self.phase == "reach":
            self.yaw = grasp_yaw(v)
            target = grasp_point + [0.0, 0.0, HOVER]
            yaw_error = abs(wrap_angle(self.yaw - gripper_yaw(v.tcp_rot)))
            if xy_error < 0.01 and abs(target[2] - v.tcp_pos[2]) < 0.02 and yaw_error < 0.08:
                self.goto("descend")
            return move_action(v, target, self.yaw, 1.0)
        if self.phase == "descend":
            if abs(grasp_point[2] - v.tcp_pos[2]) < 0.006 or self.steps_in_phase > 10:
                self.goto("grasp")
            return move_action(v, grasp_point, self.yaw, 1.0)
        if self.phase == "grasp":
            if self.steps_in_phase >= 3:
                self.goto("lift")
            return move_action(v, grasp_point, self.yaw, -1.0)
        if self.phase == "lift":
            target = np.array([*v.tcp_pos[:2], CARRY_Z])
            if v.tcp_pos[2] > CARRY_Z - 0.03:
                self.goto("carry")
            return move_action(v, target, self.yaw, -1.0)
        if self.phase == "carry":
            target = np.array([*over_rec, CARRY_Z])
            if np.linalg.norm(target[:2] - v.tcp_pos[:2]) < 0.01:
                self.goto("lower")
            return move_action(v, target, self.yaw, -1.0)
        if self.phase == "lower":
            drop = v.rec_pos[2] + v.rec.surface + PLACE_GAP - obj_bottom
            target = np.array([*over_rec, v.tcp_pos[2] + drop])
            if abs(drop) < 0.006 or self.steps_in_phase > 10 or not v.grasped:
                self.goto("release")
            return move_action(v, target, self.yaw, -1.0)
        if self.phase == "release":
            if self.steps_in_phase >= 2:
                self.goto("retreat")
            return move_action(v, v.tcp_pos, self.yaw, 1.0)
        if self.phase == "retreat":
            target = np.array([*v.tcp_pos[:2], CARRY_Z])
            if v.tcp_pos[2] > CARRY_Z - 0.03:
                self.goto("done")
            return move_action(v, target, self.yaw, 1.0)
        return np.array([0, 0, 0, 0, 0, 0, 1.0], dtype=np.float32)  # done: wait, gripper open


# --------------------------------------------------------------------------------------------
# 5. One environment: scene + reward + perturbations + expert
# --------------------------------------------------------------------------------------------


# Where a torchrun rank's envs render, and how many worker processes it runs. Every rank's
# workers used to render on GPU 0, each with its own CUDA context and Vulkan device there
# (~0.6-1 GB), and each rank started one worker per core of the node.

# Workers per rank when they render on its GPU: at ~1 GB each, at most ~16 GB next to the
# rank's ~50 GB PPO peak.
MAX_GPU_RENDER_WORKERS = 16


def render_backend(local_rank: int, num_gpus: int) -> str:
    """ManiSkill's `render_backend` for a rank's envs: the rank's own GPU, or SAPIEN's CPU device
    (lavapipe) when torch sees none. ManiSkill 3.0.1's parse_sim_and_render_backend
    (mani_skill/envs/utils/system/backend.py) turns "sapien_cuda:N" into sapien.Device("cuda:N"),
    and SAPIEN 3's findDevice (src/device.cpp) matches N against the CUDA runtime's device ids,
    torch's numbering; plain "gpu" is findDevice("cuda"), the first CUDA device, on every rank.
    torchrun's rank i trains on GPU i (common.init_distributed); where a launcher shows each rank
    only its own GPU (CUDA_VISIBLE_DEVICES), the modulo picks that one, its device 0."""
    if num_gpus <= 0:
        return "cpu"
    return f"sapien_cuda:{local_rank % num_gpus}"


def rank_render_backend(device: str | None = None) -> str:
    """render_backend() for this process: the policy's GPU when `device` names one (cuda:N),
    else this rank's (LOCAL_RANK from torchrun, 0 outside it) whenever torch sees a GPU, even
    for a policy on the CPU: SAPIEN's CPU renderer needs Mesa's driver, which a GPU host may lack."""
    if device is not None and device.startswith("cuda:"):
        return f"sapien_cuda:{int(device.split(':')[1])}"
    num_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return render_backend(int(os.environ.get("LOCAL_RANK", 0)), num_gpus)


def select_render_gpu(render_backend: str) -> None:
    """Make the render GPU this process's current CUDA device. ManiSkill synchronises the
    current device after rendering on CUDA (a bare torch.cuda.synchronize() in
    sapien_env.py): in a spawned worker that is GPU 0, which would open a CUDA context on GPU 0
    for every worker of every rank, and wait on a device that did not render."""
    if render_backend.startswith("sapien_cuda:"):
        torch.cuda.set_device(int(render_backend.split(":")[1]))


def workers_per_rank(num_envs: int, cpu_count: int, local_world_size: int,
                     cap: int | None = None) -> int:
    """Env worker processes for one rank: the node's cores shared evenly among its ranks (so
    all of them together start at most one worker per core), at least 1, at most one per env
    and at most `cap`."""
    workers = min(num_envs, max(1, cpu_count // max(1, local_world_size)))
    return workers if cap is None else max(1, min(workers, cap))


def available_cpus() -> int:
    """Cores this process may run on: its affinity mask (taskset, a cgroup cpuset), not the
    machine's count."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class PutOnTask:
    """A single episode at a time, fixed horizon, no early termination. render_backend None:
    this rank's (rank_render_backend)."""

    def __init__(self, split: str, image_size: int = 112,
                 max_episode_steps: int = MAX_EPISODE_STEPS, render_backend: str | None = None):
        self.image_size, self.max_episode_steps = image_size, max_episode_steps
        self.render_backend = render_backend or rank_render_backend()
        self.scene: PutOnScene | None = None
        self.set_split(split)

    def set_split(self, split: str) -> None:
        """Build the scene of `split`, replacing any earlier one: ~0.4 s while the process's
        renderer is up, against ~4 s to start it and ~3 s of imports in a new worker (measured),
        which is why VecEnv.set_split reuses its worker processes."""
        check_split(split)
        old_scene = self.scene
        try:
            scene = PutOnScene(
                split,
                self.image_size,
                # Segmentation costs a second read-back per frame: only the texture splits use it.
                obs_mode="rgb+segmentation" if split in TEXTURE_ALPHA else "rgb",
                reward_mode="none",
                control_mode="pd_ee_delta_pose",
                sim_backend="cpu",
                # TODO: ManiSkill's GPU-batched sim (sim_backend="gpu") would run all envs in one
                # process on CUDA machines; it needs batched versions of evaluate/placement.
                render_backend=self.render_backend,
            )
        except RuntimeError as err:
            text = str(err).lower()
            if any(key in text for key in ("vk::", "vulkan", "render device")):
                raise RenderingUnavailable(f"{RENDER_HELP}\n(SAPIEN said: {err})") from None
            raise
        # The new scene is built before the old one closes: closing a process's last scene shuts
        # SAPIEN's renderer down, and the next scene then paid its ~4 s start-up again.
        if old_scene is not None:
            old_scene.close()
        self.scene, self.split = scene, split
        self.mask_ids = self.scene.segmentation_ids()
        self.expert = ScriptedExpert()
        self.episode: Episode | None = None
        self.t = 0
        self.reward = PotentialReward()
        self._expert_cache: tuple[int, np.ndarray] | None = None  # (step, action)

    # --- episode loop ---

    def reset(self, episode_id: int) -> tuple[np.ndarray, str]:
        self.episode = decode_episode(self.split, episode_id)
        obs, _ = self.scene.reset(options={"episode": self.episode})
        self.t = 0
        self.reward = PotentialReward()
        self.expert.reset()
        self._expert_cache = None
        return self._image(obs), self.episode.instruction

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, dict]:
        if self.episode is None or self.t >= self.max_episode_steps:
            raise RuntimeError("episode is over (or never started): call reset() first")
        if self.t == REPOSITION_STEP and self.episode.reposition_xy is not None:
            x, y = self.episode.reposition_xy
            self.scene.set_object_pose(self.episode.objects[0], (x, y, 0.0),
                                       self.episode.object_yaw[0])
        action = np.clip(np.asarray(action, dtype=np.float32), -1.0, 1.0)
        obs, _, _, _, info = self.scene.step(action)
        self.t += 1
        grasped, success = bool(info["grasped"][0]), bool(info["success"][0])
        reward = self.reward.update(grasped, success)
        info = {
            "success": success,
            "success_once": self.reward.success_once,
            "grasped": grasped,
            "episode_id": self.episode.episode_id,
        }
        return self._image(obs), reward, self.t >= self.max_episode_steps, info

    def _image(self, obs: dict) -> np.ndarray:
        """The camera image with the split's dynamic perturbation for the current step."""
        camera = obs["sensor_data"]["camera"]
        image = _numpy(camera["rgb"][0]).astype(np.uint8)
        if self.split in TEXTURE_ALPHA:
            rng = frame_rng(self.split, self.episode.episode_id, self.t)
            mask = np.isin(_numpy(camera["segmentation"][0, ..., 0]), self.mask_ids)
            pattern = random_pattern(rng, *image.shape[:2])
            image = blend(image, pattern, TEXTURE_ALPHA[self.split], mask)
        elif self.split in NOISE_ALPHA:
            rng = frame_rng(self.split, self.episode.episode_id, self.t)
            image = blend(image, random_noise(rng, *image.shape[:2]), NOISE_ALPHA[self.split])
        return image

    # --- ground truth for the expert and for tests ---

    def expert_view(self) -> ExpertView:
        ep, s = self.episode, self.scene
        tcp = s.agent.tcp.pose
        obj_pose = s.target_object.pose
        obj_rot = Rotation.from_quat(_numpy(obj_pose.q[0]), scalar_first=True).as_matrix()
        return ExpertView(
            tcp_pos=_numpy(tcp.p[0]).astype(np.float64),
            tcp_rot=Rotation.from_quat(_numpy(tcp.q[0]), scalar_first=True).as_matrix(),
            obj_center=s.object_center(ep.objects[0]),
            obj_yaw=float(np.arctan2(obj_rot[1, 0], obj_rot[0, 0])),
            obj=OBJECTS[ep.objects[0]],
            rec_pos=_numpy(s.target_receptacle.pose.p[0]).astype(np.float64),
            rec=RECEPTACLES[ep.receptacles[0]],
            grasped=bool(s.agent.is_grasping(s.target_object)[0]),
        )

    def expert_action(self) -> np.ndarray:
        """The expert's action for the current step (cached: asking twice does not advance it)."""
        if self._expert_cache is None or self._expert_cache[0] != self.t:
            self._expert_cache = (self.t, self.expert.act(self.expert_view()))
        return self._expert_cache[1]

    def state(self) -> dict:
        """Ground-truth positions for tests and debugging."""
        s = self.scene
        return {
            "episode": self.episode,
            "t": self.t,
            "target_pos": _numpy(s.target_object.pose.p[0]),
            "receptacle_pos": _numpy(s.target_receptacle.pose.p[0]),
            "object_pos": {n: _numpy(a.pose.p[0]) for n, a in s.objects.items()},
            "qpos": _numpy(s.agent.robot.get_qpos()[0]),
            "tcp_pos": _numpy(s.agent.tcp.pose.p[0]),
            "table": self.episode.table,
        }

    def place_target_on_receptacle(self) -> None:
        """Teleport the target object onto the centre of the target receptacle (tests)."""
        ep = self.episode
        rec_pos = _numpy(self.scene.target_receptacle.pose.p[0])
        top = rec_pos[2] + RECEPTACLES[ep.receptacles[0]].surface
        self.scene.set_object_pose(ep.objects[0], (rec_pos[0], rec_pos[1], top), ep.object_yaw[0])

    def close(self) -> None:
        if self.scene is not None:
            self.scene.close()
            self.scene = None


# --------------------------------------------------------------------------------------------
# 6. Batched interface: gymnasium's vector env
# --------------------------------------------------------------------------------------------


def _worker(conn, split: str, num_tasks: int, image_size: int, max_episode_steps: int,
            render_backend: str) -> None:
    """Subprocess loop: owns `num_tasks` PutOnTasks and runs a method on each per request."""
    torch.set_num_threads(1)  # several workers share few cores
    try:
        select_render_gpu(render_backend)
        tasks = [PutOnTask(split, image_size, max_episode_steps, render_backend) for _ in range(num_tasks)]
    except RenderingUnavailable as err:
        conn.send(("render_error", str(err)))
        return
    except Exception:
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ok", None))
    while True:
        try:
            method, args = conn.recv()
        except (EOFError, KeyboardInterrupt):  # the main process is gone: leave quietly
            return
        if method == "close":
            for task in tasks:
                task.close()
            conn.close()
            return
        try:
            results = [getattr(task, method)(*a) for task, a in zip(tasks, args, strict=True)]
            conn.send(("ok", results))
        except (BrokenPipeError, KeyboardInterrupt):
            return
        except Exception:
            conn.send(("error", traceback.format_exc()))


def _check_reply(status: str, payload: Any) -> Any:
    if status == "render_error":
        raise RenderingUnavailable(payload)
    if status == "error":
        raise RuntimeError(f"env worker failed:\n{payload}")
    return payload


# Every character of an instruction (gymnasium's default Text charset has no space).
INSTRUCTION_CHARSET = string.ascii_letters + string.digits + " -'"


class VecEnv(gym.vector.VectorEnv):
    """N PutOnTasks behind gymnasium's vector-env interface (envs.py's docstring): in this
    process, or spread over worker processes that step in parallel."""

    metadata = {"autoreset_mode": gym.vector.AutoresetMode.DISABLED}

    def __init__(self, split: str, num_envs: int, image_size: int, seed: int,
                 max_episode_steps: int | None, num_workers: int | None, render_device: str | None = None):
        check_split(split)
        self.split, self.num_envs, self.image_size = split, num_envs, image_size
        self.max_episode_steps = max_episode_steps or MAX_EPISODE_STEPS
        self.single_action_space = gym.spaces.Box(-1.0, 1.0, (7,), np.float32)
        self.action_space = gym.vector.utils.batch_space(self.single_action_space, num_envs)
        self.single_observation_space = gym.spaces.Dict({
            "image": gym.spaces.Box(0, 255, (image_size, image_size, 3), np.uint8),
            "instruction": gym.spaces.Text(256, charset=INSTRUCTION_CHARSET)})
        self.observation_space = gym.vector.utils.batch_space(self.single_observation_space, num_envs)
        self.rng = np.random.default_rng(seed)
        self.episode_ids = np.zeros(num_envs, dtype=np.int64)
        self.instructions: tuple[str, ...] = ("",) * num_envs
        self._sent: tuple[str, list[tuple]] | None = None  # a call sent and not yet received
        # Chosen here, not in each worker, so that every env of this rank renders on one device.
        self.render_backend = rank_render_backend(render_device)
        if num_workers is None:
            local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # ranks on this node
            cap = None if self.render_backend == "cpu" else MAX_GPU_RENDER_WORKERS
            num_workers = 0 if num_envs == 1 else workers_per_rank(
                num_envs, available_cpus(), local_world_size, cap)
        self.tasks: list[PutOnTask] = []
        self.workers: list[tuple[Any, Any, int]] = []  # (process, pipe, number of envs)
        if num_workers == 0:
            self.tasks = [PutOnTask(split, image_size, self.max_episode_steps, self.render_backend)
                          for _ in range(num_envs)]
            return
        ctx = mp.get_context("spawn")  # forking a process that has touched Vulkan is unsafe
        for chunk in np.array_split(np.arange(num_envs), min(num_workers, num_envs)):
            parent, child = ctx.Pipe()
            worker_args = (child, split, len(chunk), image_size, self.max_episode_steps,
                           self.render_backend)
            proc = ctx.Process(target=_worker, args=worker_args, daemon=True)
            proc.start()
            child.close()
            self.workers.append((proc, parent, len(chunk)))
        try:
            for _, pipe, _ in self.workers:
                try:
                    _check_reply(*pipe.recv())
                except EOFError:
                    raise RuntimeError("an env worker died while starting (see its output)") from None
        except BaseException:
            self.close()
            raise

    def call_each(self, method: str, *per_env_args: Sequence[Any]) -> list[Any]:
        """Run PutOnTask.method on every env; per_env_args are sequences of length num_envs."""
        self._send(method, *per_env_args)
        return self._receive()

    def _send(self, method: str, *per_env_args: Sequence[Any]) -> None:
        """Start a call: worker processes get it at once; in-process envs run it in _receive."""
        if self._sent is not None:
            raise RuntimeError("step_async() must be followed by step_wait() before the next call")
        args = list(zip(*per_env_args, strict=True)) if per_env_args else [()] * self.num_envs
        self._sent = (method, args)
        start = 0
        for _, pipe, n in self.workers:  # send to all first, so the workers run in parallel
            pipe.send((method, args[start:start + n]))
            start += n

    def _receive(self) -> list[Any]:
        """The per-env results of the call _send started."""
        if self._sent is None:
            raise RuntimeError("step_wait() called without step_async()")
        (method, args), self._sent = self._sent, None
        if self.tasks:
            return [getattr(task, method)(*a) for task, a in zip(self.tasks, args, strict=True)]
        # Read every reply before raising, or a failed worker would leave the others' answers
        # in their pipes and desynchronise the next call.
        replies = [pipe.recv() for _, pipe, _ in self.workers]
        return [result for reply in replies for result in _check_reply(*reply)]

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[dict, dict]:
        """options={"episode_ids": ids [N]} fixes every initial state; without it ids are drawn
        from the env's generator (`seed` re-seeds it)."""
        if seed is not None:
            self.rng = np.random.default_rng(seed)
        episode_ids = (options or {}).get("episode_ids")
        if episode_ids is None:
            episode_ids = self.rng.integers(0, MAX_EPISODE_ID, size=self.num_envs)
        episode_ids = np.asarray(episode_ids, dtype=np.int64).reshape(-1)
        if len(episode_ids) != self.num_envs:
            raise ValueError(f"need {self.num_envs} episode ids, got {len(episode_ids)}")
        self.episode_ids = episode_ids
        results = self.call_each("reset", [int(i) for i in episode_ids])
        self.instructions = tuple(r[1] for r in results)
        obs = {"image": np.stack([r[0] for r in results]), "instruction": self.instructions}
        return obs, {"episode_id": episode_ids.copy()}

    def step(self, actions: np.ndarray) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray, dict]:
        self.step_async(actions)
        return self.step_wait()

    def step_async(self, actions: np.ndarray) -> None:
        """Send the actions to the worker processes and return at once (in-process envs only
        keep them), so the caller can work while the workers step. step_wait() must come next:
        any other call in between raises."""
        actions = np.array(actions, dtype=np.float32)  # a copy: the caller may reuse its array
        if actions.shape != (self.num_envs, 7):
            raise ValueError(f"actions must have shape ({self.num_envs}, 7), got {actions.shape}")
        self._send("step", list(actions))

    def step_wait(self) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray, dict]:
        """Wait for the step step_async() started; returns what step() returns."""
        results = self._receive()
        images, rewards, truncated, infos = zip(*results, strict=True)
        obs = {"image": np.stack(images), "instruction": self.instructions}
        info = {key: np.array([i[key] for i in infos]) for key in infos[0]}
        truncated = np.array(truncated, dtype=np.bool_)
        return obs, np.array(rewards, dtype=np.float32), np.zeros_like(truncated), truncated, info

    def expert_action(self) -> np.ndarray:
        """The scripted expert's actions [N, 7] for the current states (ground truth)."""
        return np.stack(self.call_each("expert_action"))

    def set_split(self, split: str) -> None:
        """Rebuild every env on another split in the same worker processes: ~0.4-0.7 s instead
        of the ~10 s a new worker spends importing and starting its renderer (measured)."""
        check_split(split)
        self.call_each("set_split", [split] * self.num_envs)
        self.split = split

    def close(self, **kwargs: Any) -> None:
        for task in self.tasks:
            task.close()
        for proc, pipe, _ in self.workers:
            try:
                pipe.send(("close", None))
            except (BrokenPipeError, OSError):
                pass
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
        self.tasks, self.workers = [], []
