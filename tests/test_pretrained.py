"""The shipped pretrained tiny VLA (assets/tiny-openvla-twin, written by `make pretrain`): it
loads through the official-layout loader like OpenVLA-7B, acts, and is what its recipe
(pretrain_config.json) says it is."""

from __future__ import annotations

import importlib.util
import json
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import REPO, assert_one_line_error, run_cli

from common import build_agent, calibration_episode_ids, evaluate_policy, evaluation_episode_ids
from envs import make_vec_env
from model import build_tiny_vla
from twin_env import COLOURS, SHAPES, decode_episode

PRETRAINED = REPO / "assets" / "tiny-openvla-twin"


@pytest.fixture(scope="module")
def recipe() -> dict:
    return json.loads((PRETRAINED / "pretrain_config.json").read_text())


@pytest.fixture(scope="module")
def pretrained():
    return build_agent(str(PRETRAINED), critic=None, device="cpu")


def test_the_shipped_directory_is_small_and_in_the_official_layout() -> None:
    names = {p.name for p in PRETRAINED.iterdir()}
    assert {"config.json", "preprocessor_config.json", "model.safetensors.index.json", "tokenizer.json",
            "pretrain_config.json"} <= names, names
    assert any(name.endswith(".safetensors") for name in names), names
    size = sum(p.stat().st_size for p in PRETRAINED.iterdir())
    assert size < 20 * 2**20, f"{size / 2**20:.1f} MiB: the repo ships it"
    config = json.loads((PRETRAINED / "config.json").read_text())
    assert list(config["norm_stats"]) == ["twin_pretrain"]  # one dataset: no --unnorm-key needed


def test_it_is_the_model_its_recipe_made(pretrained, recipe: dict) -> None:
    # The same weights (fingerprint written at export) on the architecture pretrain_tiny.py builds.
    assert pretrained.base_fingerprint == recipe["fingerprint"]
    assert pretrained.image_size == recipe["args"]["image_size"]
    fresh, _ = build_tiny_vla(recipe["args"]["image_size"])
    loaded = sorted(p.numel() for n, p in pretrained.vla.named_parameters() if "lora_" not in n)
    assert loaded == sorted(p.numel() for p in fresh.parameters())


def test_it_acts_as_measured_at_export(pretrained, recipe: dict) -> None:
    # The held-out episodes pretrain_tiny.py evaluated, at its temperature: the success rate it
    # recorded, up to sampling noise (128 episodes: 3 standard errors <= 0.14). It plays calibration
    # ids now; the shipped model was measured on evaluation seed 1's, as its recipe says.
    count = recipe["args"]["eval_episodes"]
    ids = (calibration_episode_ids("pretrain", count) if recipe.get("episode_ids") == "calibration"
           else evaluation_episode_ids(1, "pretrain", count))
    torch.manual_seed(0)
    outcome = evaluate_policy(pretrained.as_policy(0.6), make_vec_env("pretrain", 64, pretrained.image_size,
                                                                     seed=1, env="twin"), ids)
    assert abs(outcome.success_rate - recipe["success"]["pretrain"]) <= 0.14, (outcome.success_rate, recipe)
    greedy = pretrained.act(np.zeros((2, pretrained.image_size, pretrained.image_size, 3), np.uint8),
                            ["put red cube on plate"] * 2, 0.0).actions
    assert greedy.shape == (2, 7) and np.isin(greedy[:, 6], (-1.0, 1.0)).all()


def test_grounding_frames_are_the_steps_where_only_the_names_tell_the_move(tmp_path) -> None:
    # Replayed through the twin, pretrain_tiny's grounding frames must be the first steps of a
    # two-object scene before its target is grasped and the first steps that carry it closed in
    # a two-receptacle scene, and nothing of a one-object, one-receptacle scene.
    from demos import ensure_demos
    from pretrain_tiny import Args, batch_indices, grounding_frames
    from twin_env import decode_episode
    window, carry_window, split = 2, 3, "pretrain"
    records = ensure_demos(tmp_path, {"train": 32}, "twin", split, 32, 30, num_envs=8)["train"]
    # A jump of the target (pretrain) makes "the grasp" ambiguous: the first close counts.
    # Compared here on the scenes without one.
    records = [r for r in records if decode_episode(split, r["episode_seed"]).reposition_xy is None]
    expected, kinds = [], set()
    for record in records:
        env = make_vec_env(split, 1, 32, seed=1, env="twin")
        env.reset(options={"episode_ids": [record["episode_seed"]]})
        objects, receptacles = len(env.episodes[0].objects), len(env.episodes[0].receptacles)
        kinds.add((objects, receptacles))
        grasped_at = None
        for t, action in enumerate(record["actions"]):
            if grasped_at is None and env.held[0] == 0:
                grasped_at = t - 1  # the close step before the first step that holds it
            expected.append((objects == 2 and grasped_at is None and t < window and action[6] > 0)
                            or (receptacles == 2 and grasped_at is not None and t <= grasped_at + carry_window
                                and action[6] < 0))
            env.step(action[None])
        env.close()
    assert {(1, 1), (2, 1), (1, 2)} <= kinds, "precondition: the episodes cover the scene kinds"
    grounding = grounding_frames(records, window, carry_window)
    np.testing.assert_array_equal(grounding, np.flatnonzero(expected))

    # The batches: grounding frames only during the first --grounding-steps, then the share asked;
    # in the second cycle the same with the name pairs (indices past the frames).
    args = Args(grounding_steps=5, grounding_share=0.5, base_steps=10, pair_steps=5)
    num_frames, rng, pairs = len(expected), np.random.default_rng(0), len(expected) + np.arange(40)
    no_jumps = np.zeros(0, dtype=int)
    for first, alone in ((0, 5), (10, 15)):
        chosen = grounding if first == 0 else pairs
        assert np.isin(batch_indices(rng, alone - 1, 64, num_frames, grounding, pairs, no_jumps, args), chosen).all()
        later = np.concatenate([batch_indices(rng, alone, 64, num_frames, grounding, pairs, no_jumps, args)
                                for _ in range(50)])
        share = np.isin(later, chosen).mean()  # half, + the rest's share of the grounding frames (pairs: none)
        assert share == 0.5 if first else 0.5 < share < 0.5 + 1.5 * len(chosen) / num_frames, share
        assert later.max() < num_frames + (len(pairs) if first else 0)


def test_jump_frames_are_the_frames_after_the_target_moved(tmp_path) -> None:
    # --jump-share draws from the frames whose observation shows the target where it jumped to:
    # the demonstration's actions replayed with and without the jump show the target in the same
    # place before them and elsewhere from the first of them on.
    from demos import ensure_demos
    from pretrain_tiny import Args, batch_indices, jump_frames
    records = ensure_demos(tmp_path, {"train": 24}, "twin", "pretrain", 32, 30, num_envs=8)["train"]
    jumps, expected = jump_frames(records), []
    for record in records:
        env = make_vec_env("pretrain", 2, 32, seed=1, env="twin")
        env.reset(options={"episode_ids": [record["episode_seed"]] * 2})
        env.reposition_step[1] = -1  # the second copy: no jump
        moved = False
        for action in record["actions"]:  # the target's position in each frame's observation
            moved = moved or not np.allclose(env.object_xy[0, 0], env.object_xy[1, 0])
            expected.append(moved)
            env.step(np.stack([action, action]))
        env.close()
    assert 0 < len(jumps) < len(expected), "precondition: some of the episodes jump, not all"
    np.testing.assert_array_equal(jumps, np.flatnonzero(expected))
    args = Args(grounding_steps=0, grounding_share=0.25, jump_share=0.5)
    grounding = np.flatnonzero(~np.array(expected))[:10]
    drawn = np.concatenate([batch_indices(np.random.default_rng(i), 1, 64, len(expected), grounding,
                                          np.zeros(0, dtype=int), jumps, args) for i in range(20)])
    assert 0.5 <= np.isin(drawn, jumps).mean() < 0.5 + 0.25 * 1.5 * len(jumps) / len(expected)


def test_a_name_pair_is_a_frame_and_its_twin_with_the_other_object_or_receptacle_named() -> None:
    # The twin must be what the expert does in the same state when the other one is the target:
    # the same episode with its two receptacles (objects) swapped, played to its first carrying
    # (first) frame, must show the same image and instruction and ask for the same action.
    from pretrain_tiny import name_pairs
    from twin_env import decode_episode
    plain = next(i for i in range(400) if not decode_episode("pretrain", i).objects[1:]
                 and not decode_episode("pretrain", i).receptacles[1:])
    assert len(name_pairs(np.array([plain]), 32, 3)[0]) == 0  # the names never decide
    receptacles = [i for i in range(400) if decode_episode("pretrain", i).receptacles[1:]
                   and not decode_episode("pretrain", i).objects[1:]][:5]
    objects = [i for i in range(400) if decode_episode("pretrain", i).objects[1:]
               and not decode_episode("pretrain", i).receptacles[1:]][:5]
    differ = 0
    for episode_id, kind in [(i, "receptacle") for i in receptacles] + [(i, "object") for i in objects]:
        images, instructions, actions, counts = name_pairs(np.array([episode_id]), 32, 3)
        assert counts[f"{kind}_pairs"] == len(images) // 2 >= (2 if kind == "receptacle" else 1)
        assert counts["object_pairs" if kind == "receptacle" else "receptacle_pairs"] == 0
        np.testing.assert_array_equal(images[0::2], images[1::2])
        assert (actions[0::2, 6] < 0).all() if kind == "receptacle" else (actions[0::2, 6] >= 0).all()
        env = make_vec_env("pretrain", 1, 32, env="twin")
        obs, _ = env.reset(options={"episode_ids": [episode_id]})
        if kind == "object":  # the first pair: the first frame, as it is
            np.testing.assert_array_equal(obs["image"][0], images[1])
        for things in ((env.episodes[0].receptacles, env.episodes[0].receptacle_xy) if kind == "receptacle"
                       else (env.episodes[0].objects, env.episodes[0].object_xy)):
            things.reverse()
        env._load_state()
        while kind == "receptacle" and env.held[0] != 0:
            obs, *_ = env.step(env.expert_action())
        if kind == "receptacle":  # the first carrying frame: before it nothing depends on the receptacle
            np.testing.assert_array_equal(obs["image"][0], images[1])
        assert instructions[1] == env.episodes[0].instruction != instructions[0]
        np.testing.assert_array_equal(env.expert_action()[0], actions[1])
        differ += not np.array_equal(actions[0], actions[1])
    assert differ >= 6, "precondition: the two things mostly ask for different moves"


def test_a_fixed_set_of_demonstrations_runs_both_cycles_from_disk(tmp_path) -> None:
    # --fresh-demos 0: one set of demonstrations on disk, shared by the ranks and reused by the next
    # run; the second cycle starts from the first's weights, which the recipe records.
    import pretrain_tiny
    small = dict(pairs_from_start=False, fresh_demos=0, num_demos=24, heldout_demos=4, image_size=32, batch_size=8,
                 warmup_steps=1, eval_every=100, eval_episodes=4, save_every=100, grounding_steps=1, base_steps=3,
                 pair_steps=2, pair_mix_steps=2, demo_dir=str(tmp_path / "demos"))
    pretrain_tiny.main(pretrain_tiny.Args(**small, output=str(tmp_path / "model"), run_dir=str(tmp_path / "run")))
    made = json.loads((tmp_path / "model" / "pretrain_config.json").read_text())
    assert made["base_fingerprint"] not in (None, made["fingerprint"]) and made["receptacle_pairs"] > 0
    assert made["object_pairs"] > 0
    assert list((tmp_path / "demos").glob("train-*.h5")), "the set is on disk, for the next run"
    with pytest.raises(ValueError, match="--image-size must be a multiple of"):
        pretrain_tiny.check_args(pretrain_tiny.Args(**{**small, "image_size": 40}))


ONE_CYCLE_OF_PAIRS = dict(pairs_from_start=True, grounding_steps=0, base_steps=8, pair_steps=0, pair_mix_steps=0,
                          jump_share=0.25)


@pytest.mark.parametrize("recipe", [{}, ONE_CYCLE_OF_PAIRS], ids=["two-cycles", "one-cycle-of-pairs"])
def test_a_streamed_pretraining_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path, monkeypatch, recipe) -> None:
    # --fresh-demos: each rank collects new demonstrations every --fresh-every steps and drops its
    # oldest. A run interrupted after a refresh (and after the second cycle began) rebuilds what it
    # held (the stream is a function of seed, rank and batch number) and ends on the same weights.
    import pretrain_tiny
    small = dict(pairs_from_start=False, action_noise=0.2, fresh_demos=8, num_demos=16, fresh_every=3,
                 heldout_demos=4, image_size=32, batch_size=8, warmup_steps=1, eval_every=100, eval_episodes=4,
                 save_every=1, grounding_steps=1, base_steps=4, pair_steps=2, pair_mix_steps=2,
                 demo_dir=str(tmp_path / "demos"))
    small.update(recipe)
    whole = pretrain_tiny.Args(**small, output=str(tmp_path / "whole"), run_dir=str(tmp_path / "run_whole"))
    pretrain_tiny.main(whole)

    loss, calls = pretrain_tiny.action_token_loss, []

    def interrupted_at_step_six(*args, **kwargs):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return loss(*args, **kwargs)
    parts = pretrain_tiny.Args(**small, output=str(tmp_path / "parts"), run_dir=str(tmp_path / "run_parts"))
    monkeypatch.setattr(pretrain_tiny, "action_token_loss", interrupted_at_step_six)
    with pytest.raises(KeyboardInterrupt):
        pretrain_tiny.main(parts)
    monkeypatch.setattr(pretrain_tiny, "action_token_loss", loss)
    pretrain_tiny.main(pretrain_tiny.Args(**{**small, "resume": True}, output=parts.output, run_dir=parts.run_dir))

    made = {name: json.loads((tmp_path / name / "pretrain_config.json").read_text()) for name in ("whole", "parts")}
    assert made["parts"]["fingerprint"] == made["whole"]["fingerprint"]
    if recipe:  # one cycle: the pairs held are its grounding frames, and no second cycle
        assert made["whole"]["base_fingerprint"] is None and "object_pairs" not in made["whole"]
        assert made["whole"]["grounding_frames"] > 0 and made["whole"]["jump_frames"] > 0
    else:
        assert made["parts"]["base_fingerprint"] == made["whole"]["base_fingerprint"] is not None
        assert made["whole"]["receptacle_pairs"] > 0 and made["whole"]["object_pairs"] > 0
    held = pretrain_tiny.fresh_demonstrations(make_twin_envs(), 2, 1, pretrain_tiny.Args(**small))
    assert held and all(len(d.images) == len(d.actions) == len(d.instructions) for d in held)
    assert [d.pairs > 0 for d in held] == [False] * (len(held) - 1) + [bool(recipe)], "pairs last, if streamed"
    again = pretrain_tiny.fresh_demonstrations(make_twin_envs(), 2, 1, pretrain_tiny.Args(**small))
    assert all(np.array_equal(a.images, b.images) for a, b in zip(held, again, strict=True))
    other_rank = pretrain_tiny.fresh_demonstrations(make_twin_envs(), 2, 0, pretrain_tiny.Args(**small))
    assert {r["episode_seed"] for d in held for r in d.records}.isdisjoint(
        {r["episode_seed"] for d in other_rank for r in d.records})
    with pytest.raises(ValueError, match="multiple of --fresh-demos"):
        pretrain_tiny.check_args(pretrain_tiny.Args(**{**small, "num_demos": 12}))
    with pytest.raises(ValueError, match="--pairs-from-start .* needs --fresh-demos"):
        pretrain_tiny.check_args(pretrain_tiny.Args(**{**small, "fresh_demos": 0, "pairs_from_start": True}))


def make_twin_envs():
    return make_vec_env("pretrain", 8, 32, env="twin")


def test_the_breakdown_names_the_phase_a_failed_episode_got_to(monkeypatch: pytest.MonkeyPatch) -> None:
    # scripts/pretrain_breakdown.py: the expert succeeds everywhere; a gripper that only closes
    # where it starts never reaches a target placed away from it; a policy that carries
    # whatever it grasps to nowhere fails after grasping; success agrees with evaluate_policy.
    spec = importlib.util.spec_from_file_location("pretrain_breakdown", REPO / "scripts" / "pretrain_breakdown.py")
    breakdown = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "pretrain_breakdown", breakdown)  # dataclasses look their module up
    spec.loader.exec_module(breakdown)
    envs = make_vec_env("pretrain", 8, 32, seed=0, env="twin")
    ids = calibration_episode_ids("pretrain", 12)  # 8 + a padded batch of 4

    def expert(obs):
        return SimpleNamespace(actions=envs.expert_action())

    def grasp_then_stay(obs):  # the expert until it holds the target, then closed and still
        actions = envs.expert_action()
        actions[envs.held == 0] = [0, 0, 0, 0, 0, 0, -1]
        return SimpleNamespace(actions=actions)

    def close_in_place(obs):
        return SimpleNamespace(actions=np.tile(np.float32([0, 0, 0, 0, 0, 0, -1]), (envs.num_envs, 1)))

    assert breakdown.play(expert, envs, ids) == ["success"] * 12
    assert set(breakdown.play(grasp_then_stay, envs, ids)) == {"grasped the target, not placed"}
    assert set(breakdown.play(close_in_place, envs, ids)) <= {"never reached the target", "reached it, no grasp",
                                                              "grasped the other object only"}
    agent = build_agent(str(REPO / "assets" / "tiny-openvla-twin"), critic=None)
    torch.manual_seed(0)
    played = np.array(breakdown.play(agent.as_policy(0.6), envs, ids)) == "success"
    torch.manual_seed(0)
    assert np.array_equal(played, evaluate_policy(agent.as_policy(0.6), envs, ids).success)


def test_the_binding_probe_pairs_each_frame_with_the_other_object_named(monkeypatch: pytest.MonkeyPatch) -> None:
    # scripts/binding_probe.py: the twin of a frame names the other object and moves to it.
    spec = importlib.util.spec_from_file_location("binding_probe", REPO / "scripts" / "binding_probe.py")
    probe = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "binding_probe", probe)
    spec.loader.exec_module(probe)
    ids = probe.two_object_ids(10**6, 16)
    frames = probe.grounding_frames(ids, 1)
    assert len(frames["named"]) == len(frames["other_named"]) == len(frames["expert"]) > 0
    for i, (named, other) in enumerate(zip(frames["named"], frames["other_named"], strict=True)):
        first, second = decode_episode("pretrain", int(ids[i])).objects  # depth 1: frame i is scene i
        assert first in named and second in other and named != other
    # the expert from the other object's position, as in the env with the two objects swapped
    envs = make_vec_env("pretrain", len(ids), 64, env="twin")
    envs.reset(options={"episode_ids": ids})
    envs.object_xy[:, [0, 1]] = envs.object_xy[:, [1, 0]]
    np.testing.assert_array_equal(frames["other_expert"], envs.expert_action())
    assert (frames["other_expert"][:, :2] != frames["expert"][:, :2]).any()


def test_the_perception_probe_crops_each_target_its_raw_pixels_tell_the_shapes_and_its_towers_learn(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # scripts/perception_probe.py: the crop and the patch index are the target object's, so the
    # raw-pixel probe reads its shape far above chance (full run, 4096 frames: 96.4%, chance 12.7%).
    spec = importlib.util.spec_from_file_location("perception_probe", REPO / "scripts" / "perception_probe.py")
    probe = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "perception_probe", probe)
    spec.loader.exec_module(probe)
    assert list(probe.centre_patch(np.array([[0.99, 0.0], [0.0, 0.99], [0.3, 0.6]]), 64, 16)) == [3, 12, 9]
    frames = probe.first_frames(512, 64, 256)
    features = probe.object_crops(frames["images"], frames["xy"], 16)  # [N, 16 * 16 * 3] in [0, 1]
    crops = features.reshape(-1, 16, 16, 3) * 255
    colours = np.array(list(COLOURS.values()), dtype=np.float32)[frames["colour"]]  # [N, 3] the target's
    plain = [decode_episode("pretrain", int(i)).overlay is None for i in calibration_episode_ids("pretrain", 512)]
    near = np.abs(crops.numpy() - colours[:, None, None]).max(-1)[plain] <= 40  # [N', 16, 16]; no texture, noise
    assert near.sum((1, 2)).min() > 0, "every crop holds its target's colour"
    rows, cols = np.nonzero(near.sum(0))  # the target's pixels pooled over frames: around the centre
    weights = near.sum(0)[rows, cols]
    assert abs(np.average(rows, weights=weights) - 7.5) < 1.5 and abs(np.average(cols, weights=weights) - 7.5) < 1.5
    accuracy = probe.probe_accuracy(features, frames["shape"], len(SHAPES), probe.Args(steps=300))
    assert accuracy > 0.6, f"the raw crop tells the target's shape: {accuracy}"
    # the grid patch is the one under the target's centre: it holds some of the target's pixels
    where = probe.centre_patch(frames["xy"], 64, 16)
    cells = probe.grid_patches(frames["images"], where, 16).reshape(-1, 16, 16, 3).numpy() * 255
    assert (np.abs(cells - colours[:, None, None]).max(-1)[plain] <= 40).sum((1, 2)).min() > 0
    # the towers trained directly on the labels learn the colour from their centre token (chance ~15%)
    vla, _ = build_tiny_vla(64)
    trained = probe.trained_token_accuracy(vla, frames, probe.Args(train_steps=150, batch_size=64))
    assert trained["colour"] > 0.5, f"a direct signal teaches the towers the colour: {trained}"


@pytest.mark.parametrize(("script", "flags", "named"), [
    ("scripts/perception_probe.py", ("--frames", "4"), "--frames"),
    ("scripts/perception_probe.py", ("--model-path", "no/such/model"), "--model-path"),
    ("scripts/perception_probe.py", ("--object-size", "0.9"), "--object-size"),
    ("scripts/perception_probe.py", ("--small-patch", "4"), "--small-patch"),
    ("scripts/pretrain_breakdown.py", ("--episodes", "0"), "--episodes"),
    ("scripts/binding_probe.py", ("--layers", "0"), "--layers"),
    ("scripts/binding_probe.py", ("--init-from", "no/such/model"), "--init-from"),
])
def test_the_pretraining_probes_refuse_bad_flags_in_one_line(script: str, flags: tuple[str, ...], named: str) -> None:
    assert_one_line_error(run_cli(script, *flags), named)
