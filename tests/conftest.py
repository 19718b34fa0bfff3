"""What the test files share: the image size, a tiny agent, fake and wrapped envs, and helpers
to read TensorBoard logs and to run the scripts from the command line.

Everything runs on the CPU with no download. torch is imported lazily here, so the pure-numpy
tests (test_twin.py) do not pay for it.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
# Image size of every tiny model and env in the tests: 2 x 2 patches of the tiny preset's 16 px,
# the same code paths as its 64 px at a quarter of the cost.
SIZE = 32
SHORT, LONG = "go", "put the crème brûlée onto the yellow plate next to the basket"


@pytest.fixture(scope="session", autouse=True)
def one_cpu_thread():
    """The tiny model's ops are too small to split across threads; on a shared 2-core machine
    two threads per process made the tests up to 10x slower."""
    if "torch" in sys.modules:  # imported by the test modules at collection
        import torch

        torch.set_num_threads(1)
    yield


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """test_learning.py's runs (the longest tests, minutes each) first, in their order, every other
    module in its own: under two pytest workers (`make test`) a long test handed out last keeps one
    core busy alone at the end. (A module moved whole: its module-scoped fixtures are built once.)"""
    items.sort(key=lambda item: item.path.name != "test_learning.py")


# ---------------------------------------------------------------------------- agents


def observations(n: int, seed: int = 0, size: int = SIZE) -> np.ndarray:
    """Random uint8 images [n, size, size, 3]."""
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def perturb(params: list, seed: int = 0, scale: float = 0.05) -> None:
    """Move adapters off their B = 0 start, so LoRA actually changes the outputs (as after
    training)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(scale * torch.randn(p.shape, generator=generator).to(p.dtype))


def tiny_agent(critic: str | None = "h0", seed: int = 0, perturbed: bool = True, **kwargs: Any):
    """A tiny agent at SIZE px on the CPU; its LoRA perturbed unless perturbed=False."""
    from common import build_agent

    agent = build_agent(image_size=SIZE, critic=critic, seed=seed, **kwargs)
    if perturbed:
        perturb(agent.lora_parameters(), seed=seed)
    return agent


@pytest.fixture(scope="module")
def agent():
    """A tiny agent with an h0 critic whose policy differs from the base."""
    return tiny_agent()


def save_trained_checkpoint(path: Path, algorithm: str, critic: str | None = None,
                            seed: int = 1, **kwargs: Any) -> Path:
    """A checkpoint as `algorithm` would leave it: perturbed (trained-looking) adapters and, with
    a critic, a perturbed value head."""
    from common import save_checkpoint

    agent = tiny_agent(critic=critic, seed=seed, **kwargs)
    perturb(agent.value_head_parameters(), seed=seed + 1, scale=0.1)
    save_checkpoint(path, agent, {"algorithm": algorithm, "iteration": 1})
    return path


# ---------------------------------------------------------------------------- envs


class FakeVecEnv:
    """A vector env in miniature (gymnasium conventions, as envs.py describes): reward 1 and
    success whenever dx > 0 at a step; every episode ends after max_episode_steps."""

    def __init__(self, num_envs: int = 3, max_episode_steps: int = 4, image_size: int = SIZE):
        self.num_envs, self.max_episode_steps, self.image_size = num_envs, max_episode_steps, image_size
        self.split = "fake"
        self.rng = np.random.default_rng(0)
        self.reset_ids: list[list[int]] = []
        self.steps = 0

    def observe(self) -> dict:
        image = self.rng.integers(0, 256, (self.num_envs, self.image_size, self.image_size, 3),
                                  dtype=np.uint8)
        return {"image": image,
                "instruction": tuple(f"move to the square number {i}" for i in range(self.num_envs))}

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[dict, dict]:
        ids = (options or {}).get("episode_ids")
        if ids is None:
            ids = self.rng.integers(0, 1000, self.num_envs)
        self.ids = np.asarray(ids)
        self.reset_ids.append(self.ids.tolist())
        self.steps, self.ever = 0, np.zeros(self.num_envs, dtype=bool)
        return self.observe(), {"episode_id": self.ids.copy()}

    def step(self, actions: np.ndarray):
        assert actions.shape == (self.num_envs, 7) and actions.dtype == np.float32
        assert self.steps < self.max_episode_steps, "stepped past the horizon without a reset"
        self.steps += 1
        success = actions[:, 0] > 0
        self.ever |= success
        truncated = np.full(self.num_envs, self.steps >= self.max_episode_steps)
        info = {"success": success, "success_once": self.ever.copy(),
                "grasped": np.zeros(self.num_envs, dtype=bool), "episode_id": self.ids.copy()}
        return (self.observe(), success.astype(np.float32), np.zeros(self.num_envs, dtype=bool),
                truncated, info)

    def close(self) -> None:
        pass


class MoveRightBonus:
    """Wraps a vector env so that outcomes depend on what a random policy does: each step also
    pays 0.1 when dx > 0, and an episode succeeds when its last action had dx > 0. On the twin a
    random tiny policy never grasps, so every return would otherwise be 0 (no signal to learn
    from, no preference pairs)."""

    def __init__(self, envs: Any):
        self.envs = envs

    def __getattr__(self, name: str) -> Any:
        return getattr(self.envs, name)

    def step(self, actions: np.ndarray):
        obs, reward, terminated, truncated, info = self.envs.step(actions)
        right = np.asarray(actions)[:, 0] > 0
        info = {**info, "success": right, "success_once": info["success_once"] | right}
        return obs, reward + 0.1 * right.astype(np.float32), terminated, truncated, info


def with_move_right_bonus(monkeypatch: pytest.MonkeyPatch, module: Any) -> None:
    """Make `module`'s make_vec_env return MoveRightBonus-wrapped envs."""
    real = module.make_vec_env
    monkeypatch.setattr(module, "make_vec_env", lambda *a, **kw: MoveRightBonus(real(*a, **kw)))


# ---------------------------------------------------------------------------- logs and processes


def scalar_events(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of every point TensorBoard shows for `tag` (after its purges)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def scalars(run_dir: Path, tag: str) -> list[float]:
    return [value for _, value in scalar_events(run_dir, tag)]


def run_cli(script: str, *args: str, timeout: float = 300,
            without_torch: bool = False) -> subprocess.CompletedProcess:
    """`python SCRIPT ARGS` from the repository root, one torch thread, offline. without_torch:
    `import torch` fails in it, which proves that the script did not need torch to get there."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    if without_torch:
        env["PYTHONPATH"] = str(_poisoned_torch())
    return subprocess.run([sys.executable, script, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)


@functools.cache
def _poisoned_torch() -> Path:
    """A directory (one per user, reused) whose `torch` package raises ImportError."""
    root = Path(tempfile.gettempdir()) / f"cleanvla-tests-no-torch-{os.getuid()}"
    (root / "torch").mkdir(parents=True, exist_ok=True)
    (root / "torch" / "__init__.py").write_text(
        'raise ImportError("torch was imported before the flags were checked")\n')
    return root


def assert_one_line_error(result: subprocess.CompletedProcess, *expected: str,
                          progress_bars: bool = False) -> str:
    """A user error: a non-zero exit status, no traceback, and ONE line on stderr that starts
    with "error:" and contains every `expected` string (with progress_bars, the lines of tqdm's
    bars aside). Returns that line."""
    assert result.returncode != 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines()  # splitlines also splits tqdm's \r
             if line.strip() and not (progress_bars and re.search(r"\d+%\|", line))]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:"), result.stderr
    for text in expected:
        assert text in lines[0], (text, lines[0])
    return lines[0]
