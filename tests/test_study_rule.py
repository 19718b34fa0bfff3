"""The rule of docs/STUDY_PROTOCOL.md (section 1), checked on the twin: the pretraining
(`pretrain`) shows every OOD factor, `ind` stays narrow along every OOD axis, and the exact
OOD combinations (held-out object pairs, held-out templates, the evaluation's overlay generators,
the unseen tables) appear in neither. Section 3: calibration ids are no evaluation's."""

from __future__ import annotations

import numpy as np
import pytest
from test_twin import tiny_words

import tasks as E
import twin_env as T
from common import calibration_episode_ids, evaluation_episode_ids

EPISODES = 3000
OOD_SPLITS = [s for s in E.SPLITS if s != "ind"]


@pytest.fixture(scope="module")
def broad() -> list[T.TwinEpisode]:
    return [T.decode_episode("pretrain", i) for i in range(EPISODES)]


def words(instructions) -> set[str]:
    return {w for text in instructions for w in text.split()}


def pairs(episodes) -> set[tuple[str, str]]:
    return {tuple(name.split()) for ep in episodes for name in ep.objects}  # (colour, shape)


def test_pretraining_shows_every_shape_and_colour_but_no_held_out_pair(broad) -> None:
    seen = pairs(broad)
    held_out = {tuple(name.split()) for name in T.UNSEEN_OBJECTS}
    assert not seen & held_out
    for shape in T.UNSEEN_SHAPES:  # each with several colours, and the other way round
        assert len({c for c, s in seen if s == shape}) >= 4, shape
    for colour in T.UNSEEN_COLOURS:
        assert len({s for c, s in seen if c == colour}) >= 4, colour
    assert {c for c, _ in seen} == set(T.COLOURS) and {s for _, s in seen} == set(T.SHAPES)
    # two-object scenes often share a shape or a colour: both words must be read
    two = [ep.objects for ep in broad if len(ep.objects) == 2]
    share = np.mean([a.split()[0] == b.split()[0] or a.split()[1] == b.split()[1] for a, b in two])
    assert 0.4 < share < 0.9, share


def test_pretraining_shows_every_receptacle_as_a_target_and_scenes_of_two(broad) -> None:
    assert {ep.receptacles[0] for ep in broad} == set(T.RECEPTACLES)
    kinds = {(len(ep.objects), len(ep.receptacles)) for ep in broad}
    assert kinds == {(1, 1), (1, 2), (2, 1), (2, 2)}


def test_pretraining_templates_hold_every_verb_and_frame_but_no_held_out_pair(broad) -> None:
    used = {ep.template for ep in broad}
    assert used == set(E.PRETRAIN_TEMPLATES) and not used & set(E.UNSEEN_TEMPLATES)
    assert E.TRAIN_TEMPLATE not in E.UNSEEN_TEMPLATES and len(set(E.UNSEEN_TEMPLATES)) == 16
    for verb in range(len(E.VERBS)):
        assert any(E.template(verb, f) in used for f in range(len(E.FRAMES))), E.VERBS[verb]
    for frame in range(len(E.FRAMES)):
        assert any(E.template(v, frame) in used for v in range(len(E.VERBS))), E.FRAMES[frame]


def test_every_word_of_every_split_is_one_tokenizer_piece_and_seen_in_pretraining(broad) -> None:
    vocabulary = tiny_words()
    pretraining = words(ep.instruction for ep in broad)
    for split in E.SPLITS:
        used = words(T.decode_episode(split, i).instruction for i in range(400))
        assert used <= vocabulary, (split, used - vocabulary)
        assert used <= pretraining, (split, used - pretraining)


def test_pretraining_tables_are_its_own_and_of_every_family(broad) -> None:
    tables = {ep.table for ep in broad}
    assert not tables & (set(T.TRAIN_TABLES) | set(T.UNSEEN_TABLES))
    # the families of the unseen tables (stripes, dots, bricks, rings, plaid) appear too
    assert {index % 9 for index in tables} == set(range(9))


def test_pretraining_varies_positions_start_poses_and_moves_the_target(broad) -> None:
    grid = {(round(x, 6), round(y, 6)) for x, y in T.GRID_POINTS}
    targets = np.array([ep.object_xy[0] for ep in broad])
    assert not any((round(x, 6), round(y, 6)) in grid for x, y in targets), "continuous, not the grid"
    outside = ((targets[:, 0] < T.GRID_X[0]) | (targets[:, 0] > T.GRID_X[-1])
               | (targets[:, 1] < T.GRID_Y[0]) | (targets[:, 1] > T.GRID_Y[-1]))
    assert 0.05 < outside.mean() < 0.8  # where unseen_position puts the target, among others
    away = np.mean([ep.gripper_xy != T.GRIPPER_HOME for ep in broad])
    assert 0.3 < away < 0.7
    moved = [ep for ep in broad if ep.reposition_xy is not None]
    assert 0.15 < len(moved) / len(broad) < 0.35
    assert len({ep.reposition_step for ep in moved}) >= 8


def test_a_jump_in_pretraining_can_take_the_target_out_of_the_gripper() -> None:
    # Played by the expert, some jumps come while the target is held: it must leave the
    # gripper and end where the episode says, and the expert still succeeds.
    ids = [ep.episode_id for ep in (T.decode_episode("pretrain", i) for i in range(600))
           if ep.reposition_xy is not None][:64]
    env = T.TwinVecEnv("pretrain", len(ids), 32)
    env.reset(options={"episode_ids": np.array(ids)})
    held_at_jump = 0
    for t in range(env.max_episode_steps):
        jumping = np.array([ep.reposition_step == t for ep in env.episodes])
        was_held = env.held == 0
        *_, info = env.step(env.expert_action())
        for i in np.flatnonzero(jumping & was_held):
            held_at_jump += 1
            assert env.held[i] == -1 or env.gripper_closed[i]  # dropped first; the expert re-grasps later
        if t == 0:
            assert not (jumping & was_held).any()
    assert held_at_jump >= 3, held_at_jump
    assert info["success"].mean() >= 0.95


def test_pretraining_overlays_come_from_generators_of_their_own(monkeypatch) -> None:
    # The evaluation's generators (texture_*, noise_*) are never called for pretraining frames,
    # and the pretraining's own overlays change the pixels they claim: texture on the gripper and
    # object pixels only, noise everywhere.
    def forbidden(*_args, **_kwargs):
        raise AssertionError("an evaluation generator drew a pretraining frame")
    monkeypatch.setattr(T, "random_pattern", forbidden)
    monkeypatch.setattr(T, "random_noise", forbidden)
    episodes = [T.decode_episode("pretrain", i) for i in range(300)]
    for kind in ("texture", "noise"):
        ids = [ep.episode_id for ep in episodes if ep.overlay == kind][:8]
        assert len(ids) == 8
        env = T.TwinVecEnv("pretrain", 8, 64)
        obs, _ = env.reset(options={"episode_ids": np.array(ids)})
        clean, labels = env.render_frame()
        changed = (obs["image"] != clean).any(axis=-1)  # [N, H, W]
        if kind == "texture":
            assert not changed[labels < T.LABEL_OBJECT].any() and changed[labels >= T.LABEL_OBJECT].mean() > 0.5
        else:
            assert changed.mean() > 0.5
    alphas = [ep.overlay_alpha for ep in episodes if ep.overlay]
    assert min(alphas) < 0.2 and max(alphas) > 0.5


def test_ind_stays_narrow_along_every_ood_axis() -> None:
    grid = {(round(x, 6), round(y, 6)) for x, y in T.GRID_POINTS}
    for i in range(500):
        ep = T.decode_episode("ind", i)
        assert ep.objects[0] in T.TRAIN_OBJECTS and ep.receptacles == [T.TRAIN_RECEPTACLE]
        assert ep.template == E.TRAIN_TEMPLATE and ep.table in T.TRAIN_TABLES
        assert all((round(x, 6), round(y, 6)) in grid for x, y in ep.object_xy + ep.receptacle_xy)
        assert ep.gripper_xy == T.GRIPPER_HOME and ep.reposition_xy is None and ep.overlay is None


def test_ood_factors_are_absent_from_ind_and_present_in_pretraining(broad) -> None:
    # What each semantic split brings that `ind` lacks is shown by the broad pretraining.
    ind = [T.decode_episode("ind", i) for i in range(500)]
    for split in ("unseen_objects", "multi_object_unseen", "unseen_receptacles", "distractor_receptacle",
                  "multi_receptacle", "unseen_instructions"):
        ood = [T.decode_episode(split, i) for i in range(300)]
        for part in (lambda e: {w for n in e.objects for w in n.split()}, lambda e: set(e.receptacles),
                     lambda e: set(e.template.split())):
            novel = set().union(*map(part, ood)) - set().union(*map(part, ind))
            assert novel <= set().union(*map(part, broad)), (split, novel)


def test_calibration_ids_are_no_evaluation_ids() -> None:
    calibration = calibration_episode_ids("ind", 256)
    assert len(set(calibration)) == 256
    np.testing.assert_array_equal(calibration, calibration_episode_ids("ind", 256))  # a pure function
    evaluation = np.concatenate([evaluation_episode_ids(s, "ind", 256) for s in range(100)])
    assert not set(calibration) & set(evaluation)
    assert (T.decode_episode("ind", int(calibration[0])).objects[0] in T.TRAIN_OBJECTS)


def test_the_study_domain_knobs_change_the_study_splits_only(monkeypatch) -> None:
    # The calibration knobs of the study's domain (gripper look and step) act on ind and the OOD
    # splits and leave pretraining as it was; the expert still solves the study under them.
    monkeypatch.setattr(T, "STUDY_STEP", 0.08)
    monkeypatch.setattr(T, "STUDY_GRIPPER_COLOUR", (200, 40, 200))
    for split, step, colour in (("ind", 0.08, (200, 40, 200)), ("reposition", 0.08, (200, 40, 200)),
                                ("pretrain", T.STEP, T.GRIPPER_COLOUR)):
        env = T.TwinVecEnv(split, 32, 64)
        obs, _ = env.reset(options={"episode_ids": np.arange(32)})
        gripper = env.segmentation == T.LABEL_GRIPPER
        assert (obs["image"][gripper] == colour).all() or split == "pretrain" and \
            (env.render_frame()[0][gripper] == colour).all()
        before = env.gripper_xy.copy()
        move = np.zeros((32, 7), np.float32)
        move[:, 0], move[:, 6] = 1.0, 1.0
        env.step(move)
        moved = env.gripper_xy[:, 0] - before[:, 0]
        np.testing.assert_allclose(moved[before[:, 0] < 1 - step], step)
        env.reset(options={"episode_ids": np.arange(32)})
        for _ in range(env.max_episode_steps):
            *_, info = env.step(env.expert_action())
        assert info["success"].all(), split
