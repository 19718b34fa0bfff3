"""Tests of the GPU path's set-up, on the CPU: where each torchrun rank's ManiSkill envs render
and how many worker processes it starts (maniskill_env.py), and which Vulkan driver the Makefile
points SAPIEN at (scripts/vulkan_icd.sh). A GPU is simulated: torch's CUDA queries are patched,
and `nvidia-smi` is a fake script first on PATH."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import LONG, REPO, SHORT, SIZE, observations, tiny_agent

import maniskill_env as M

LAVAPIPE_ICD = "/usr/share/vulkan/icd.d/lvp_icd.json"


# ------------------------------------------------------------------------------------------
# maniskill_env.py: render device and worker processes per rank
# ------------------------------------------------------------------------------------------


def test_workers_per_rank_share_the_nodes_cores():
    assert M.workers_per_rank(num_envs=64, cpu_count=16, local_world_size=2) == 8
    assert M.workers_per_rank(num_envs=64, cpu_count=16, local_world_size=1) == 16
    assert M.workers_per_rank(num_envs=4, cpu_count=16, local_world_size=2) == 4  # one per env at most
    assert M.workers_per_rank(num_envs=8, cpu_count=2, local_world_size=8) == 1  # never 0
    assert M.workers_per_rank(num_envs=64, cpu_count=128, local_world_size=1, cap=16) == 16
    assert M.workers_per_rank(num_envs=64, cpu_count=128, local_world_size=1, cap=0) == 1
    for cpus in range(1, 33):
        for ranks in range(1, 9):
            for num_envs in (1, 2, 5, 64):
                n = M.workers_per_rank(num_envs, cpus, ranks)
                assert 1 <= n <= num_envs
                if ranks <= cpus:  # all the node's ranks together: at most one worker per core
                    assert n * ranks <= cpus


def test_render_backend_is_the_ranks_own_gpu_or_the_cpu():
    assert [M.render_backend(rank, num_gpus=8) for rank in range(3)] == [
        "sapien_cuda:0", "sapien_cuda:1", "sapien_cuda:2"]
    assert M.render_backend(3, num_gpus=1) == "sapien_cuda:0"  # one GPU visible per rank
    assert M.render_backend(0, num_gpus=0) == "cpu" and M.render_backend(5, num_gpus=0) == "cpu"


def fake_gpus(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_rank_render_backend_reads_torchrun_and_torch(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    fake_gpus(monkeypatch, 2)
    assert M.rank_render_backend() == "sapien_cuda:1"
    monkeypatch.delenv("LOCAL_RANK")
    assert M.rank_render_backend() == "sapien_cuda:0"  # outside torchrun
    fake_gpus(monkeypatch, 0)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert M.rank_render_backend() == "cpu"  # lavapipe, as before


def test_maniskill_turns_the_backend_into_that_sapien_device(monkeypatch):
    """ManiSkill's own parser (what BaseEnv.__init__ calls) asks SAPIEN for the rank's CUDA
    device; plain "gpu" asked for the first one, on every rank."""
    import sapien
    from mani_skill.envs.utils.system.backend import parse_sim_and_render_backend

    asked = []
    monkeypatch.setattr(sapien, "Device", lambda alias: asked.append(alias) or alias)
    info = parse_sim_and_render_backend("cpu", M.render_backend(1, num_gpus=2))
    assert (info.render_backend, info.render_device) == ("sapien_cuda", "cuda:1")
    parse_sim_and_render_backend("cpu", "gpu")
    assert asked == ["cpu", "cuda:1", "cpu", "cuda"]  # sim device, render device, twice


class FakeScene:
    """Stands in for PutOnScene: records what the env construction received, renders nothing."""

    made: list[dict] = []

    def __init__(self, split: str, image_size: int, **kwargs):
        FakeScene.made.append(dict(kwargs, split=split, image_size=image_size))

    def segmentation_ids(self) -> np.ndarray:
        return np.zeros(0, np.int64)

    def close(self) -> None:
        pass


def test_in_process_envs_render_on_the_ranks_gpu(monkeypatch):
    monkeypatch.setattr(M, "PutOnScene", FakeScene)
    monkeypatch.setattr(FakeScene, "made", [])
    monkeypatch.setenv("LOCAL_RANK", "1")
    fake_gpus(monkeypatch, 2)
    envs = M.VecEnv("ind", 3, SIZE, seed=0, max_episode_steps=None, num_workers=0)
    assert len(envs.tasks) == 3 and not envs.workers
    assert [m["render_backend"] for m in FakeScene.made] == ["sapien_cuda:1"] * 3
    envs.set_split("unseen_table")  # a rebuilt scene keeps the device
    assert [m["render_backend"] for m in FakeScene.made[3:]] == ["sapien_cuda:1"] * 3
    assert FakeScene.made[-1]["split"] == "unseen_table"
    fake_gpus(monkeypatch, 0)
    M.VecEnv("ind", 1, SIZE, seed=0, max_episode_steps=None, num_workers=None)
    assert FakeScene.made[-1]["render_backend"] == "cpu"


class FakeSpawnContext:
    """Stands in for multiprocessing's spawn context: records the workers VecEnv starts (their
    _worker arguments) and answers for them."""

    def __init__(self):
        self.worker_args: list[tuple] = []

    def Pipe(self):  # noqa: N802  (multiprocessing's name)
        return FakePipe(), FakePipe()

    def Process(self, target, args, daemon):  # noqa: N802
        assert target is M._worker and daemon
        self.worker_args.append(args)
        return FakeProcess()


class FakePipe:
    def recv(self):
        return ("ok", None)

    def send(self, message):
        pass

    def close(self):
        pass


class FakeProcess:
    def start(self):
        pass

    def join(self, timeout=None):
        pass

    def is_alive(self):
        return False


def start_workers(monkeypatch, num_envs: int, cpus: int, local_rank: int, local_world_size: int,
                  num_gpus: int) -> list[tuple[int, str]]:
    """(envs, render backend) of each worker VecEnv starts on a simulated node."""
    ctx = FakeSpawnContext()
    monkeypatch.setattr(M.mp, "get_context", lambda method: ctx)
    monkeypatch.setattr(M, "available_cpus", lambda: cpus)
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world_size))
    fake_gpus(monkeypatch, num_gpus)
    envs = M.VecEnv("ind", num_envs, SIZE, seed=0, max_episode_steps=None, num_workers=None)
    envs.close()
    # _worker(conn, split, num_tasks, image_size, max_episode_steps, render_backend)
    return [(args[2], args[5]) for args in ctx.worker_args]


def test_worker_processes_per_rank_and_their_render_device(monkeypatch):
    # 2 ranks on a 16-core node with 2 GPUs: rank 1 starts 8 workers, all on GPU 1.
    workers = start_workers(monkeypatch, num_envs=64, cpus=16, local_rank=1, local_world_size=2, num_gpus=2)
    assert workers == [(8, "sapien_cuda:1")] * 8
    # 1 rank on a 64-core node: at most MAX_GPU_RENDER_WORKERS contexts on its GPU.
    workers = start_workers(monkeypatch, num_envs=64, cpus=64, local_rank=0, local_world_size=1, num_gpus=1)
    assert len(workers) == M.MAX_GPU_RENDER_WORKERS == 16
    assert sum(n for n, _ in workers) == 64 and {b for _, b in workers} == {"sapien_cuda:0"}
    # This machine under torchrun: 2 ranks on 2 cores render on the CPU, one worker each.
    workers = start_workers(monkeypatch, num_envs=4, cpus=2, local_rank=1, local_world_size=2, num_gpus=0)
    assert workers == [(4, "cpu")]
    # No cap on the CPU: lavapipe takes no GPU memory.
    workers = start_workers(monkeypatch, num_envs=64, cpus=64, local_rank=0, local_world_size=1, num_gpus=0)
    assert len(workers) == 64


def test_the_policy_s_gpu_renders_and_a_worker_makes_it_current(monkeypatch):
    # `python ppo_vla.py --device cuda:1` (one process): envs on GPU 1, not the rank's GPU 0.
    fake_gpus(monkeypatch, 2)
    assert M.rank_render_backend("cuda:1") == "sapien_cuda:1"
    assert M.rank_render_backend("cpu") == "sapien_cuda:0", "a CPU policy: still the rank's GPU"
    ctx = FakeSpawnContext()
    monkeypatch.setattr(M.mp, "get_context", lambda method: ctx)
    M.VecEnv("ind", 2, SIZE, seed=0, max_episode_steps=None, num_workers=1, render_device="cuda:1").close()
    assert ctx.worker_args[0][5] == "sapien_cuda:1"
    # A worker makes its render GPU the current device before building scenes: ManiSkill
    # synchronises the current device after rendering, which would otherwise be GPU 0.
    current: list[int] = []
    monkeypatch.setattr(M.torch.cuda, "set_device", current.append)
    monkeypatch.setattr(M, "PutOnScene", FakeScene)
    pipe = FakeWorkerPipe()
    M._worker(pipe, "ind", 1, SIZE, 3, "sapien_cuda:1")
    assert current == [1] and pipe.sent[0] == ("ok", None)
    current.clear()
    M._worker(FakeWorkerPipe(), "ind", 1, SIZE, 3, "cpu")
    assert current == []


class FakeWorkerPipe:
    """The worker's end of the pipe: answers 'close' at once, records what the worker sends."""

    def __init__(self):
        self.sent: list = []

    def send(self, message):
        self.sent.append(message)

    def recv(self):
        return ("close", None)

    def close(self):
        pass


@pytest.mark.slow
def test_a_real_scene_renders_on_the_cpu_here():
    """The CPU path is unchanged: a real ManiSkill scene on SAPIEN's CPU device (lavapipe)."""
    if torch.cuda.is_available():
        pytest.skip("this machine renders on its GPU")
    task = M.PutOnTask("ind", SIZE)
    try:
        assert task.render_backend == "cpu"
        assert task.scene.backend.render_backend == "sapien_cpu"
        image, _ = task.reset(0)
        assert image.shape == (SIZE, SIZE, 3) and image.std() > 0  # it really rendered
    finally:
        task.close()


# ------------------------------------------------------------------------------------------
# scripts/vulkan_icd.sh and the Makefile: which Vulkan driver
# ------------------------------------------------------------------------------------------

GPU_LIST = 'echo "GPU 0: NVIDIA H200 (UUID: GPU-0)"'
BROKEN_DRIVER = 'echo "NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver."; exit 9'
NO_GPU = 'echo "No devices were found"'


def node_path(tmp_path: Path, nvidia_smi: str | None) -> str:
    """A PATH with bash, timeout (the script bounds nvidia-smi with it) and, if given, a fake
    `nvidia-smi` running that shell code: nothing else, so a real nvidia-smi on the test machine
    cannot answer."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "timeout"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    if nvidia_smi is not None:
        (bin_dir / "nvidia-smi").write_text(f"#!/bin/sh\n{nvidia_smi}\n")
        (bin_dir / "nvidia-smi").chmod(0o755)
    return str(bin_dir)


def run(command: list[str], path: str, **env: str) -> str:
    """stdout of `command` with that PATH, none of `make test`'s own choice (its exported
    VK_ICD_FILENAMES, or one on its command line, which MAKEFLAGS would pass on), and `env`."""
    outer = {"VK_ICD_FILENAMES", "MAKEFLAGS", "MFLAGS", "MAKELEVEL"}
    base = {k: v for k, v in os.environ.items() if k not in outer}
    out = subprocess.run(command, cwd=REPO, env=base | {"PATH": path} | env, capture_output=True,
                         text=True, timeout=60, check=True)
    return out.stdout.strip()


@pytest.mark.parametrize("nvidia_smi, icd", [
    (None, LAVAPIPE_ICD),  # no NVIDIA driver
    (GPU_LIST, ""),  # a working GPU: the loader finds NVIDIA's driver
    (BROKEN_DRIVER, LAVAPIPE_ICD),  # nvidia-smi there, driver broken
    (NO_GPU, LAVAPIPE_ICD),  # driver, no GPU
], ids=["no-nvidia-smi", "gpu", "broken-driver", "no-gpu"])
def test_vulkan_icd_is_lavapipe_unless_an_nvidia_gpu_works(tmp_path, nvidia_smi, icd):
    path = node_path(tmp_path, nvidia_smi)
    assert run([shutil.which("bash"), "scripts/vulkan_icd.sh"], path) == icd


@pytest.mark.parametrize("nvidia_smi, exported", [
    (None, f"set [{LAVAPIPE_ICD}]"),
    (GPU_LIST, "unset []"),
    (BROKEN_DRIVER, f"set [{LAVAPIPE_ICD}]"),
], ids=["no-nvidia-smi", "gpu", "broken-driver"])
def test_make_exports_lavapipe_only_without_a_working_nvidia_gpu(tmp_path, nvidia_smi, exported):
    """What the Makefile's targets (make test) see in their environment; yours wins."""
    make = shutil.which("make")
    if make is None:
        pytest.skip("no make")
    show = tmp_path / "show.mk"
    show.write_text('show-icd:\n\t@if [ -n "$${VK_ICD_FILENAMES+x}" ]; then echo "set [$$VK_ICD_FILENAMES]"; '
                    'else echo "unset []"; fi\n')
    path = node_path(tmp_path, nvidia_smi)
    command = [make, "-s", "-f", "Makefile", "-f", str(show), "show-icd"]
    assert run(command, path) == exported
    assert run(command, path, VK_ICD_FILENAMES="/mine.json") == "set [/mine.json]"
    assert run([make, "-s", "VK_ICD_FILENAMES=/mine.json", "-f", "Makefile", "-f", str(show), "show-icd"],
               path) == "set [/mine.json]"


def load_check_setup(monkeypatch: pytest.MonkeyPatch):
    spec = importlib.util.spec_from_file_location("check_setup", REPO / "scripts" / "check_setup.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "check_setup", module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("where", ["none", "prefill", "steps"])
def test_the_decode_sync_count_tells_the_prefill_from_the_one_token_steps(monkeypatch, where: str):
    # On a GPU torch's sync debug mode warns at each sync; here a stand-in warns where asked.
    check_setup = load_check_setup(monkeypatch)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda mode: None)
    language_model = check_setup.run_language_model

    def syncing_language_model(vla, embeds, *args, **kwargs):
        if (where == "prefill") == (embeds.shape[1] > 1) and where != "none":
            warnings.warn("called a synchronizing CUDA operation", stacklevel=2)
        return language_model(vla, embeds, *args, **kwargs)

    monkeypatch.setattr(check_setup, "run_language_model", syncing_language_model)
    agent = tiny_agent()
    line = check_setup.count_decode_syncs(agent, observations(3), [SHORT, LONG, LONG])
    prefill, steps = {"none": (0, 0), "prefill": (1, 0), "steps": (0, 6)}[where]
    assert f"in the prefill {prefill}, in the 6 one-token steps {steps} (design: 0)" in line
    assert line.startswith("ok") == (steps == 0)
    assert "elsewhere in the loop 0" in line  # on the CPU the finiteness check syncs nothing
