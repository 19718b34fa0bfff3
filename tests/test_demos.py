"""demos.py: expert demonstrations on disk in ManiSkill's trajectory layout (readable by
ManiSkill's own loader), collected once and reused, resumable, checked; a fixed held-out set.
On the twin at SIZE px (the ManiSkill expert is tested in test_envs.py and test_sft.py)."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import SIZE

import demos
from demos import DemoError, drop_idle_steps, ensure_demos, frames_of
from envs import make_vec_env

HORIZON = 30


def collect(demo_dir: Path, train: int, heldout: int = 0, num_envs: int = 4, **kwargs) -> dict[str, list]:
    return ensure_demos(demo_dir, {"train": train, "heldout": heldout}, "twin", "ind", kwargs.pop("image_size", SIZE),
                        HORIZON, num_envs=num_envs, **kwargs)


def chunks(demo_dir: Path, role: str = "train") -> list[Path]:
    return sorted(demo_dir.glob(f"{role}-episodes_*.h5"))


def test_drop_idle_steps_keeps_motion_and_gripper_toggles() -> None:
    actions = np.array([
        [0.5, 0, 0, 0, 0, 0, 1],  # 5 cm: kept
        [0.05, 0, 0, 0, 0, 0, 1],  # 5 mm: idle
        [0, 0, 0, 0.8, 0, 0, 1],  # 0.08 rad: kept
        [0, 0, 0, 0, 0, 0, -1],  # gripper closes: kept
        [0, 0, 0, 0, 0, 0, -1],  # idle
        [0, 0, 0, 0, 0, 0, 1],  # opens: kept
    ])
    np.testing.assert_array_equal(drop_idle_steps(actions), [0, 2, 3, 5])


def test_missing_slots_fills_holes_first() -> None:
    records = [{"slot": s} for s in (0, 1, 3, 4, 7)]
    assert demos.missing_slots(records, 4) == [2, 5, 6, 8]


def test_demonstrations_are_maniskill_trajectories_with_json_sidecars(tmp_path: Path) -> None:
    records = collect(tmp_path, train=8, heldout=4)
    train = records["train"]
    assert [r["slot"] for r in train] == list(range(8)) and all(r["success"] for r in train)
    assert [p.name for p in chunks(tmp_path)] == ["train-episodes_000000-000003.h5",
                                                  "train-episodes_000004-000007.h5"]
    assert [p.name for p in chunks(tmp_path, "heldout")] == ["heldout-episodes_000000-000003.h5"]
    sidecar = json.loads(chunks(tmp_path)[0].with_suffix(".json").read_text())
    assert sidecar["env_info"]["env_id"] == "PutOnTwin-v1" and sidecar["env_info"]["max_episode_steps"] == HORIZON
    assert sidecar["env_info"]["env_kwargs"] == {"env": "twin", "split": "ind", "image_size": SIZE}
    episode = sidecar["episodes"][1]
    assert episode["episode_id"] == 1 and episode["reset_kwargs"] == {"options": {"episode_ids": [episode["episode_seed"]]}}
    with h5py.File(chunks(tmp_path)[0], "r") as f:
        traj = f["traj_1"]
        steps = episode["elapsed_steps"]
        images = traj["obs/sensor_data/camera/rgb"]
        assert images.dtype == np.uint8 and images.shape == (steps + 1, SIZE, SIZE, 3)
        assert traj["actions"].shape == (steps, 7) and traj["actions"].dtype == np.float32
        assert traj["success"][-1] and traj["truncated"][-1] and not traj["terminated"][()].any()
        first_image, first_action = images[0], traj["actions"][0]
    # Slot 1 shows its episode from the start, and the expert's first (non-idle) action there.
    envs = make_vec_env("ind", 1, SIZE, env="twin")
    obs, _ = envs.reset(options={"episode_ids": [episode["episode_seed"]]})
    np.testing.assert_array_equal(first_image, obs["image"][0])
    assert obs["instruction"][0] == episode["instruction"] == train[1]["instruction"]
    assert len(drop_idle_steps(envs.expert_action())) == 1, "precondition: the first step moves"
    np.testing.assert_array_equal(first_action, envs.expert_action()[0])
    # Until success every kept step moves, turns or toggles the gripper; from a successful state
    # the expert's (idle) steps are kept: the demonstration ends with success_steps - 1 of them.
    for r in train:
        with h5py.File(r["file"], "r") as f:
            success = f[f"traj_{r['slot']}"]["success"][()]
        after_success = np.concatenate([[False], success[:-1]])
        assert after_success[-5:].all() and after_success.sum() == 5, success
        assert len(drop_idle_steps(r["actions"][~after_success])) == (~after_success).sum()
        assert len(drop_idle_steps(r["actions"][after_success])) == 0, "the expert waits once done"


def test_idle_steps_after_success_can_be_dropped_as_before(tmp_path: Path) -> None:
    # As the shipped pretrained model's data were collected (pretrain_tiny.py).
    train = collect(tmp_path, train=4, keep_success_steps=False)["train"]
    assert all(len(drop_idle_steps(r["actions"])) == len(r["actions"]) for r in train)
    assert json.loads((tmp_path / "manifest.json").read_text())["idle_steps_after_success"] == "dropped"
    with pytest.raises(DemoError, match="idle_steps_after_success='dropped'"):
        collect(tmp_path, train=4)  # the default keeps them: not mixed into one data set


def test_demos_of_another_robot_are_never_mixed_in(tmp_path: Path, monkeypatch) -> None:
    # The twin's study domain may show another gripper than pretraining (twin_env.robot_of): a
    # directory collected with one is refused for the other; a manifest from before the key was
    # collected with pretraining's robot.
    import twin_env
    collect(tmp_path, train=2)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["robot"] == twin_env.robot_of("ind")
    monkeypatch.setattr(twin_env, "STUDY_GRIPPER_COLOUR", (200, 40, 40))
    with pytest.raises(DemoError, match="robot="):
        collect(tmp_path, train=2)
    monkeypatch.undo()
    del manifest["robot"]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    if twin_env.robot_of("ind") == twin_env.robot_of("pretrain"):
        collect(tmp_path, train=2)  # the study domain is pretraining's: the old directory still fits
    else:
        with pytest.raises(DemoError, match="robot="):
            collect(tmp_path, train=2)


def test_a_chunk_loads_with_maniskills_own_loader(tmp_path: Path) -> None:
    dataset_module = pytest.importorskip("mani_skill.trajectory.dataset")
    records = collect(tmp_path, train=4)["train"]
    dataset = dataset_module.ManiSkillTrajectoryDataset(str(chunks(tmp_path)[0]))
    frames = sum(r["elapsed_steps"] for r in records)
    assert dataset.obs["sensor_data"]["camera"]["rgb"].shape == (frames, SIZE, SIZE, 3)
    np.testing.assert_array_equal(dataset.actions, np.concatenate([r["actions"] for r in records]))
    ends = np.cumsum([r["elapsed_steps"] for r in records]) - 1
    assert dataset.success.shape == (frames,) and dataset.success[ends].all()
    assert dataset.truncated[ends].all() and dataset.truncated.sum() == len(records)
    assert len(dataset) == frames and dataset[0]["action"].shape == (7,)


def test_the_heldout_set_is_fixed_and_never_trained_on(tmp_path: Path) -> None:
    few = collect(tmp_path / "few", train=4, heldout=4)
    more = collect(tmp_path / "more", train=12, heldout=4)
    ids = {name: {role: [r["episode_seed"] for r in records[role]] for role in records}
           for name, records in (("few", few), ("more", more))}
    assert ids["few"]["heldout"] == ids["more"]["heldout"], "the same held-out episodes"
    for a, b in zip(few["heldout"], more["heldout"], strict=True):
        np.testing.assert_array_equal(a["actions"], b["actions"])
    assert ids["more"]["train"][:4] == ids["few"]["train"]
    assert not set(ids["more"]["train"]) & set(ids["more"]["heldout"])
    train_frames = frames_of(more["train"]).load()
    assert len(train_frames) == sum(len(r["actions"]) for r in more["train"])
    assert all(path.name.startswith("train-") for path in train_frames.files)
    heldout_images = {image.tobytes() for r in more["heldout"] for image in frames_of([r]).load().images}
    assert not any(image.tobytes() in heldout_images for image in train_frames.images)


def test_frames_read_the_same_images_lazily_and_loaded(tmp_path: Path) -> None:
    records = collect(tmp_path, train=4)["train"]
    lazy, loaded = frames_of(records), frames_of(records).load()
    assert lazy.images is None and loaded.images.shape == (len(lazy), SIZE, SIZE, 3)
    index = np.array([0, 5, len(lazy) - 1])
    np.testing.assert_array_equal(lazy.read_images(index), loaded.read_images(index))
    np.testing.assert_array_equal(loaded.actions, np.concatenate([r["actions"] for r in records]))
    assert frames_of(records).load(max_bytes=0).images is None, "too big: stays on disk"


def test_collection_resumes_after_interruption_without_losing_episodes(tmp_path: Path, monkeypatch) -> None:
    demo_dir = tmp_path / "demos"
    real, calls = demos.collect_expert_demos, []

    def interrupted_on_third_chunk(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(demos, "collect_expert_demos", interrupted_on_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        collect(demo_dir, train=16)  # 4 chunks of 4
    kept = {p.name: p.read_bytes() for p in chunks(demo_dir)}
    assert len(kept) == 2  # the two finished chunks are on disk
    # A crash in the middle of a write leaves a temp file, or an HDF5 file without its sidecar.
    (demo_dir / ".train-episodes_000008-000011.h5.tmp").write_bytes(b"half a file")
    (demo_dir / "train-episodes_000008-000011.h5").write_bytes(b"no sidecar yet")

    monkeypatch.setattr(demos, "collect_expert_demos", real)
    resumed = collect(demo_dir, train=16)["train"]
    assert not list(demo_dir.glob(".*.tmp"))
    assert all(demo_dir.joinpath(name).read_bytes() == data for name, data in kept.items())  # not redone
    assert [r["slot"] for r in resumed] == list(range(16))

    # Same episodes, same data as a collection that was never interrupted.
    fresh = collect(tmp_path / "fresh", train=16)["train"]
    assert [r["episode_seed"] for r in resumed] == [r["episode_seed"] for r in fresh]
    np.testing.assert_array_equal(np.concatenate([r["actions"] for r in resumed]),
                                  np.concatenate([r["actions"] for r in fresh]))


def test_more_demonstrations_extend_the_existing_ones(tmp_path: Path) -> None:
    first = collect(tmp_path, train=4)["train"]
    more = collect(tmp_path, train=8)["train"]
    assert [r["episode_seed"] for r in more[:4]] == [r["episode_seed"] for r in first]
    assert len(chunks(tmp_path)) == 2
    again = collect(tmp_path, train=8)["train"]  # enough on disk: nothing collected
    assert len(chunks(tmp_path)) == 2 and [r["slot"] for r in again] == [r["slot"] for r in more]


def test_corrupt_or_mismatched_demonstrations_are_refused(tmp_path: Path) -> None:
    demo_dir = tmp_path / "demos"
    collect(demo_dir, train=8)
    victim = chunks(demo_dir)[1]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # truncated
    with pytest.raises(DemoError, match=f"{victim.name} is corrupt or partial") as info:
        collect(demo_dir, train=8)
    assert "\n" not in str(info.value)
    assert victim.exists()  # never deleted behind the user's back

    with pytest.raises(DemoError, match=f"'image_size': {SIZE}"):  # other settings, same dir
        collect(demo_dir, train=8, image_size=2 * SIZE)
    with pytest.raises(DemoError, match="demo_seed=0"):
        collect(demo_dir, train=8, seed=1)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(DemoError, match="is a file"):
        collect(tmp_path / "a_file", train=8)
    (demo_dir / "manifest.json").write_text("{ half")
    with pytest.raises(DemoError, match="not valid JSON"):
        collect(demo_dir, train=8)


def test_episode_with_wrong_length_in_sidecar_is_refused(tmp_path: Path) -> None:
    collect(tmp_path, train=4)
    sidecar_path = chunks(tmp_path)[0].with_suffix(".json")
    sidecar = json.loads(sidecar_path.read_text())
    sidecar["episodes"][3]["elapsed_steps"] += 5
    sidecar_path.write_text(json.dumps(sidecar))
    with pytest.raises(DemoError, match="traj_3 images are uint8"):
        collect(tmp_path, train=4)
