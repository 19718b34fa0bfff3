"""Tests of envs.py: splits, determinism, reward, perturbations, expert.

The first group checks the pure-numpy parts (episode decoding, reward bookkeeping, idle-step
dropping) and needs no simulator. The second group builds small ManiSkill scenes (64 px); each
scene is built once per module because building one takes several seconds on a CPU.
"""

import numpy as np
import pytest

import envs as E

IDS = range(60)
SIZE = 64


# ------------------------------------------------------------------------------------------
# Catalogue and episode decoding (no simulator)
# ------------------------------------------------------------------------------------------


def test_splits_are_listed_in_order_with_their_dimension():
    assert list(E.SPLITS)[0] == "ind"
    dims = list(E.SPLITS.values())
    assert dims == sorted(dims, key=["ind", "vision", "semantics", "execution"].index)
    assert dims.count("vision") == 5 and dims.count("semantics") == 7 and dims.count("execution") == 3


def test_unknown_split_names_the_valid_ones():
    with pytest.raises(ValueError, match="valid splits: ind, unseen_table"):
        E.make_vec_env("no_such_split", num_envs=1)


def test_catalogue_sizes_and_disjointness():
    assert len(E.TRAIN_OBJECTS) == 16 and len(E.UNSEEN_OBJECTS) == 9
    assert len(E.OBJECTS) == 25, "object names must be unique"
    assert not set(E.TRAIN_OBJECT_NAMES) & set(E.UNSEEN_OBJECT_NAMES)
    train_shapes = {name.split()[-1] for name in E.TRAIN_OBJECT_NAMES}
    assert not train_shapes & {name.split()[-1] for name in E.UNSEEN_OBJECT_NAMES}, "unseen shapes are new"
    assert E.PLATE.name not in E.UNSEEN_RECEPTACLE_NAMES and len(E.UNSEEN_RECEPTACLE_NAMES) >= 4
    assert len(E.TRAIN_TABLES) == 16 and len(E.UNSEEN_TABLES) == 5
    assert not set(E.TRAIN_TABLES) & set(E.UNSEEN_TABLES)
    assert len(set(E.UNSEEN_TEMPLATES)) == 16 and E.TRAIN_TEMPLATE not in E.UNSEEN_TEMPLATES


def _xy_extent(part: E.Part) -> float:
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
    for spec in E.OBJECTS.values():
        assert max(_xy_extent(p) for p in spec.parts) <= E.OBJECT_RADIUS, spec.name
        assert 0 < spec.grasp_height < spec.height <= 0.07, spec.name
    for spec in E.RECEPTACLES.values():
        assert max(_xy_extent(p) for p in spec.parts) <= E.RECEPTACLE_RADIUS, spec.name


def test_table_textures_differ():
    textures = [E.make_table_texture(i, size=32) for i in E.TRAIN_TABLES + E.UNSEEN_TABLES]
    assert all(t.shape == (32, 32, 4) and t.dtype == np.uint8 for t in textures)
    flat = {t.tobytes() for t in textures}
    assert len(flat) == len(textures)


def test_decoding_is_deterministic_and_depends_on_the_id():
    for split in E.SPLITS:
        assert E.decode_episode(split, 17) == E.decode_episode(split, 17)
    configs = {repr(E.decode_episode("ind", i)) for i in IDS}
    assert len(configs) > 50


def _changed_fields(split: str, episode_id: int) -> set[str]:
    ep, base = E.decode_episode(split, episode_id), E.decode_episode("ind", episode_id)
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


def test_in_distribution_episodes_use_training_assets_on_the_grid():
    for i in IDS:
        ep = E.decode_episode("ind", i)
        assert ep.table in E.TRAIN_TABLES and ep.objects[0] in E.TRAIN_OBJECT_NAMES
        assert ep.receptacles == ["plate"] and ep.instruction == f"put {ep.objects[0]} on plate"
        assert ep.object_yaw[0] in E.TRAIN_YAWS and ep.reposition_xy is None
        for x, y in ep.object_xy + ep.receptacle_xy:
            assert min(abs(x - g) for g in E.GRID_X) < 1e-9 and min(abs(y - g) for g in E.GRID_Y) < 1e-9
        distance = np.hypot(*np.subtract(ep.object_xy[0], ep.receptacle_xy[0]))
        assert distance >= E.OBJECT_RADIUS + E.RECEPTACLE_RADIUS


def test_semantic_splits_use_unseen_assets_and_name_one_present_target():
    for i in IDS:
        assert E.decode_episode("unseen_table", i).table in E.UNSEEN_TABLES
        assert E.decode_episode("unseen_objects", i).objects[0] in E.UNSEEN_OBJECT_NAMES
        assert E.decode_episode("unseen_receptacles", i).receptacles[0] in E.UNSEEN_RECEPTACLE_NAMES
        assert E.decode_episode("unseen_instructions", i).template in E.UNSEEN_TEMPLATES
        for split, pool in [("multi_object_seen", E.TRAIN_OBJECT_NAMES), ("multi_object_unseen", E.UNSEEN_OBJECT_NAMES)]:
            ep = E.decode_episode(split, i)
            target, other = ep.objects
            assert target != other and {target, other} <= set(pool)
            assert target in ep.instruction and other not in ep.instruction
            assert np.hypot(*np.subtract(*ep.object_xy)) >= 2 * E.OBJECT_RADIUS
        ep = E.decode_episode("distractor_receptacle", i)
        assert ep.receptacles[0] == "plate" and ep.receptacles[1] in E.UNSEEN_RECEPTACLE_NAMES
        assert ep.receptacles[1] not in ep.instruction
        ep = E.decode_episode("multi_receptacle", i)
        target, other = ep.receptacles
        assert target != other and {target, other} <= set(E.UNSEEN_RECEPTACLE_NAMES)
        assert target in ep.instruction and other not in ep.instruction
        assert np.hypot(*np.subtract(*ep.receptacle_xy)) >= 2 * E.RECEPTACLE_RADIUS


def test_execution_splits():
    for i in IDS:
        ep = E.decode_episode("unseen_position", i)
        x, y = ep.object_xy[0]
        outside = max(E.GRID_X[0] - x, x - E.GRID_X[-1], E.GRID_Y[0] - y, y - E.GRID_Y[-1])
        assert outside >= E.OUTSIDE_MARGIN - 1e-9
        assert min(abs(ep.object_yaw[0] - y) for y in E.TRAIN_YAWS) > 0.3
        ep = E.decode_episode("unseen_robot_pose", i)
        assert np.abs(np.subtract(ep.robot_qpos[:7], E.REST_QPOS[:7])).min() >= 0.1
        ep = E.decode_episode("reposition", i)
        assert np.hypot(*np.subtract(ep.reposition_xy, ep.object_xy[0])) >= E.REPOSITION_MIN_DISTANCE


# ------------------------------------------------------------------------------------------
# Reward and demonstrations (no simulator)
# ------------------------------------------------------------------------------------------


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


def test_drop_idle_steps_keeps_motion_and_gripper_toggles():
    actions = np.array([
        [0.5, 0, 0, 0, 0, 0, 1],  # 5 cm: kept
        [0.05, 0, 0, 0, 0, 0, 1],  # 5 mm: idle
        [0, 0, 0, 0.8, 0, 0, 1],  # 0.08 rad: kept
        [0, 0, 0, 0, 0, 0, -1],  # gripper closes: kept
        [0, 0, 0, 0, 0, 0, -1],  # idle
        [0, 0, 0, 0, 0, 0, 1],  # opens: kept
    ])
    np.testing.assert_array_equal(E.drop_idle_steps(actions), [0, 2, 3, 5])


def test_blend_only_touches_the_mask():
    image = np.full((8, 8, 3), 100, np.uint8)
    mask = np.zeros((8, 8), bool)
    mask[2:4] = True
    out = E.blend(image, np.ones((8, 8, 3)), 0.5, mask)
    assert (out[mask] == 178).all() and (out[~mask] == 100).all()


# ------------------------------------------------------------------------------------------
# Simulated scenes
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ind_task():
    task = E.PutOnTask("ind", SIZE)
    yield task
    task.close()


def test_same_episode_id_gives_same_initial_state_and_image(ind_task):
    image_a, instruction_a = ind_task.reset(3)
    state_a = ind_task.state()
    for _ in range(3):
        ind_task.step(np.array([0.5, 0.5, -0.5, 0, 0, 0, -1], np.float32))
    ind_task.reset(8)
    image_b, instruction_b = ind_task.reset(3)
    state_b = ind_task.state()
    assert instruction_a == instruction_b
    np.testing.assert_array_equal(image_a, image_b)
    np.testing.assert_allclose(state_a["target_pos"], state_b["target_pos"], atol=1e-6)
    np.testing.assert_allclose(state_a["qpos"], state_b["qpos"], atol=1e-6)
    other, _ = ind_task.reset(8)
    assert not np.array_equal(image_a, other)


def test_scene_matches_the_decoded_episode(ind_task):
    ind_task.reset(5)
    state, ep = ind_task.state(), E.decode_episode("ind", 5)
    np.testing.assert_allclose(state["target_pos"][:2], ep.object_xy[0], atol=1e-4)
    np.testing.assert_allclose(state["receptacle_pos"][:2], ep.receptacle_xy[0], atol=1e-4)
    on_table = [n for n, p in state["object_pos"].items() if p[2] > -0.1]
    assert on_table == [ep.objects[0]], "unused objects are parked off the table"


def test_object_teleported_onto_receptacle_succeeds_without_reward(ind_task):
    ind_task.reset(4)
    ind_task.place_target_on_receptacle()
    rewards = []
    for _ in range(3):
        _, reward, done, info = ind_task.step(np.array([0, 0, 0, 0, 0, 0, 1], np.float32))
        rewards.append(reward)
    assert info["success"] and info["success_once"] and not info["grasped"] and not done
    assert sum(rewards) == 0.0, "success only pays once the object was grasped"
    ind_task.reset(4)
    _, _, _, info = ind_task.step(np.array([0, 0, 0, 0, 0, 0, 1], np.float32))
    assert not info["success"], "the object starts off the receptacle"


def _run_expert(task: E.PutOnTask, episode_id: int, hold: int = 5) -> tuple[bool, float]:
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


def test_expert_solves_in_distribution_episodes(ind_task):
    for episode_id in (0, 1):
        success, total = _run_expert(ind_task, episode_id)
        assert success, f"expert failed ind episode {episode_id}"
        assert total == pytest.approx(1.2), "grasp + hold + success potentials"


@pytest.fixture(scope="module")
def clean_images(ind_task):
    """First frames of a few in-distribution episodes: the perturbed splits share their scenes."""
    return {i: ind_task.reset(i)[0] for i in (0, 1)}


@pytest.mark.parametrize("split", ["texture_strong", "noise_weak"])
def test_dynamic_perturbations_change_every_frame(split, clean_images):
    task = E.PutOnTask(split, SIZE)
    try:
        for episode_id, clean in clean_images.items():
            first, _ = task.reset(episode_id)
            changed = np.any(first != clean, axis=-1)
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


def test_reposition_moves_the_target_at_its_step_and_expert_follows():
    task = E.PutOnTask("reposition", SIZE)
    try:
        task.reset(2)
        for _ in range(E.REPOSITION_STEP):
            task.step(np.array([0, 0, 0, 0, 0, 0, 1], np.float32))
        before = task.state()["target_pos"]
        task.step(np.array([0, 0, 0, 0, 0, 0, 1], np.float32))
        after = task.state()["target_pos"]
        assert np.hypot(*(after - before)[:2]) >= E.REPOSITION_MIN_DISTANCE
        np.testing.assert_allclose(after[:2], E.decode_episode("reposition", 2).reposition_xy, atol=0.01)
        success, _ = _run_expert(task, 2)
        assert success, "the expert must re-plan after the move"
    finally:
        task.close()


def test_multi_object_scene_holds_both_objects():
    task = E.PutOnTask("multi_object_unseen", SIZE)
    try:
        _, instruction = task.reset(6)
        ep = E.decode_episode("multi_object_unseen", 6)
        on_table = {n: p for n, p in task.state()["object_pos"].items() if p[2] > -0.1}
        assert set(on_table) == set(ep.objects) and len(on_table) == 2
        for name, xy in zip(ep.objects, ep.object_xy, strict=True):
            np.testing.assert_allclose(on_table[name][:2], xy, atol=1e-4)
        assert ep.objects[0] in instruction
        success, _ = _run_expert(task, 6)
        assert success, "expert failed a multi-object episode"
    finally:
        task.close()


def test_vec_env_interface_with_worker_processes():
    """DESIGN.md's VecEnv: shapes, dtypes, fixed horizon, and the robot-pose split in 2 workers."""
    with E.make_vec_env("unseen_robot_pose", num_envs=2, image_size=SIZE, max_episode_steps=3,
                        num_workers=2) as envs:
        assert (envs.num_envs, envs.image_size, envs.max_episode_steps, envs.split) == (
            2, SIZE, 3, "unseen_robot_pose")
        obs = envs.reset(episode_ids=[1, 2])
        assert obs["image"].shape == (2, SIZE, SIZE, 3) and obs["image"].dtype == np.uint8
        assert obs["instruction"] == [E.decode_episode("unseen_robot_pose", i).instruction for i in (1, 2)]
        for state, i in zip(envs.call("state"), (1, 2), strict=True):
            np.testing.assert_allclose(state["qpos"], E.decode_episode("unseen_robot_pose", i).robot_qpos, atol=1e-5)
            assert np.abs(state["qpos"][:7] - np.asarray(E.REST_QPOS[:7])).min() >= 0.1
        for t in range(3):
            obs, reward, done, info = envs.step(E.expert_action(envs))
            assert reward.dtype == np.float32 and reward.shape == (2,) and done.dtype == np.bool_
            assert done.all() == (t == 2)
            assert set(info) == {"success", "success_once", "grasped", "episode_id"}
            np.testing.assert_array_equal(info["episode_id"], [1, 2])
        with pytest.raises(RuntimeError, match="call reset"):
            envs.step(np.zeros((2, 7), np.float32))
        obs = envs.reset()  # ids drawn from the env's seeded RNG
        assert len(set(envs.episode_ids)) == 2
        # set_split rebuilds the scenes in the same workers (evaluate_ood.py's split loop).
        envs.set_split("unseen_objects")
        obs = envs.reset(episode_ids=[1, 2])
        assert envs.split == "unseen_objects"
        assert obs["instruction"] == [E.decode_episode("unseen_objects", i).instruction for i in (1, 2)]
        for state, i in zip(envs.call("state"), (1, 2), strict=True):  # the rest pose again
            np.testing.assert_allclose(state["qpos"], E.decode_episode("unseen_objects", i).robot_qpos, atol=1e-5)
