"""A toy task behind the same batched interface as envs.py, with no simulator.

Used by the learning tests: in a few CPU minutes, each algorithm must take the tiny model from
chance to clearly better on a task whose right action depends on both the image and the
instruction. `envs.make_vec_env(split="toy", ...)` returns a ToyVecEnv.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

TOY_COLOURS = {"red": (220, 40, 40), "green": (40, 180, 40), "blue": (40, 70, 230), "yellow": (230, 210, 40)}
TOY_STEP_SCALE = 0.5  # a full-scale action moves the pointer half way to a corner
TOY_SUCCESS_MARGIN = 0.15  # the pointer must be this far inside the target's quadrant


class ToyVecEnv:
    """One coloured square above or below the centre; "move to the {left|right} of the {colour} square".

    The target is the quadrant on the named side of the square: its horizontal half comes from
    the instruction, its vertical half from the image, so neither alone is enough. (A first
    version named one of two squares by colour; binding a colour word to a position proved too
    slow to learn for a random-init tiny model in CPU minutes, see the README.)
    The pointer starts at the centre; actions move it by TOY_STEP_SCALE * (dx, dy). Success:
    the pointer lies inside the target quadrant, at least TOY_SUCCESS_MARGIN from both axes.
    A uniform random action succeeds in one step with p = (0.5 * (1 - 0.3))^2 ~ 12%.
    Only dims 0 and 1 of the 7-D action matter. The reward is the same potential difference as
    the real task: 1.0 * [success now] - 1.0 * [success at the previous step].
    """

    split = "toy"

    def __init__(self, num_envs: int, image_size: int = 112, seed: int = 0, max_episode_steps: int = 1):
        self.num_envs, self.image_size, self.max_episode_steps = num_envs, image_size, max_episode_steps
        self.rng = np.random.default_rng(seed)

    def _layout(self, episode_id: int) -> tuple[str, float, float]:
        """Episode id -> (colour name, side +-1 named by the instruction, square's height +-0.5)."""
        rng = np.random.default_rng([7, int(episode_id)])
        colour = str(rng.choice(list(TOY_COLOURS)))
        return colour, float(rng.choice([-1.0, 1.0])), float(rng.choice([-0.5, 0.5]))

    def reset(self, episode_ids: Sequence[int] | np.ndarray | None = None) -> dict:
        if episode_ids is None:
            episode_ids = self.rng.integers(0, 2**31 - 1, size=self.num_envs)
        self.episode_ids = np.asarray(episode_ids, dtype=np.int64)
        assert len(self.episode_ids) == self.num_envs, "one episode id per env"
        self.layouts = [self._layout(i) for i in self.episode_ids]
        self.targets = np.array([[0.5 * side, y] for _, side, y in self.layouts], dtype=np.float32)  # [N, 2]
        self.pointer = np.zeros((self.num_envs, 2), dtype=np.float32)
        self.elapsed = 0
        self.success_once = np.zeros(self.num_envs, dtype=bool)
        self.prev_potential = np.zeros(self.num_envs, dtype=np.float32)
        return self._obs()

    def step(self, actions: np.ndarray) -> tuple[dict, np.ndarray, np.ndarray, dict]:
        actions = np.clip(np.asarray(actions, dtype=np.float32), -1.0, 1.0)
        self.pointer = np.clip(self.pointer + TOY_STEP_SCALE * actions[:, :2], -1.0, 1.0)
        self.elapsed += 1
        success = self._success()
        self.success_once |= success
        potential = success.astype(np.float32)
        reward, self.prev_potential = potential - self.prev_potential, potential
        done = np.full(self.num_envs, self.elapsed >= self.max_episode_steps)
        info = {"success": success, "success_once": self.success_once.copy(),
                "grasped": success, "episode_id": self.episode_ids.copy()}
        return self._obs(), reward, done, info

    def expert_action(self) -> np.ndarray:
        """The action that moves the pointer straight into the target quadrant: [N, 7]."""
        actions = np.zeros((self.num_envs, 7), dtype=np.float32)
        actions[:, :2] = np.clip((self.targets - self.pointer) / TOY_STEP_SCALE, -1.0, 1.0)
        actions[:, 6] = 1.0
        return actions

    def close(self) -> None:
        pass

    def _success(self) -> np.ndarray:
        inside = np.sign(self.pointer) == np.sign(self.targets)
        deep = np.abs(self.pointer) >= TOY_SUCCESS_MARGIN
        return np.all(inside & deep, axis=1)

    def _obs(self) -> dict:
        s = self.image_size
        images = np.full((self.num_envs, s, s, 3), 128, dtype=np.uint8)
        half = max(1, s // 10)
        for n, (colour, _, y) in enumerate(self.layouts):
            col, row = self._to_pixel(np.array([0.0, y]))
            images[n, row - half:row + half, col - half:col + half] = TOY_COLOURS[colour]
            col, row = self._to_pixel(self.pointer[n])
            images[n, max(0, row - 1):row + 2, max(0, col - 1):col + 2] = 255
        sides = {-1.0: "left", 1.0: "right"}
        instructions = [f"move to the {sides[side]} of the {colour} square" for colour, side, _ in self.layouts]
        return {"image": images, "instruction": instructions}

    def _to_pixel(self, xy: np.ndarray) -> tuple[int, int]:
        """Pointer coordinates in [-1, 1]^2 (y up) -> (column, row) of the image."""
        s = self.image_size
        col = int(round((xy[0] + 1) / 2 * (s - 1)))
        row = int(round((1 - xy[1]) / 2 * (s - 1)))
        return col, row
