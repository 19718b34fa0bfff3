"""Expert demonstrations: collected by the scripted expert through common.EpisodeLoop, stored in
ManiSkill's trajectory layout, read back as training frames.

The recipe of arXiv 2505.19789 (its appendix): a motion planner demonstrates; steps with tiny
motion are dropped (else policies learn to idle) unless the gripper toggles; an episode is cut
6 steps after success begins.

A demonstration directory holds two sets, each in chunks of episodes:
  manifest.json                        how the demonstrations were collected (checked on reuse)
  train-episodes_000000-000007.h5      ManiSkill's RecordEpisode layout: traj_{i}/obs/sensor_data/
  train-episodes_000000-000007.json      camera/rgb uint8 [T+1, H, W, 3], actions [T, 7],
  heldout-episodes_000000-000007.h5      rewards, terminated, truncated, success [T]; the sidecar
  heldout-episodes_000000-000007.json    has env_info (env_id, env_kwargs, max_episode_steps) and
                                         one record per episode (episode_id = i, episode_seed and
                                         reset_kwargs = the task's episode id, instruction, ...)
`train` demos are what SFT trains on; `heldout` demos, drawn from their own stream of episode
ids, are the directory's fixed validation set: no run trains on them, so every run over the
same directory validates on the same episodes. Slot i of a set always shows the same episode
id, so an interrupted or extended collection fills exactly the slots that are missing.
ManiSkill's own loader reads every chunk: mani_skill.trajectory.dataset.ManiSkillTrajectoryDataset.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from tqdm import tqdm

from common import ActOutput, EpisodeLoop, expert_policy
from envs import make_vec_env
from tasks import MAX_EPISODE_ID
from twin_env import GRIPPER_COLOUR, STEP, robot_of

ROLES = ("train", "heldout")
ENV_IDS = {"maniskill": "PutOn-v1", "twin": "PutOnTwin-v1"}  # registered with ManiSkill / gymnasium
# Idle steps, in normalised action units (1.0 = one full step: 10 cm / 0.1 rad in ManiSkill):
# |dpos| < 1 cm and |drot| < 0.06 rad, the thresholds of the paper's motion-planner data.
MIN_TRANSLATION, MIN_ROTATION = 0.1, 0.6


# A manifest written before a setting existed was collected the one way there was then.
MANIFEST_BEFORE_THE_KEY = {"idle_steps_after_success": "dropped",
                           "robot": {"gripper_colour": list(GRIPPER_COLOUR), "step": STEP}}


class DemoError(ValueError):
    """Demonstrations on disk that cannot be used as they are; the message says what to do."""


@dataclass
class Demo:
    episode_id: int  # the task's episode id (its initial state)
    instruction: str
    images: np.ndarray  # uint8 [T + 1, H, W, 3]: the observation before each action, then the last
    actions: np.ndarray  # float32 [T, 7]
    rewards: np.ndarray  # float32 [T]
    success: np.ndarray  # bool [T]: success after each action
    succeeded: bool  # held success for the required steps (what makes it a demonstration)


def drop_idle_steps(actions: np.ndarray, min_translation: float = MIN_TRANSLATION,
                    min_rotation: float = MIN_ROTATION) -> np.ndarray:
    """Indices of the steps to keep: a step is idle when it translates less than min_translation
    and rotates less than min_rotation (action units), and is kept anyway if the gripper
    command toggles (idle steps teach a policy to stand still)."""
    actions = np.asarray(actions)
    gripper = np.sign(actions[:, 6])
    previous = np.concatenate([[1.0], gripper[:-1]])  # episodes start with the gripper open
    moves = np.linalg.norm(actions[:, :3], axis=1) >= min_translation
    turns = np.linalg.norm(actions[:, 3:6], axis=1) >= min_rotation
    return np.flatnonzero(moves | turns | (gripper != previous))


def collect_expert_demos(envs: Any, episode_ids: np.ndarray, success_steps: int = 6,
                         action_noise: float = 0.0, rng: np.random.Generator | None = None,
                         keep_success_steps: bool = True) -> list[Demo]:
    """The expert from the given initial states, one demonstration per env: each cut once it has
    been successful `success_steps` steps in a row, idle steps dropped. A failed episode comes
    back whole (its last success is False).

    keep_success_steps: keep the steps taken from an already successful state even when idle.
    The twin's expert waits there (ManiSkill's retreats first): without those steps a cloned
    policy never sees a placed object and re-grasps it, measured on the twin: SFT on 256 demos,
    1000 steps, 53% -> 72% on `ind`, the failures "placed, then lost" 23% -> 1% (docs/HISTORY.md).

    action_noise > 0 (DART, Laskey et al. 2017): on 30% of the steps the executed motion gets
    Gaussian noise of this std (action units) while the demonstration records the expert's
    own action, so the data shows how to recover from overshooting and drifting, states that
    clean demonstrations never visit and a cloned policy then cannot get out of.
    """
    streak = np.zeros(envs.num_envs, dtype=int)
    labels: list[np.ndarray] = []
    rng = rng or np.random.default_rng(0)

    def noisy_expert(obs: dict) -> ActOutput:
        action = np.asarray(envs.expert_action(), dtype=np.float32)
        labels.append(action)
        jolt = rng.normal(0.0, action_noise, (len(action), 6)) * (rng.random((len(action), 1)) < 0.3)
        return ActOutput(np.concatenate([np.clip(action[:, :6] + jolt, -1, 1), action[:, 6:]], 1)
                         .astype(np.float32))

    def all_held_long_enough(info: dict) -> bool:  # stop early: the rest would be cut anyway
        streak[:] = np.where(info["success"], streak + 1, 0)
        return bool((streak >= success_steps).all())

    loop = EpisodeLoop(envs, lambda: episode_ids)
    policy = noisy_expert if action_noise > 0 else expert_policy(envs)
    rollout = loop.run(policy, envs.max_episode_steps, stop=all_held_long_enough)
    if action_noise > 0:
        rollout.actions = np.stack(labels)  # learn the expert's actions, not the executed ones
    images = np.concatenate([rollout.images.numpy(), rollout.final_images[None]])  # [T + 1, N, ...]
    demos = []
    for n in range(envs.num_envs):
        run, end = 0, len(rollout.actions)
        for t, success in enumerate(rollout.success[:, n]):
            run = run + 1 if success else 0
            if run >= success_steps:
                end = t + 1
                break
        keep = drop_idle_steps(rollout.actions[:end, n])
        if keep_success_steps:  # the steps that act on an already successful state, idle or not
            keep = np.union1d(keep, np.flatnonzero(np.concatenate([[False], rollout.success[:end - 1, n]])))
        demos.append(Demo(
            episode_id=int(rollout.episode_ids[0, n]), instruction=rollout.instructions[0][n],
            images=np.concatenate([images[keep, n], images[end:end + 1, n]]),
            actions=rollout.actions[keep, n], rewards=rollout.rewards[keep, n].numpy(),
            success=rollout.success[keep, n], succeeded=run >= success_steps))
    return demos


# ---------------------------------------------------------------------------- storage


def episode_ids_of(slots: list[int], seed: int, role: str) -> np.ndarray:
    """The task episode id each slot of a set shows: a pure function of (seed, role, slot)."""
    stream = ROLES.index(role)
    return np.array([np.random.default_rng([seed, stream, s]).integers(0, MAX_EPISODE_ID)
                     for s in slots], dtype=np.int64)


def check_manifest(demo_dir: Path, settings: dict[str, Any]) -> None:
    """Refuse to mix demonstrations collected under other settings into one data set."""
    if demo_dir.exists() and not demo_dir.is_dir():
        raise DemoError(f"--demo-dir {demo_dir} is a file, not a directory")
    demo_dir.mkdir(parents=True, exist_ok=True)
    manifest = demo_dir / "manifest.json"
    if not manifest.exists():
        manifest.write_text(json.dumps(settings, indent=2))
        return
    try:
        found = json.loads(manifest.read_text())
    except json.JSONDecodeError:
        raise DemoError(f"{manifest} is not valid JSON; delete the directory to collect again") from None
    found = {**MANIFEST_BEFORE_THE_KEY, **found}
    changed = [f"{k}={found.get(k)!r} (now {v!r})" for k, v in settings.items() if found.get(k) != v]
    if changed:
        raise DemoError(f"demonstrations in {demo_dir} were collected with {', '.join(changed)}; "
                        f"pass another --demo-dir")


def write_chunk(demo_dir: Path, role: str, slots: list[int], demos: list[Demo],
                env_info: dict[str, Any]) -> None:
    """One chunk to HDF5 + JSON. The sidecar is renamed into place last: a chunk whose sidecar
    exists is complete, and a crash leaves only temp files or an HDF5 file with no sidecar."""
    name = f"{role}-episodes_{slots[0]:06d}-{slots[-1]:06d}"
    h5_tmp, json_tmp = demo_dir / f".{name}.h5.tmp", demo_dir / f".{name}.json.tmp"
    with h5py.File(h5_tmp, "w") as f:
        for slot, demo in zip(slots, demos, strict=True):
            group = f.create_group(f"traj_{slot}")
            steps = len(demo.actions)
            # One compressed HDF5 chunk per frame: training reads single frames at random.
            group.create_dataset("obs/sensor_data/camera/rgb", data=demo.images,
                                 chunks=(1, *demo.images.shape[1:]), compression="gzip")
            group.create_dataset("actions", data=demo.actions.astype(np.float32))
            group.create_dataset("rewards", data=demo.rewards.astype(np.float32))
            group.create_dataset("success", data=demo.success.astype(bool))
            group.create_dataset("terminated", data=np.zeros(steps, bool))
            group.create_dataset("truncated", data=np.arange(steps) == steps - 1)
    episodes = [{"episode_id": slot, "episode_seed": d.episode_id, "control_mode": env_info["control_mode"],
                 "elapsed_steps": len(d.actions), "reset_kwargs": {"options": {"episode_ids": [d.episode_id]}},
                 "success": d.succeeded, "instruction": d.instruction}
                for slot, d in zip(slots, demos, strict=True)]
    json_tmp.write_text(json.dumps({
        "env_info": env_info, "source_type": "motionplanning",
        "source_desc": "demos.py: the scripted expert; idle steps dropped, cut after success",
        "episodes": episodes}, indent=2))
    os.replace(h5_tmp, demo_dir / f"{name}.h5")
    os.replace(json_tmp, demo_dir / f"{name}.json")


def read_demo_records(demo_dir: Path, role: str, image_size: int) -> list[dict[str, Any]]:
    """Every episode of a set on disk: its sidecar record plus "file", "slot" and "actions".

    Leftovers of an interrupted write (temp files, an HDF5 file without its sidecar) are
    deleted, so their slots are collected again; a chunk that does not match its sidecar is an
    error: it is never used, and never deleted without the user looking at it."""
    for leftover in demo_dir.glob(f".{role}-*.tmp"):
        leftover.unlink()
    records = []
    for h5_path in sorted(demo_dir.glob(f"{role}-episodes_*.h5")):
        json_path = h5_path.with_suffix(".json")
        if not json_path.exists():
            h5_path.unlink()
            continue
        try:
            sidecar = json.loads(json_path.read_text())
            with h5py.File(h5_path, "r") as f:
                for record in sidecar["episodes"]:
                    group = f[f"traj_{record['episode_id']}"]
                    images, actions = group["obs/sensor_data/camera/rgb"], group["actions"][()]
                    steps = record["elapsed_steps"]
                    if images.shape != (steps + 1, image_size, image_size, 3) or images.dtype != np.uint8:
                        raise ValueError(f"traj_{record['episode_id']} images are {images.dtype} "
                                         f"{images.shape}, expected uint8 ({steps + 1}, {image_size}, "
                                         f"{image_size}, 3)")
                    if actions.shape != (steps, 7) or not np.isfinite(actions).all():
                        raise ValueError(f"traj_{record['episode_id']}/actions is not {steps} finite 7-D actions")
                    records.append({**record, "slot": record["episode_id"], "file": h5_path,
                                    "actions": actions})
        except (OSError, KeyError, ValueError, TypeError) as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise DemoError(f"demonstration file {h5_path} is corrupt or partial ({reason}); "
                            f"delete it and {json_path.name} to collect those episodes again") from None
    return sorted(records, key=lambda r: r["slot"])


def missing_slots(records: list[dict[str, Any]], count: int) -> list[int]:
    """The `count` lowest slots that are not on disk yet (holes left by an interruption first)."""
    done = {r["slot"] for r in records}
    slots, candidate = [], 0
    while len(slots) < count:
        if candidate not in done:
            slots.append(candidate)
        candidate += 1
    return slots


def ensure_demos(demo_dir: Path, wanted: dict[str, int], env: str, split: str, image_size: int,
                 max_episode_steps: int, seed: int = 0, num_envs: int = 8, success_steps: int = 6,
                 action_noise: float = 0.0, keep_success_steps: bool = True) -> dict[str, list[dict[str, Any]]]:
    """At least wanted[role] successful demonstrations of each set on disk -> their records,
    by slot. Each chunk is written the moment it finishes: an interruption loses at most the
    chunk in flight, and the next run continues from there."""
    env_info = {"env_id": ENV_IDS[env], "max_episode_steps": max_episode_steps, "control_mode":
                "pd_ee_delta_pose" if env == "maniskill" else "delta_xy_gripper",
                "env_kwargs": {"env": env, "split": split, "image_size": image_size},
                "steps_after_success": success_steps, "demo_seed": seed, "action_noise": action_noise,
                "idle_steps_after_success": "kept" if keep_success_steps else "dropped"}
    if env == "twin":  # the twin's study domain may show another robot than its pretraining
        env_info["robot"] = robot_of(split)
    check_manifest(demo_dir, env_info)
    result, envs = {}, None
    try:
        for role, count in wanted.items():
            records = read_demo_records(demo_dir, role, image_size)
            have = sum(r["success"] for r in records)
            if have < count:
                envs = envs or make_vec_env(split, num_envs, image_size, seed, max_episode_steps, env=env)
                collect_set(envs, demo_dir, role, records, count, seed, success_steps, env_info)
                records = read_demo_records(demo_dir, role, image_size)
            result[role] = [r for r in records if r["success"]][:count]
    finally:
        if envs is not None:
            envs.close()
    return result


def collect_set(envs: Any, demo_dir: Path, role: str, records: list[dict[str, Any]], count: int,
                seed: int, success_steps: int, env_info: dict[str, Any]) -> None:
    """Fill the missing slots of one set until it holds `count` successful demonstrations."""
    have = sum(r["success"] for r in records)
    attempts, successes, frames, start = 0, 0, 0, time.perf_counter()  # this run's own
    bar = tqdm(total=count, initial=have, desc=f"{role} demonstrations ({env_info['env_kwargs']['split']})",
               unit="demo")
    try:
        while have < count:
            # Failed episodes stay on disk (success False), so a round may not be enough.
            for_round = missing_slots(records, count - have)
            for first in range(0, len(for_round), envs.num_envs):
                slots = for_round[first:first + envs.num_envs]
                ids = np.resize(episode_ids_of(slots, seed, role), envs.num_envs)  # pad a short chunk
                demos = collect_expert_demos(envs, ids, success_steps, env_info["action_noise"],
                                             np.random.default_rng([seed, ROLES.index(role), slots[0]]),
                                             env_info["idle_steps_after_success"] == "kept")[:len(slots)]
                write_chunk(demo_dir, role, slots, demos, env_info)
                records += [{"slot": s, "success": d.succeeded} for s, d in zip(slots, demos, strict=True)]
                new = sum(d.succeeded for d in demos)
                have, successes, attempts = have + new, successes + new, attempts + len(demos)
                frames += sum(len(d.actions) for d in demos)
                bar.update(min(new, count - bar.n))
                bar.set_postfix(expert_success=f"{successes / attempts:.0%}")
            if have < count and attempts >= 20 and successes < 0.1 * attempts:
                raise DemoError(f"the expert succeeded in only {successes} of {attempts} episodes "
                                f"on split {env_info['env_kwargs']['split']!r}")
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    tqdm.write(f"collected {attempts} {role} episodes ({frames} frames kept) in {seconds:.1f} s "
               f"({attempts / seconds:.2f} episodes/s) into {demo_dir}")


# ---------------------------------------------------------------------------- frames


@dataclass
class Frames:
    """Every step of a set of demonstrations, flattened. Images are read from disk on demand,
    or all at once when they fit comfortably in memory (the twin's small frames)."""

    files: list[Path]  # [F] the HDF5 file of each frame
    groups: list[str]  # [F] its trajectory group, e.g. "traj_12"
    steps: np.ndarray  # int [F] its index in the trajectory
    instructions: list[str]  # [F]
    actions: np.ndarray  # float32 [F, 7] env action space
    images: np.ndarray | None = None  # uint8 [F, H, W, 3] when loaded

    def __len__(self) -> int:
        return len(self.steps)

    def read_images(self, index: np.ndarray) -> np.ndarray:
        """uint8 [B, H, W, 3] for frames `index`."""
        if self.images is not None:
            return self.images[index]
        images = []
        for i in index:
            with h5py.File(self.files[i], "r") as f:
                images.append(f[self.groups[i]]["obs/sensor_data/camera/rgb"][self.steps[i]])
        return np.stack(images)

    def load(self, max_bytes: int = 2 * 2**30) -> Frames:
        """Read every image into memory if they take at most max_bytes (else stay lazy)."""
        if not len(self) or self.images is not None:
            return self
        with h5py.File(self.files[0], "r") as f:
            frame_bytes = f[self.groups[0]]["obs/sensor_data/camera/rgb"][0].nbytes
        if frame_bytes * len(self) <= max_bytes:
            by_group: dict[tuple[Path, str], np.ndarray] = {}
            for file in dict.fromkeys(self.files):
                with h5py.File(file, "r") as f:
                    by_group.update({(file, g): f[g]["obs/sensor_data/camera/rgb"][()] for g in f})
            self.images = np.stack([by_group[(file, group)][step] for file, group, step
                                    in zip(self.files, self.groups, self.steps, strict=True)])
        return self


def frames_of(records: list[dict[str, Any]]) -> Frames:
    """Flatten episodes into frames (the final observation of each has no action: left out)."""
    lengths = [len(r["actions"]) for r in records]
    return Frames(
        files=[r["file"] for r, n in zip(records, lengths, strict=True) for _ in range(n)],
        groups=[f"traj_{r['slot']}" for r, n in zip(records, lengths, strict=True) for _ in range(n)],
        steps=np.concatenate([np.arange(n) for n in lengths] or [np.zeros(0, dtype=int)]),
        instructions=[r["instruction"] for r, n in zip(records, lengths, strict=True) for _ in range(n)],
        actions=np.concatenate([r["actions"] for r in records] or [np.zeros((0, 7))]).astype(np.float32),
    )
