"""The shipped pretrained tiny VLA (assets/tiny-openvla-twin, written by `make pretrain`): it
loads through the official-layout loader like OpenVLA-7B, acts, and is what its recipe
(pretrain_config.json) says it is."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import REPO

from common import build_agent, evaluate_policy, evaluation_episode_ids
from envs import make_vec_env
from model import build_tiny_vla

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
    # recorded, up to sampling noise (128 episodes: 3 standard errors <= 0.14).
    ids = evaluation_episode_ids(1, "pretrain", recipe["args"]["eval_episodes"])
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
    window, carry_window = 2, 3
    records = ensure_demos(tmp_path, {"train": 24}, "twin", "pretrain", 32, 30, num_envs=8)["train"]
    expected, kinds = [], set()
    for record in records:
        env = make_vec_env("pretrain", 1, 32, seed=1, env="twin")
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

    # The batches: grounding frames only during the first --grounding-steps, then the share asked.
    args, num_frames, rng = Args(grounding_steps=5, grounding_share=0.5), len(expected), np.random.default_rng(0)
    assert np.isin(batch_indices(rng, 4, 64, num_frames, grounding, args), grounding).all()
    later = np.isin(np.concatenate([batch_indices(rng, 5, 64, num_frames, grounding, args) for _ in range(50)]),
                    grounding).mean()
    assert 0.5 < later < 0.5 + 1.5 * len(grounding) / num_frames, later  # half, plus the other half's share
