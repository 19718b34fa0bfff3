"""Tests of twin_env.py, the 2D twin of the task family (pure numpy, no simulator).

1. catalogue and episode decoding: disjoint assets, feasible layouts, pretrain vs OOD splits
2. the gymnasium vector-env interface: spaces, dtypes, horizon, no auto-reset, seeding
3. mechanics and reward: grasping rules, the potential reward on a scripted episode
4. the scripted expert on every split, a random policy on ind
5. each split changes what it claims and nothing else, on frames and instructions, against the
   ind episode of the same id (the segmentation labels say which pixels are what)
"""

import ast
import importlib.util
from pathlib import Path

import gymnasium
import numpy as np
import pytest

import tasks as E
import twin_env as T
from envs import default_horizon, make_vec_env

ROOT = Path(__file__).resolve().parent.parent
SIZE = 64
IDS = np.arange(24)
OOD_SPLITS = [s for s in E.SPLITS if s != "ind"]
ALL_SPLITS = list(E.valid_splits("twin"))


def start(split: str, ids=IDS, size: int = SIZE, **kwargs) -> tuple[T.TwinVecEnv, dict]:
    env = T.TwinVecEnv(split, len(ids), size, **kwargs)
    obs, _ = env.reset(options={"episode_ids": np.asarray(ids)})
    return env, obs


def idle(n: int) -> np.ndarray:
    """Actions that change nothing: no move, gripper open."""
    actions = np.zeros((n, 7), dtype=np.float32)
    actions[:, 6] = 1.0
    return actions


# ------------------------------------------------------------------------------------------
# 1. Catalogue and episode decoding
# ------------------------------------------------------------------------------------------


def test_catalogue_sizes_and_disjointness():
    assert len(T.TRAIN_OBJECTS) == 16 and len(T.UNSEEN_OBJECTS) == 9
    assert not set(T.TRAIN_SHAPES) & set(T.UNSEEN_SHAPES)
    assert not set(T.TRAIN_COLOURS) & set(T.UNSEEN_COLOURS), "unseen objects: new shapes AND colours"
    assert T.TRAIN_RECEPTACLE not in T.UNSEEN_RECEPTACLES and len(T.UNSEEN_RECEPTACLES) >= 2
    assert set(T.TRAIN_TABLES) == set(range(16)) and set(T.UNSEEN_TABLES) == set(range(16, 21))
    assert min(T.PRETRAIN_TABLES) >= 21  # pretraining's own tables (what it shows: test_study_rule.py)
    assert set(T.SHAPES) >= set(T.TRAIN_SHAPES) | set(T.UNSEEN_SHAPES)


def tiny_words() -> set[str] | None:
    """The tiny tokenizer's TINY_WORDS, read from whichever top-level module defines it
    (importing it would cost seconds of torch)."""
    for path in sorted(ROOT.glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "TINY_WORDS":
                return set(node.value.func.value.value.split())
    return None


def test_training_and_pretraining_words_are_single_tokenizer_pieces():
    words = tiny_words()
    if words is None:
        pytest.skip("TINY_WORDS not found")
    names = [*T.TRAIN_OBJECTS, *T.PRETRAIN_OBJECTS, *T.PRETRAIN_RECEPTACLES]
    templates = [E.TRAIN_TEMPLATE, *E.PRETRAIN_TEMPLATES]
    used = {w for n in names for w in n.split()}
    used |= {w for t in templates for w in t.split() if not w.startswith("{")}
    assert used <= words, used - words


def test_every_layout_leaves_room_for_what_a_split_adds():
    """Exhaustive: after any ind layout (receptacle, object) a second object and a second
    receptacle can each be placed on the grid (multi_object_*, *_receptacle)."""
    for rec in map(tuple, T.GRID_POINTS):
        placed = [(rec, T.RECEPTACLE_CLEARANCE)]
        for obj in map(tuple, T.free_grid_points(T.OBJECT_CLEARANCE, placed)):
            both = placed + [(obj, T.OBJECT_CLEARANCE)]
            assert len(T.free_grid_points(T.OBJECT_CLEARANCE, both)) > 0
            assert len(T.free_grid_points(T.RECEPTACLE_CLEARANCE, both)) > 0
    for split in ALL_SPLITS:
        for i in range(200):
            T.decode_episode(split, i)


def test_decoding_is_deterministic_and_starts_from_ind():
    for split in ALL_SPLITS:
        a, b = T.decode_episode(split, 7), T.decode_episode(split, 7)
        assert a == b
    ind = T.decode_episode("ind", 7)
    assert T.decode_episode("unseen_table", 7).object_xy == ind.object_xy
    assert T.decode_episode("reposition", 7).objects == ind.objects


# ------------------------------------------------------------------------------------------
# 2. Interface
# ------------------------------------------------------------------------------------------


def test_interface_spaces_and_dtypes():
    n = 5
    env = make_vec_env("ind", n, image_size=SIZE, seed=1, env="twin")
    assert isinstance(env, gymnasium.vector.VectorEnv) and isinstance(env, T.TwinVecEnv)
    assert (env.num_envs, env.split, env.image_size) == (n, "ind", SIZE)
    assert env.max_episode_steps == T.TWIN_HORIZON == default_horizon("twin")
    assert env.metadata["autoreset_mode"] == gymnasium.vector.AutoresetMode.DISABLED
    assert env.single_action_space.shape == (7,) and env.single_action_space.dtype == np.float32
    assert env.action_space.shape == (n, 7)
    assert env.single_observation_space["image"].shape == (SIZE, SIZE, 3)

    obs, info = env.reset()
    assert env.observation_space.contains(obs)
    assert obs["image"].dtype == np.uint8 and obs["image"].shape == (n, SIZE, SIZE, 3)
    assert isinstance(obs["instruction"], tuple) and len(obs["instruction"]) == n
    assert info["episode_id"].dtype == np.int64 and info["episode_id"].shape == (n,)
    assert ((0 <= info["episode_id"]) & (info["episode_id"] < E.MAX_EPISODE_ID)).all()

    first = obs["image"].copy()
    obs2, reward, terminated, truncated, info = env.step(env.action_space.sample())
    np.testing.assert_array_equal(obs["image"], first)  # an observation is never overwritten
    assert env.observation_space.contains(obs2)
    assert reward.dtype == np.float32 and reward.shape == (n,)
    assert terminated.dtype == bool and not terminated.any()
    assert truncated.dtype == bool and truncated.shape == (n,) and not truncated.any()
    for key in ("success", "success_once", "grasped"):
        assert info[key].dtype == bool and info[key].shape == (n,)
    np.testing.assert_array_equal(info["episode_id"], env.episode_ids)
    env.close()
    assert env.closed


def test_truncation_at_the_horizon_and_no_auto_reset():
    env, _ = start("ind", ids=[1, 2], max_episode_steps=4)
    for t in range(1, 5):
        _, _, terminated, truncated, _ = env.step(idle(2))
        assert not terminated.any() and truncated.all() == (t == 4) and truncated.any() == (t == 4)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(idle(2))
    env.reset(options={"episode_ids": [1, 2]})
    env.step(idle(2))


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="valid splits"):
        T.TwinVecEnv("no_such_split", 2)
    env = T.TwinVecEnv("ind", 2)
    with pytest.raises(RuntimeError):
        env.step(idle(2))  # before reset
    env.reset()
    with pytest.raises(ValueError, match="shape"):
        env.step(np.zeros((3, 7), np.float32))
    with pytest.raises(ValueError, match="shape"):
        env.step(np.zeros((2, 6), np.float32))
    with pytest.raises(ValueError, match="episode_ids"):
        env.reset(options={"episode_ids": [1, 2, 3]})
    with pytest.raises(ValueError, match="valid splits"):
        env.set_split("no_such_split")


def test_seeding_draws_reproducible_ids():
    ids = lambda env, **kw: env.reset(**kw)[1]["episode_id"]  # noqa: E731
    a, b = T.TwinVecEnv("ind", 8, seed=3), T.TwinVecEnv("ind", 8, seed=3)
    np.testing.assert_array_equal(ids(a), ids(b))
    second = ids(a)
    assert not np.array_equal(second, ids(T.TwinVecEnv("ind", 8, seed=3))), "draws move on"
    np.testing.assert_array_equal(ids(a, seed=3), ids(T.TwinVecEnv("ind", 8, seed=3)))
    np.testing.assert_array_equal(ids(T.TwinVecEnv("ind", 8, seed=0), seed=3),
                                  ids(T.TwinVecEnv("ind", 8, seed=3)))
    assert not np.array_equal(ids(T.TwinVecEnv("ind", 8, seed=4)), ids(T.TwinVecEnv("ind", 8, seed=3)))


def test_set_split_switches_the_next_reset():
    env, ind = start("ind")
    env.set_split("unseen_table")
    assert env.split == "unseen_table"
    with pytest.raises(RuntimeError):
        env.step(idle(len(IDS)))  # the running episodes belonged to the old split
    obs, _ = env.reset(options={"episode_ids": IDS})
    _, fresh = start("unseen_table")
    np.testing.assert_array_equal(obs["image"], fresh["image"])
    assert not np.array_equal(obs["image"], ind["image"])


def test_same_id_same_start_different_ids_differ():
    _, a = start("ind")
    _, b = start("ind")
    np.testing.assert_array_equal(a["image"], b["image"])
    assert a["instruction"] == b["instruction"]
    _, c = start("ind", ids=IDS + 1000)
    assert all(not np.array_equal(x, y) for x, y in zip(a["image"], c["image"], strict=True))
    assert len(set(a["instruction"])) > 5, "instructions vary across ids"


@pytest.mark.parametrize("size", [48, 112])
def test_other_image_sizes(size):
    env, obs = start("multi_object_seen", ids=[0, 1], size=size)
    assert obs["image"].shape == (2, size, size, 3)
    assert (env.segmentation == T.LABEL_OBJECT).sum(axis=(1, 2)).min() > 0
    obs, *_ = env.step(env.expert_action())
    assert obs["image"].shape == (2, size, size, 3)


def test_the_gripper_is_dark_in_pretraining_grey_in_the_study_and_differs_open_and_closed():
    assert not np.array_equal(T.gripper_sprite(13, closed=False), T.gripper_sprite(13, closed=True))
    darkest_table = min(T.table_image(i, 32).min() for i in [*range(21), *T.PRETRAIN_TABLES])
    assert darkest_table > max(T.GRIPPER_COLOUR) + 40
    for split, colour in (("pretrain", T.GRIPPER_COLOUR), ("ind", T.STUDY_GRIPPER_COLOUR)):
        env, obs = start(split, ids=[0])
        assert (obs["image"][env.segmentation == T.LABEL_GRIPPER] == colour).all(), split
    assert T.STUDY_GRIPPER_COLOUR != T.GRIPPER_COLOUR  # the study domain's shift (docs/STUDY_PROTOCOL.md)
    actions = idle(1)
    actions[:, 6] = -1.0
    closed, *_ = env.step(actions)
    assert not np.array_equal(closed["image"], obs["image"])


# ------------------------------------------------------------------------------------------
# 3. Mechanics and reward
# ------------------------------------------------------------------------------------------


def toward(env: T.TwinVecEnv, xy, gripper: float) -> np.ndarray:
    """One action of env 0 toward xy (at most one step of travel)."""
    delta = (np.asarray(xy, dtype=float) - env.gripper_xy[0]) / T.STEP
    actions = idle(1)
    actions[0, :2], actions[0, 6] = delta / max(1.0, np.abs(delta).max()), gripper
    return actions


def reach(env: T.TwinVecEnv, xy, gripper: float) -> list[dict]:
    """Step toward xy until the gripper is on it; the infos."""
    infos = []
    while np.abs(env.gripper_xy[0] - xy).max() > 1e-6:
        infos.append(env.step(toward(env, xy, gripper))[4])
    return infos


def test_a_policy_acting_through_the_action_tokens_sees_the_experts_frames():
    """A cloned policy's actions are bin centres (+-0.996 for a whole step): the twin rounds
    moves to hundredths, so the expert's own actions, decoded from their tokens, visit the
    very frames of its demonstrations (unrounded, the gripper drifted 0.2 px a step and was
    drawn 1 px off after a few steps; docs/PRETRAINING.md: why the tiny VLA stalled there)."""
    from model import ActionTokenizer, NormStats

    tokenizer, stats = ActionTokenizer(32000), NormStats.identity()
    ids = list(range(16))
    expert, obs_e = start("pretrain", ids=ids)
    cloned, obs_c = start("pretrain", ids=ids)
    decoded = []
    for _ in range(12):
        actions = expert.expert_action()
        tokens = tokenizer.encode(stats.normalize(actions))
        decoded.append(stats.unnormalize(tokenizer.decode(tokens)))
        np.testing.assert_array_equal(obs_c["image"], obs_e["image"])
        obs_e = expert.step(actions)[0]
        obs_c = cloned.step(decoded[-1])[0]
    moves = np.abs(np.concatenate(decoded)[:, :2])
    assert 0.99 < moves.max() < 1.0, "whole steps decode to bin centres just under 1"
    np.testing.assert_array_equal(obs_c["image"], obs_e["image"])
    np.testing.assert_allclose(cloned.gripper_xy, expert.gripper_xy, atol=1e-9)


def test_moves_are_rounded_to_hundredths_of_a_step():
    env, _ = start("ind", ids=[3])
    home = env.gripper_xy[0].copy()
    actions = idle(1)
    actions[0, :2] = [0.996, -0.334]
    env.step(actions)
    np.testing.assert_allclose(env.gripper_xy[0], home + T.STEP * np.array([1.0, -0.33]), atol=1e-12)


def test_grasping_needs_closing_near_the_object():
    env, _ = start("ind", ids=[3])
    obj = env.object_xy[0, 0].copy()
    reach(env, obj + [1.2 * T.GRASP_RADIUS, 0], 1.0)
    assert not env.step(toward(env, env.gripper_xy[0], -1.0))[4]["grasped"][0], "too far"
    infos = reach(env, obj, -1.0)  # arriving closed: closing happened on nothing
    assert not any(info["grasped"][0] for info in infos) and env.held[0] == -1
    env.step(toward(env, obj + [0.8 * T.GRASP_RADIUS, 0], 1.0))  # open a little off centre
    info = env.step(toward(env, env.gripper_xy[0], -1.0))[4]
    assert info["grasped"][0]
    np.testing.assert_allclose(env.object_xy[0, 0], env.gripper_xy[0])  # snapped into the fingers
    reach(env, obj + [0.0, -0.2], -1.0)
    np.testing.assert_allclose(env.object_xy[0, 0], obj + [0.0, -0.2])  # carried
    info = env.step(toward(env, env.gripper_xy[0], 1.0))[4]
    assert not info["grasped"][0] and not info["success"][0]
    np.testing.assert_allclose(env.object_xy[0, 0], obj + [0.0, -0.2])  # dropped where it was


def test_potential_reward_of_a_scripted_episode():
    env, _ = start("ind", ids=[3])
    obj, rec = env.object_xy[0, 0].copy(), env.receptacle_xy[0].copy()
    rewards: list[float] = []

    def step(actions: np.ndarray) -> dict:
        _, reward, _, _, info = env.step(actions)
        rewards.append(float(reward[0]))
        return info

    while np.abs(env.gripper_xy[0] - obj).max() > 1e-6:
        step(toward(env, obj, 1.0))
    assert set(rewards) == {0.0}
    assert step(toward(env, obj, -1.0))["grasped"][0] and rewards[-1] == pytest.approx(0.1)
    for held_steps in (2, 3, 4, 5):  # the 5th held step in a row earns the second 0.1
        assert step(toward(env, obj, -1.0))["grasped"][0]
        assert rewards[-1] == pytest.approx(0.1 if held_steps == 5 else 0.0)
    while np.abs(env.gripper_xy[0] - rec).max() > T.STEP:
        assert step(toward(env, rec, -1.0))["grasped"][0] and rewards[-1] == 0.0
    info = step(toward(env, rec, 1.0))  # arrive and open: the object rests on the plate
    assert info["success"][0] and info["success_once"][0] and rewards[-1] == pytest.approx(1.0)
    assert sum(rewards) == pytest.approx(E.potential(True, True, True))
    step(toward(env, rec, 1.0))
    assert rewards[-1] == 0.0, "success is rewarded once"
    info = step(toward(env, rec, -1.0))  # picking it up again loses the success
    assert info["grasped"][0] and not info["success"][0] and info["success_once"][0]
    assert rewards[-1] == pytest.approx(-1.0)
    assert sum(rewards) == pytest.approx(E.potential(True, True, False))


def test_expert_returns_equal_the_final_potential():
    env, _ = start("multi_object_seen", ids=np.arange(64), size=32)
    returns = np.zeros(64)
    for _ in range(env.max_episode_steps):
        _, reward, _, _, info = env.step(env.expert_action())
        returns += reward
    final = [E.potential(r.grasped_once, r.held5_once, s)
             for r, s in zip(env.rewards, info["success"], strict=True)]
    np.testing.assert_allclose(returns, final, atol=1e-5)


# ------------------------------------------------------------------------------------------
# 4. Expert and random policy
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", ALL_SPLITS)
def test_expert_succeeds_on_every_split(split):
    env, _ = start(split, ids=np.arange(200), size=32)  # the expert reads the state, not pixels
    for _ in range(env.max_episode_steps):
        _, _, _, truncated, info = env.step(env.expert_action())
    assert truncated.all()
    assert info["success"].mean() >= 0.99, (split, info["success"].mean())


def test_random_policy_fails_on_ind():
    env, _ = start("ind", ids=np.arange(200), size=32)
    rng = np.random.default_rng(0)
    for _ in range(env.max_episode_steps):
        _, _, _, _, info = env.step(rng.uniform(-1, 1, (200, 7)).astype(np.float32))
    assert info["success_once"].mean() <= 0.02


# ------------------------------------------------------------------------------------------
# 5. Each split changes what it claims and nothing else (vs the ind episode of the same id)
# ------------------------------------------------------------------------------------------


def paired(split: str) -> tuple[dict, np.ndarray, dict, np.ndarray, T.TwinVecEnv]:
    """First frames of ind and of `split` for the same ids: (ind obs, ind labels, obs, labels)."""
    ind_env, ind = start("ind")
    env, obs = start(split)
    return ind, ind_env.segmentation.copy(), obs, env.segmentation.copy(), env


def same_where(a: np.ndarray, b: np.ndarray, where: np.ndarray) -> bool:
    return bool((a[where] == b[where]).all())


def test_unseen_table_changes_only_the_table():
    ind, ind_labels, obs, labels, env = paired("unseen_table")
    assert obs["instruction"] == ind["instruction"]
    np.testing.assert_array_equal(labels, ind_labels)
    assert same_where(obs["image"], ind["image"], labels != T.LABEL_TABLE)
    table = labels == T.LABEL_TABLE
    assert (obs["image"] != ind["image"]).any(axis=-1)[table].mean() > 0.5
    assert {ep.table for ep in env.episodes} <= set(T.UNSEEN_TABLES)


@pytest.mark.parametrize("split", ["texture_weak", "texture_strong"])
def test_texture_changes_only_gripper_and_object_pixels_at_every_step(split):
    ind, ind_labels, obs, labels, env = paired(split)
    assert obs["instruction"] == ind["instruction"]
    np.testing.assert_array_equal(labels, ind_labels)
    foreground = labels >= T.LABEL_OBJECT
    assert same_where(obs["image"], ind["image"], ~foreground)
    assert (obs["image"] != ind["image"]).any(axis=-1)[foreground].mean() > 0.5
    again, _ = env.reset(options={"episode_ids": IDS})
    np.testing.assert_array_equal(again["image"], obs["image"])  # fixed by (split, id, step)
    nxt, *_ = env.step(idle(len(IDS)))  # nothing moves, but the pattern is new
    assert not np.array_equal(nxt["image"][foreground], obs["image"][foreground])


@pytest.mark.parametrize("split", ["noise_weak", "noise_strong"])
def test_noise_changes_the_whole_image_at_every_step(split):
    ind, ind_labels, obs, labels, env = paired(split)
    assert obs["instruction"] == ind["instruction"]
    np.testing.assert_array_equal(labels, ind_labels)
    assert (obs["image"] != ind["image"]).any(axis=-1).mean() > 0.9
    nxt, *_ = env.step(idle(len(IDS)))
    assert (nxt["image"] != obs["image"]).any(axis=-1).mean() > 0.9


def test_unseen_objects_change_the_object_and_its_name_only():
    ind, ind_labels, obs, labels, env = paired("unseen_objects")
    for ep, a, b in zip(env.episodes, ind["instruction"], obs["instruction"], strict=True):
        assert ep.objects[0] in T.UNSEEN_OBJECTS and b == a.replace(
            T.decode_episode("ind", ep.episode_id).objects[0], ep.objects[0])
        assert b != a
    unchanged = (labels == ind_labels) & (labels != T.LABEL_OBJECT)
    assert same_where(obs["image"], ind["image"], unchanged)
    for i, ep in enumerate(env.episodes):  # the object is drawn in its new colour
        pixels = obs["image"][i][labels[i] == T.LABEL_OBJECT]
        assert (pixels == T.COLOURS[ep.objects[0].split()[0]]).all()


def test_unseen_receptacles_change_the_receptacle_and_its_name_only():
    ind, ind_labels, obs, labels, env = paired("unseen_receptacles")
    for ep, a, b in zip(env.episodes, ind["instruction"], obs["instruction"], strict=True):
        assert ep.receptacles[0] in T.UNSEEN_RECEPTACLES
        assert b == a.replace(T.TRAIN_RECEPTACLE, ep.receptacles[0])
    unchanged = (labels != T.LABEL_RECEPTACLE) & (ind_labels != T.LABEL_RECEPTACLE)
    assert same_where(obs["image"], ind["image"], unchanged)
    receptacle = (labels == T.LABEL_RECEPTACLE) & (ind_labels == T.LABEL_RECEPTACLE)
    assert (obs["image"] != ind["image"]).any(axis=-1)[receptacle].mean() > 0.5


def test_unseen_instructions_change_only_the_words():
    ind, _, obs, _, env = paired("unseen_instructions")
    np.testing.assert_array_equal(obs["image"], ind["image"])
    for ep, a, b in zip(env.episodes, ind["instruction"], obs["instruction"], strict=True):
        assert ep.template in E.UNSEEN_TEMPLATES and a != b
        assert ep.objects[0] in b and ep.receptacles[0] in b


@pytest.mark.parametrize("split", ["multi_object_seen", "distractor_receptacle"])
def test_distractors_are_added_on_the_table_and_the_target_is_kept(split):
    ind, ind_labels, obs, labels, env = paired(split)
    assert obs["instruction"] == ind["instruction"]
    added = T.LABEL_OBJECT if split == "multi_object_seen" else T.LABEL_RECEPTACLE
    changed = labels != ind_labels
    assert set(np.unique(ind_labels[changed])) <= {T.LABEL_TABLE}
    assert set(np.unique(labels[changed])) == {added}
    assert changed.sum(axis=(1, 2)).min() > 0, "every episode gets its distractor"
    assert same_where(obs["image"], ind["image"], ~changed)
    for ep in env.episodes:
        if split == "multi_object_seen":
            assert len(ep.objects) == 2 and ep.objects[1] in T.TRAIN_OBJECTS
        else:
            assert ep.receptacles[0] == T.TRAIN_RECEPTACLE and ep.receptacles[1] in T.UNSEEN_RECEPTACLES


@pytest.mark.parametrize("split", ["multi_object_unseen", "multi_receptacle"])
def test_two_unseen_things_one_named(split):
    ind, ind_labels, obs, labels, env = paired(split)
    kind = T.LABEL_OBJECT if split == "multi_object_unseen" else T.LABEL_RECEPTACLE
    others = (labels != kind) & (ind_labels != kind)
    assert same_where(obs["image"], ind["image"], others)
    for ep, text in zip(env.episodes, obs["instruction"], strict=True):
        names, catalogue = ((ep.objects, T.UNSEEN_OBJECTS) if kind == T.LABEL_OBJECT
                            else (ep.receptacles, T.UNSEEN_RECEPTACLES))
        assert len(set(names)) == 2 and set(names) <= set(catalogue)
        assert names[0] in text and names[1] not in text
        assert ep.template == E.TRAIN_TEMPLATE


def test_unseen_position_moves_only_the_target_out_of_the_grid():
    ind, ind_labels, obs, labels, env = paired("unseen_position")
    assert obs["instruction"] == ind["instruction"]
    neither = (labels != T.LABEL_OBJECT) & (ind_labels != T.LABEL_OBJECT)
    assert same_where(obs["image"], ind["image"], neither)
    x, y = env.object_xy[:, 0].T
    inside = (x >= T.GRID_X[0]) & (x <= T.GRID_X[-1]) & (y >= T.GRID_Y[0]) & (y <= T.GRID_Y[-1])
    assert not inside.any()
    assert ((labels == T.LABEL_OBJECT) != (ind_labels == T.LABEL_OBJECT)).any(axis=(1, 2)).all()


def test_unseen_robot_pose_moves_only_the_gripper():
    ind, ind_labels, obs, labels, env = paired("unseen_robot_pose")
    assert obs["instruction"] == ind["instruction"]
    neither = (labels != T.LABEL_GRIPPER) & (ind_labels != T.LABEL_GRIPPER)
    assert same_where(obs["image"], ind["image"], neither)
    distance = np.linalg.norm(env.gripper_xy - T.GRIPPER_HOME, axis=1)
    assert (distance >= T.ROBOT_POSE_MIN_DISTANCE).all()


def test_reposition_moves_the_target_right_before_its_step():
    ind_env, ind = start("ind")
    env, obs = start("reposition")
    for _ in range(T.REPOSITION_STEP + 1):  # frames 0..REPOSITION_STEP are the ind ones
        np.testing.assert_array_equal(obs["image"], ind["image"])
        assert obs["instruction"] == ind["instruction"]
        obs, *_ = env.step(idle(len(IDS)))
        ind, *_ = ind_env.step(idle(len(IDS)))
    moved = np.array([ep.reposition_xy for ep in env.episodes])
    np.testing.assert_allclose(env.object_xy[:, 0], moved)
    start_xy = ind_env.object_xy[:, 0]
    assert (np.linalg.norm(moved - start_xy, axis=1) >= T.REPOSITION_MIN_DISTANCE).all()
    labels, ind_labels = env.segmentation, ind_env.segmentation
    neither = (labels != T.LABEL_OBJECT) & (ind_labels != T.LABEL_OBJECT)
    assert same_where(obs["image"], ind["image"], neither)
    assert not np.array_equal(obs["image"], ind["image"])


def test_reposition_takes_a_held_target_out_of_the_gripper():
    env, _ = start("reposition", ids=np.arange(100), size=32)
    for _ in range(T.REPOSITION_STEP):
        env.step(env.expert_action())
    held = env.held == 0
    assert held.sum() > 5, "some episodes hold the target when it moves"
    env.step(env.expert_action())
    np.testing.assert_allclose(env.object_xy[held, 0], [env.episodes[i].reposition_xy
                                                        for i in np.nonzero(held)[0]])
    assert (env.held[held] == -1).all()


# ------------------------------------------------------------------------------------------
# Benchmark script (smoke run; the timing itself is never asserted)
# ------------------------------------------------------------------------------------------


def test_benchmark_script_runs():
    spec = importlib.util.spec_from_file_location("bench_twin_env", ROOT / "benchmarks" / "bench_twin_env.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.env_steps_per_second("ind", num_envs=4, image_size=32, steps=5) > 0
