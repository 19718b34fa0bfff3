"""The task family "put {object} on {receptacle}": its splits, reward, image perturbations and
the one factory every script calls. Light: numpy and gymnasium only, no simulator.

Two implementations sit behind the same batched interface:
  * `maniskill`  (maniskill_env.py) the real benchmark: a Panda arm in ManiSkill3, rendered by
                 SAPIEN; ~24-50 env-steps/s on a CPU.
  * `twin`       (twin_env.py) a 2D top-down twin in vectorised numpy, thousands of env-steps/s:
                 the same splits, actions and reward, for learning tests and the laptop study.

The interface follows gymnasium's vector-env conventions (as ManiSkill's own batched envs do):

    envs = make_vec_env("ind", num_envs=8, env="twin", image_size=64, seed=0)
    obs, info = envs.reset(options={"episode_ids": ids})  # ids: int [N]; omitted: drawn from `seed`
    obs, reward, terminated, truncated, info = envs.step(actions)  # actions: float32 [N, 7]
    # obs = {"image": uint8 [N, H, W, 3], "instruction": tuple of N str}
    # reward float32 [N]; terminated bool [N] (always False: no early termination);
    # truncated bool [N] (all True at step max_episode_steps, when every episode ends together);
    # info: "success" (this step), "success_once", "grasped" bool [N], "episode_id" int64 [N]
    envs.expert_action()      # float32 [N, 7]: the scripted expert's actions for the current states
    envs.set_split("unseen_table")  # same envs, new split (evaluation switches in place)
    envs.close()

There is no auto-reset: after the last step the caller resets (common.EpisodeLoop does).
Action: 7-D [dx, dy, dz, droll, dpitch, dyaw, gripper] in [-1, 1]; gripper +1 open, -1 close.
"""

from __future__ import annotations

import twin_env
from tasks import check_split


def make_vec_env(split: str, num_envs: int, image_size: int = 112, seed: int = 0,
                 max_episode_steps: int | None = None, env: str = "maniskill",
                 num_workers: int | None = None, render_device: str | None = None):
    """Batched envs of one split. max_episode_steps None: the family's horizon (maniskill 80,
    twin its own). num_workers (maniskill only): subprocesses that share the envs (None: one
    per env up to this rank's share of the node's cores, maniskill_env.workers_per_rank;
    in-process when num_envs == 1; 0: all in this process). render_device (maniskill only):
    the policy's device, e.g. "cuda:1", whose GPU renders (None or "cpu": the rank's GPU if
    torch sees one, else SAPIEN's CPU renderer)."""
    check_split(split, env)
    if num_envs < 1:
        raise ValueError(f"num_envs must be at least 1, got {num_envs}")
    if env == "twin":
        return twin_env.TwinVecEnv(split, num_envs, image_size, seed, max_episode_steps)
    # Imported when asked for, not to break a cycle (there is none): mani_skill and SAPIEN take
    # seconds to import and the twin needs neither.
    import maniskill_env

    return maniskill_env.VecEnv(split, num_envs, image_size, seed, max_episode_steps, num_workers, render_device)


def default_horizon(env: str) -> int:
    """Steps per episode of a family (no early termination)."""
    if env == "twin":
        return twin_env.TWIN_HORIZON
    return 80  # arXiv 2505.19789: 80 steps per episode
