"""Tests of envs.py (splits, reward, perturbations, the factory) and maniskill_env.py (episode
decoding, the ManiSkill scenes, the expert, the gymnasium vector env in worker processes).

The first groups check the pure-numpy parts and need no simulator. The last group builds small
ManiSkill scenes (slow: the first scene of a process starts SAPIEN's renderer, seconds on a
CPU; later ones reuse it). The twin's own tests are in test_twin.py.
"""

import gymnasium
import numpy as np
import pytest
from conftest import SIZE

import maniskill_env as M
import tasks as E
from envs import default_horizon, make_vec_env

IDS = range(60)


# ------------------------------------------------------------------------------------------
# envs.py: catalogue of splits, the factory, reward, perturbations (no simulator)
# ------------------------------------------------------------------------------------------


def test_splits_are_listed_in_order_with_their_dimension():
    assert list(E.SPLITS)[0] == "ind"
    dims = list(E.SPLITS.values())
    assert dims == sorted(dims, key=["ind", "vision", "semantics", "execution"].index)
    assert dims.count("vision") == 5 and dims.count("semantics") == 7 and dims.count("execution") == 3
    assert E.valid_splits("maniskill") == tuple(E.SPLITS)
    assert E.valid_splits("twin") == tuple(E.SPLITS) + ("pretrain",)


def test_the_factory_refuses_what_does_not_exist():
    with pytest.raises(ValueError, match="valid splits: ind, unseen_table"):
        make_vec_env("no_such_split", num_envs=1)
    with pytest.raises(ValueError, match="unknown split 'pretrain' for --env maniskill"):
        make_vec_env("pretrain", num_envs=1)  # the twin's own split
    with pytest.raises(ValueError, match="unknown env 'toy'"):
        make_vec_env("ind", num_envs=1, env="toy")
    with pytest.raises(ValueError, match="num_envs must be at least 1"):
        make_vec_env("ind", num_envs=0, env="twin")
    assert default_horizon("maniskill") == M.MAX_EPISODE_STEPS == 80
    twin = make_vec_env("pretrain", 2, SIZE, env="twin", max_episode_steps=7)
    assert (twin.split, twin.num_envs, twin.max_episode_steps) == ("pretrain", 2, 7)


def test_potential_reward_follows_the_paper():
    tracker = E.PotentialReward()
    grasped = [0, 1, 1, 1, 1, 1, 1, 0, 0, 0]
    success = [0, 0, 0, 0, 0, 0, 0, 1, 1, 0]
    rewards = [tracker.update(bool(g), bool(s)) for g, s in zip(grasped, success, strict=True)]
    np.testing.assert_allclose(rewards, [0, 0.1, 0, 0, 0, 0.1, 0, 1.0, 0, -1.0], atol=1e-9)
    assert tracker.success_once and tracker.grasped_once and tracker.held5_once
    assert sum(rewards) == pytest.approx(tracker.phi) == pytest.approx(0.2)
    # Success without ever grasping (e.g. pushed there) earns nothing.
    tracker = E.PotentialReward()
    assert tracker.update(False, True) == 0.0 and tracker.success_once


def test_blend_only_touches_the_mask():
    image = np.full((8, 8, 3), 100, np.uint8)
    mask = np.zeros((8, 8), bool)
    mask[2:4] = True
    out = E.blend(image, np.ones((8, 8, 3)), 0.5, mask)
    assert (out[mask] == 178).all() and (out[~mask] == 100).all()
    assert (E.blend(image, np.zeros((8, 8, 3)), 1.0) == 0).all()


def test_frame_perturbations_are_fixed_by_split_episode_and_step():
    def pattern(split, episode, step):
        return E.random_noise(E.frame_rng(split, episode, step), 16, 16)

    np.testing.assert_array_equal(pattern("noise_weak", 3, 2), pattern("noise_weak", 3, 2))
    for other in (("noise_weak", 3, 3), ("noise_weak", 4, 2), ("noise_strong", 3, 2)):
        assert not np.array_equal(pattern("noise_weak", 3, 2), pattern(*other))
    texture = E.random_pattern(E.frame_rng("texture_weak", 1, 0), 16, 24)
    assert texture.shape == (16, 24, 3) and 0 <= texture.min() and texture.max() <= 1


# ------------------------------------------------------------------------------------------
# maniskill_env.py: catalogue and episode decoding (no simulator)
# ------------------------------------------------------------------------------------------


def test_catalogue_sizes_and_disjointness():
    assert len(M.TRAIN_OBJECTS) == 16 and len(M.UNSEEN_OBJECTS) == 9
    assert len(M.OBJECTS) == 25, "object names must be unique"
    assert not set(M.TRAIN_OBJECT_NAMES) & set(M.UNSEEN_OBJECT_NAMES)
    train_shapes = {name.split()[-1] for name in M.TRAIN_OBJECT_NAMES}
    assert not train_shapes & {name.split()[-1] for name in M.UNSEEN_OBJECT_NAMES}, "unseen shapes are new"
    assert M.PLATE.name not in M.UNSEEN_RECEPTACLE_NAMES and len(M.UNSEEN_RECEPTACLE_NAMES) >= 4
    assert len(M.TRAIN_TABLES) == 16 and len(M.UNSEEN_TABLES) == 5
    assert not set(M.TRAIN_TABLES) & set(M.UNSEEN_TABLES)
    assert len(set(E.UNSEEN_TEMPLATES)) == 16 and E.TRAIN_TEMPLATE not in E.UNSEEN_TEMPLATES


def _xy_extent(part: M.Part) -> float:
    """Largest distance from the actor's z axis reached by a part (for the clearance radii)."""
    if part.kind == "hull":
        return float(np.linalg.norm(part.points[:, :2], axis=1).max())
    if part.kind == "box":
        c, s = np.cos(part.yaw), np.sin(part.yaw)
        corners = [(hx * c - hy * s, hx * s + hy * c) for hx in (-part.size[0], part.size[0])
                   for hy in (-part.size[1], part.size[1])]
        return float(max(np.hypot(part.pos[0] + dx, part.pos[1] + dy) for dx, dy in corners))
    reach = part.size[0] + (0 if part.upright or part.kind == "sphere" else part.size[1])
    return float(np.hypot(*part.pos[:2]) + reach)


def test_actors_fit_their_clearance_radius_and_the_gripper():
    for spec in M.OBJECTS.values():
        assert max(_xy_extent(p) for p in spec.parts) <= M.OBJECT_RADIUS, spec.name
        assert 0 < spec.grasp_height < spec.height <= 0.07, spec.name
    for spec in M.RECEPTACLES.values():
        assert max(_xy_extent(p) for p in spec.parts) <= M.RECEPTACLE_RADIUS, spec.name


def test_table_textures_differ():
    textures = [E.make_table_texture(i, size=32) for i in M.TRAIN_TABLES + M.UNSEEN_TABLES]
    assert all(t.shape == (32, 32, 4) and t.dtype == np.uint8 for t in textures)
    flat = {t.tobytes() for t in textures}
    assert len(flat) == len(textures)


def test_decoding_is_deterministic_and_depends_on_the_id():
    for split in E.SPLITS:
        assert M.decode_episode(split, 17) == M.decode_episode(split, 17)
    configs = {repr(M.decode_episode("ind", i)) for i in IDS}
    assert len(configs) > 50
    with pytest.raises(ValueError, match="valid splits"):
        M.decode_episode("pretrain", 1)


def _changed_fields(split: str, episode_id: int) -> set[str]:
    ep, base = M.decode_episode(split, episode_id), M.decode_episode("ind", episode_id)
    return {f for f in vars(ep) if f != "split" and getattr(ep, f) != getattr(base, f)}


# What each split may change relative to the in-distribution episode with the same id.
ALLOWED_CHANGES = {
    "ind": set(),
    "unseen_table": {"table"},
    "texture_weak": set(),  # same scene; the perturbation is applied to the rendered frames
    "texture_strong": set(),
    "noise_weak": set(),
    "noise_strong": set(),
    "unseen_objects": {"objects"},
    "unseen_receptacles": {"receptacles"},
    "unseen_instructions": {"template"},
    "multi_object_seen": {"objects", "object_xy", "object_yaw"},
    "multi_object_unseen": {"objects", "object_xy", "object_yaw"},
    "distractor_receptacle": {"receptacles", "receptacle_xy"},
    "multi_receptacle": {"receptacles", "receptacle_xy"},
    "unseen_position": {"object_xy", "object_yaw"},
    "unseen_robot_pose": {"robot_qpos"},
    "reposition": {"reposition_xy"},
}


@pytest.mark.parametrize("split", list(E.SPLITS))
def test_each_split_changes_only_what_it_claims(split):
    assert set(ALLOWED_CHANGES) == set(E.SPLITS)
    changed = set().union(*(_changed_fields(split, i) for i in IDS))
    assert changed == ALLOWED_CHANGES[split]


def test_every_instruction_fits_the_observation_space():
    space = gymnasium.spaces.Text(256, charset=M.INSTRUCTION_CHARSET)  # VecEnv's instruction space
    for split in E.SPLITS:
        for i in range(200):
            assert space.contains(M.decode_episode(split, i).instruction), (split, i)


def test_in_distribution_episodes_use_training_assets_on_the_grid():
    for i in IDS:
        ep = M.decode_episode("ind", i)
        assert ep.table in M.TRAIN_TABLES and ep.objects[0] in M.TRAIN_OBJECT_NAMES
        assert ep.receptacles == ["plate"] and ep.instruction == f"put {ep.objects[0]} on plate"
        assert ep.object_yaw[0] in M.TRAIN_YAWS and ep.reposition_xy is None
        for x, y in ep.object_xy + ep.receptacle_xy:
            assert min(abs(x - g) for g in M.GRID_X) < 1e-9 and min(abs(y - g) for g in M.GRID_Y) < 1e-9
        distance = np.hypot(*np.subtract(ep.object_xy[0], ep.receptacle_xy[0]))
        assert distance >= M.OBJECT_RADIUS + M.RECEPTACLE_RADIUS


def test_semantic_splits_use_unseen_assets_and_name_one_present_target():
    for i in IDS:
        assert M.decode_episode("unseen_table", i).table in M.UNSEEN_TABLES
        assert M.decode_episode("unseen_objects", i).objects[0] in M.UNSEEN_OBJECT_NAMES
        assert M.decode_episode("unseen_receptacles", i).receptacles[0] in M.UNSEEN_RECEPTACLE_NAMES
        assert M.decode_episode("unseen_instructions", i).template in E.UNSEEN_TEMPLATES
        for split, pool in [("multi_object_seen", M.TRAIN_OBJECT_NAMES), ("multi_object_unseen", M.UNSEEN_OBJECT_NAMES)]:
            ep = M.decode_episode(split, i)
            target, other = ep.objects
            assert target != other and {target, other} <= set(pool)
            assert target in ep.instruction and other not in ep.instruction
            assert np.hypot(*np.subtract(*ep.object_xy)) >= 2 * M.OBJECT_RADIUS
        ep = M.decode_episode("distractor_receptacle", i)
        assert ep.receptacles[0] == "plate" and ep.receptacles[1] in M.UNSEEN_RECEPTACLE_NAMES
        assert ep.receptacles[1] not in ep.instruction
        ep = M.decode_episode("multi_receptacle", i)
        target, other = ep.receptacles
        assert target != other and {target, other} <= set(M.UNSEEN_RECEPTACLE_NAMES)
        assert target in ep.instruction and other not in ep.instruction
        assert np.hypot(*np.subtract(*ep.receptacle_xy)) >= 2 * M.RECEPTACLE_RADIUS


def test_execution_splits():
    for i in IDS:
        ep = M.decode_episode("unseen_position", i)
        x, y = ep.object_xy[0]
        outside = max(M.GRID_X[0] - x, x - M.GRID_X[-1], M.GRID_Y[0] - y, y - M.GRID_Y[-1])
        assert outside >= M.OUTSIDE_MARGIN - 1e-9
        assert min(abs(ep.object_yaw[0] - y) for y in M.TRAIN_YAWS) > 0.3
        ep = M.decode_episode("unseen_robot_pose", i)
        assert np.abs(np.subtract(ep.robot_qpos[:7], M.REST_QPOS[:7])).min() >= 0.1
        ep = M.decode_episode("reposition", i)
        assert np.hypot(*np.subtract(ep.reposition_xy, ep.object_xy[0])) >= M.REPOSITION_MIN_DISTANCE


# ------------------------------------------------------------------------------------------
# Simulated scenes (slow: SAPIEN renders on the CPU)
# ------------------------------------------------------------------------------------------

OPEN = np.array([0, 0, 0, 0, 0, 0, 1], np.float32)  # stay, gripper open


@pytest.fixture(scope="module")
def ind_task():
    task = M.PutOnTask("ind", SIZE)
    yield task
    task.close()


def _run_expert(task: M.PutOnTask, episode_id: int, hold: int = 5) -> tuple[bool, float]:
    """Expert until success has held `hold` steps (or the horizon); returns success, return."""
    task.reset(episode_id)
    total, streak = 0.0, 0
    for _ in range(task.max_episode_steps):
        _, reward, _, info = task.step(task.expert_action())
        total += reward
        streak = streak + 1 if info["success"] else 0
        if streak >= hold:
            break
    return streak >= hold, total


@pytest.mark.slow
def test_a_scene_is_fixed_by_its_episode_id_and_matches_the_decoded_episode(ind_task):
    image_a, instruction_a = ind_task.reset(3)
    state_a = ind_task.state()
    assert image_a.shape == (SIZE, SIZE, 3) and image_a.dtype == np.uint8
    for _ in range(3):
        ind_task.step(np.array([0.5, 0.5, -0.5, 0, 0, 0, -1], np.float32))
    ind_task.reset(8)
    image_b, instruction_b = ind_task.reset(3)
    state_b = ind_task.state()
    assert instruction_a == instruction_b == M.decode_episode("ind", 3).instruction
    np.testing.assert_array_equal(image_a, image_b)
    np.testing.assert_allclose(state_a["target_pos"], state_b["target_pos"], atol=1e-6)
    np.testing.assert_allclose(state_a["qpos"], state_b["qpos"], atol=1e-6)
    other, _ = ind_task.reset(8)
    assert not np.array_equal(image_a, other)

    ind_task.reset(5)
    state, ep = ind_task.state(), M.decode_episode("ind", 5)
    np.testing.assert_allclose(state["target_pos"][:2], ep.object_xy[0], atol=1e-4)
    np.testing.assert_allclose(state["receptacle_pos"][:2], ep.receptacle_xy[0], atol=1e-4)
    on_table = [n for n, p in state["object_pos"].items() if p[2] > -0.1]
    assert on_table == [ep.objects[0]], "unused objects are parked off the table"


@pytest.mark.slow
def test_object_teleported_onto_receptacle_succeeds_without_reward(ind_task):
    ind_task.reset(4)
    ind_task.place_target_on_receptacle()
    rewards = []
    for _ in range(3):
        _, reward, done, info = ind_task.step(OPEN)
        rewards.append(reward)
    assert info["success"] and info["success_once"] and not info["grasped"] and not done
    assert sum(rewards) == 0.0, "success only pays once the object was grasped"
    ind_task.reset(4)
    _, _, _, info = ind_task.step(OPEN)
    assert not info["success"], "the object starts off the receptacle"


@pytest.mark.slow
def test_expert_solves_in_distribution_episodes(ind_task):
    for episode_id in (0, 1):
        success, total = _run_expert(ind_task, episode_id)
        assert success, f"expert failed ind episode {episode_id}"
        assert total == pytest.approx(1.2), "grasp + hold + success potentials"


@pytest.mark.slow
@pytest.mark.parametrize("split", ["texture_strong", "noise_weak"])
def test_dynamic_perturbations_change_every_frame(split, ind_task):
    clean = {i: ind_task.reset(i)[0] for i in (0, 1)}  # the perturbed splits share these scenes
    task = M.PutOnTask(split, SIZE)
    try:
        for episode_id, image in clean.items():
            first, _ = task.reset(episode_id)
            changed = np.any(first != image, axis=-1)
            if split.startswith("texture"):
                segmentation = task.scene.get_obs()["sensor_data"]["camera"]["segmentation"]
                robot_and_objects = np.isin(segmentation[0, ..., 0].numpy(), task.mask_ids)
                assert changed.any() and not changed[~robot_and_objects].any()
            else:
                assert changed.mean() > 0.9, "noise covers the whole image"
            second, _, _, _ = task.step(np.zeros(7, np.float32))
            assert np.any(second != first, axis=-1).mean() > 0.5 * changed.mean(), "a new pattern per frame"
            again, _ = task.reset(episode_id)
            np.testing.assert_array_equal(first, again)  # the same pattern on a re-run
    finally:
        task.close()


@pytest.mark.slow
def test_reposition_and_multi_object_scenes_and_the_expert_on_them(ind_task):
    task = M.PutOnTask("reposition", SIZE)
    try:
        task.reset(2)
        for _ in range(M.REPOSITION_STEP):
            task.step(OPEN)
        before = task.state()["target_pos"]
        task.step(OPEN)
        after = task.state()["target_pos"]
        assert np.hypot(*(after - before)[:2]) >= M.REPOSITION_MIN_DISTANCE
        np.testing.assert_allclose(after[:2], M.decode_episode("reposition", 2).reposition_xy, atol=0.01)
        success, _ = _run_expert(task, 2)
        assert success, "the expert must re-plan after the move"

        task.set_split("multi_object_unseen")  # the same task, the split's scene rebuilt
        _, instruction = task.reset(6)
        ep = M.decode_episode("multi_object_unseen", 6)
        on_table = {n: p for n, p in task.state()["object_pos"].items() if p[2] > -0.1}
        assert set(on_table) == set(ep.objects) and len(on_table) == 2
        for name, xy in zip(ep.objects, ep.object_xy, strict=True):
            np.testing.assert_allclose(on_table[name][:2], xy, atol=1e-4)
        assert ep.objects[0] in instruction
        success, _ = _run_expert(task, 6)
        assert success, "expert failed a multi-object episode"
    finally:
        task.close()


@pytest.mark.slow
def test_vec_env_interface_with_worker_processes():
    """The gymnasium vector env of envs.py: shapes, dtypes, fixed horizon, the robot-pose split
    in 2 workers, and set_split in the same workers (evaluate_ood.py's split loop)."""
    envs = make_vec_env("unseen_robot_pose", num_envs=2, image_size=SIZE, max_episode_steps=3,
                          num_workers=2)
    try:
        assert (envs.num_envs, envs.image_size, envs.max_episode_steps, envs.split) == (
            2, SIZE, 3, "unseen_robot_pose")
        assert len(envs.workers) == 2 and not envs.tasks
        obs, info = envs.reset(options={"episode_ids": [1, 2]})
        assert envs.observation_space.contains(obs)
        assert obs["image"].shape == (2, SIZE, SIZE, 3) and obs["image"].dtype == np.uint8
        assert obs["instruction"] == tuple(M.decode_episode("unseen_robot_pose", i).instruction for i in (1, 2))
        np.testing.assert_array_equal(info["episode_id"], [1, 2])
        for state, i in zip(envs.call_each("state"), (1, 2), strict=True):
            np.testing.assert_allclose(state["qpos"], M.decode_episode("unseen_robot_pose", i).robot_qpos, atol=1e-5)
            assert np.abs(state["qpos"][:7] - np.asarray(M.REST_QPOS[:7])).min() >= 0.1
        for t in range(3):
            obs, reward, terminated, truncated, info = envs.step(envs.expert_action())
            assert reward.dtype == np.float32 and reward.shape == (2,)
            assert terminated.dtype == np.bool_ and not terminated.any()
            assert truncated.dtype == np.bool_ and truncated.all() == (t == 2) and truncated.any() == (t == 2)
            assert set(info) == {"success", "success_once", "grasped", "episode_id"}
            np.testing.assert_array_equal(info["episode_id"], [1, 2])
        with pytest.raises(RuntimeError, match="call reset"):
            envs.step(np.zeros((2, 7), np.float32))
        with pytest.raises(ValueError, match="need 2 episode ids"):
            envs.reset(options={"episode_ids": [1, 2, 3]})
        envs.reset()  # ids drawn from the env's seeded generator
        assert len(set(envs.episode_ids)) == 2
        envs.set_split("unseen_objects")
        obs, _ = envs.reset(options={"episode_ids": [1, 2]})
        assert envs.split == "unseen_objects"
        assert obs["instruction"] == tuple(M.decode_episode("unseen_objects", i).instruction for i in (1, 2))
        for state, i in zip(envs.call_each("state"), (1, 2), strict=True):  # the rest pose again
            np.testing.assert_allclose(state["qpos"], M.decode_episode("unseen_objects", i).robot_qpos, atol=1e-5)
    finally:
        envs.close()
    assert not envs.workers
