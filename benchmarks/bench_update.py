"""What the shared actor-critic saves in a PPO update, and the update's throughput.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_update.py
    python benchmarks/bench_update.py --model-scale 7b --device cuda     # on a GPU
    .venv/bin/python benchmarks/bench_update.py --model-scale 7b --dry-run  # anywhere

One PPO update step is what ppo_vla.py does per optimizer step: --grad-accum-steps minibatches of
--minibatch-size, each a teacher-forced forward through agent.score_actions(images, instructions,
tokens) and a backward of the PPO loss (ppo_vla.py's clipped_policy_loss + clipped_value_loss,
its default coefficients), then gradient clipping and one AdamW step with ppo_vla.py's two
parameter groups (LoRA, value head). Two results, measured side by side in one run:

1. Shared-h0 critic (`build_agent(critic="h0")`, the paper's) against a separate critic
   (`critic="separate"`: a second backbone with its own LoRA): peak memory and median
   wall-clock time per update step, as shared/separate ratios. The paper reports ~0.55x memory
   and ~0.65x time for OpenVLA-7B on a GPU (arXiv 2505.19789, section 4; docs/PAPER_NOTES.md).
2. Update throughput (shared-h0 critic): samples/s of forward + backward + optimizer step at
   minibatch 8 and 32 (--throughput-minibatch-sizes).

Each configuration runs in its own fresh subprocess (multiprocessing spawn). Memory is the peak
over the model build and every step of part 1, minus what the process held right before the
model was built: on CUDA torch's max_memory_allocated; on CPU the peak resident set size
(getrusage ru_maxrss) minus the RSS before the build, i.e. parameters, optimizer state AND
activations, plus whatever the allocator keeps. On CPU the two configurations' processes are
alive together and their steps alternate (ABBA...), so load from other jobs on the machine hits
both alike; absolute times on a shared machine are noise, the ratios are what to read. CPU time
(all threads of the worker) is printed beside wall-clock time for the same reason. On CUDA the
configurations run one after the other (both 7B models at once would not fit one GPU).

--model-scale 7b builds the same modules at OpenVLA-7B size (Llama-2-7B 4096 wide x 32 layers,
DINOv2 ViT-L/14-reg4, SigLIP So400m/14, 224 px; ~7.54B weights) with RANDOM weights in bf16 on
the GPU: no checkpoint needed, the cost of a step does not depend on the values. Its text tokens
come from the tiny tokenizer (a prompt of about the real length; 256 patches dominate anyway).
It needs CUDA; --dry-run builds the models on the `meta` device and prints parameter counts.
Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import (  # noqa: E402  (the repo root is not a package)
    ActorCritic,
    build_agent,
    peak_memory_gb,
    resolve_device,
)
from model import (  # noqa: E402
    ACTION_DIM,
    DINOV2_TIMM_ID,
    NUM_ACTION_BINS,
    SIGLIP_TIMM_ID,
    TINY_IMAGE_SIZE,
    NormStats,
    OpenVLA,
    VLAConfig,
    build_tiny_tokenizer,
    cast_parameters,
    padded_vocab_size,
    tiny_vla_config,
)
from ppo_vla import Args as PPOArgs  # noqa: E402
from ppo_vla import clipped_policy_loss, clipped_value_loss  # noqa: E402

INSTRUCTIONS = ["put the carrot on the plate", "put the green cube onto the yellow towel",
                "move to the red square", "pick up the eggplant and place it in the basket"]
PPO = PPOArgs()  # ppo_vla.py's defaults: clip 0.2, Huber 10, value clip 0.2, lr 1e-4 / 3e-3, ...
SCALES = ("tiny", "7b")
DEFAULT_IMAGE_SIZE = {"tiny": TINY_IMAGE_SIZE, "7b": 224}
LLAMA2_TEXT_VOCAB = 32000
PAPER_MEMORY_RATIO, PAPER_TIME_RATIO = 0.55, 0.65  # shared / separate, OpenVLA-7B on an A100


# =============================================================================================
# Models
# =============================================================================================


def openvla_7b_config(image_size: int) -> VLAConfig:
    """OpenVLA-7B's shape: the towers at their timm sizes (no overrides), Llama-2-7B."""
    return VLAConfig(
        timm_model_ids=[DINOV2_TIMM_ID, SIGLIP_TIMM_ID],  # ViT-L/14-reg4 1024x24, So400m 1152x27
        image_sizes=[image_size, image_size],
        text_config=dict(
            vocab_size=padded_vocab_size(LLAMA2_TEXT_VOCAB),  # 32064
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            max_position_embeddings=2048,
            rms_norm_eps=1e-5,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=LLAMA2_TEXT_VOCAB,
            tie_word_embeddings=False,
        ),
        pad_token_id=LLAMA2_TEXT_VOCAB,
    )


def vla_config(scale: str, image_size: int) -> VLAConfig:
    if scale == "tiny":
        return tiny_vla_config(image_size, text_vocab_size=build_tiny_tokenizer().vocab_size)
    return openvla_7b_config(image_size)


def build_random_vla(config: VLAConfig, device: torch.device, dtype: torch.dtype) -> OpenVLA:
    """OpenVLA with random weights created directly on `device` in `dtype` (never a full fp32
    copy in host memory). On "meta" nothing is allocated: for counting parameters."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            vla = OpenVLA(config)
    finally:
        torch.set_default_dtype(previous)  # the value head stays fp32, as build_agent's does
    return cast_parameters(vla, device, dtype).eval()  # rotary inv_freq is built fp32 already


def build_bench_agent(scale: str, critic: str, image_size: int, device: torch.device,
                      seed: int) -> ActorCritic:
    """tiny: build_agent's own model. 7b: random OpenVLA-7B-sized weights in bf16."""
    if scale == "tiny" and device.type != "meta":
        return build_agent(critic=critic, image_size=image_size, device=device, seed=seed)
    dtype = torch.bfloat16 if scale == "7b" else torch.float32
    vla = build_random_vla(vla_config(scale, image_size), device, dtype)
    torch.manual_seed(seed)
    return ActorCritic(vla, build_tiny_tokenizer(), NormStats.identity(), model_path=None,
                       base_fingerprint=f"random-{scale}", critic=critic)


@dataclass
class ParameterCounts:
    base: int  # every backbone's frozen weights (two backbones with a separate critic)
    lora: int
    value_head: int


def count_parameters(agent: ActorCritic) -> ParameterCounts:
    lora = sum(p.numel() for p in agent.lora_parameters())
    value_head = sum(p.numel() for p in agent.value_head_parameters())
    return ParameterCounts(sum(p.numel() for p in agent.parameters()) - lora - value_head,
                           lora, value_head)


def make_optimizer(agent: ActorCritic) -> torch.optim.AdamW:
    """ppo_vla.py's optimizer: LoRA at lr 1e-4, the value head at 3e-3."""
    return torch.optim.AdamW(
        [{"params": agent.lora_parameters(), "lr": PPO.learning_rate},
         {"params": agent.value_head_parameters(), "lr": PPO.value_learning_rate}],
        eps=1e-5,
    )


# =============================================================================================
# One PPO update step (runs in a worker process)
# =============================================================================================


@dataclass
class Minibatch:
    """Synthetic rollout samples, shaped like ppo_vla.py's minibatches."""

    images: torch.Tensor  # uint8 [B, S, S, 3], on CPU like the rollout buffer
    instructions: list[str]
    tokens: torch.Tensor  # long [B, 7] action ids
    old_logprob: torch.Tensor  # [B] from a no-grad score_actions: ratios start at 1, as in PPO
    old_value: torch.Tensor  # [B]
    advantages: torch.Tensor  # [B] ~ N(0, 1), as after normalisation
    returns: torch.Tensor  # [B]


def make_minibatches(agent: ActorCritic, minibatch_size: int, count: int,
                     seed: int) -> list[Minibatch]:
    rng = np.random.default_rng(seed)
    size, first = agent.image_size, agent.action_tokenizer.first_id
    minibatches = []
    for _ in range(count):
        images = torch.from_numpy(
            rng.integers(0, 256, (minibatch_size, size, size, 3), dtype=np.uint8))
        instructions = [INSTRUCTIONS[i] for i in rng.integers(0, len(INSTRUCTIONS), minibatch_size)]
        tokens = torch.from_numpy(first + rng.integers(0, NUM_ACTION_BINS,
                                                       (minibatch_size, ACTION_DIM)))
        with torch.no_grad():
            logprob, _, value = agent.score_actions(images, instructions, tokens, PPO.temperature)
        noise = torch.from_numpy(rng.standard_normal((2, minibatch_size)).astype(np.float32))
        noise = noise.to(value.device)
        minibatches.append(Minibatch(images, instructions, tokens, logprob, value,
                                     advantages=noise[0], returns=value + noise[1]))
    return minibatches


def ppo_update_step(agent: ActorCritic, optimizer: torch.optim.Optimizer,
                    minibatches: list[Minibatch]) -> None:
    """ppo_vla.py's update for one optimizer step (entropy coefficient 0, no KL stop)."""
    agent.train()
    for mb in minibatches:
        new_logprob, entropy, new_value = agent.score_actions(mb.images, mb.instructions, mb.tokens,
                                                              temperature=PPO.temperature)
        pg_loss, _ = clipped_policy_loss(new_logprob, mb.old_logprob, mb.advantages,
                                         PPO.clip_coef)
        v_loss = clipped_value_loss(new_value, mb.old_value, mb.returns, PPO.vf_clip_coef,
                                    PPO.huber_delta)
        loss = pg_loss - PPO.ent_coef * entropy.mean() + PPO.vf_coef * v_loss
        (loss / len(minibatches)).backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(agent.trainable_parameters(), PPO.max_grad_norm)
    grad_norm.item()  # ppo_vla.py logs it every step
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resident_memory_gb() -> float:
    """The process's resident set size now (Linux /proc), in GiB; peak so far elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except OSError:
        return peak_memory_gb(torch.device("cpu"))  # no /proc: the peak is the best we have


def memory_in_use_gb(device: torch.device) -> float:
    if device.type == "cuda":
        # A fresh worker has no CUDA context yet, and the memory-stats calls then fail with
        # "Invalid device argument" (seen on an H200, 2026-12-04): make the context first.
        torch.cuda.init()
        torch.cuda.set_device(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**30
    return resident_memory_gb()


@dataclass
class WorkerSpec:
    scale: str
    critic: str
    image_size: int
    device: str
    grad_accum_steps: int
    threads: int
    seed: int


def update_worker(conn: Connection, spec: WorkerSpec) -> None:
    """Builds one agent, then answers the parent's commands:
    ("step", minibatch_size) -> ("ok", (wall seconds, CPU seconds)) or ("oom", message);
    ("memory",) -> ("ok", peak GiB above what was in use before the build); ("stop",)."""
    try:
        if spec.threads:
            torch.set_num_threads(spec.threads)
        device = torch.device(spec.device)
        torch.manual_seed(spec.seed)
        baseline_gb = memory_in_use_gb(device)
        agent = build_bench_agent(spec.scale, spec.critic, spec.image_size, device, spec.seed)
        optimizer = make_optimizer(agent)
        minibatches: dict[int, list[Minibatch]] = {}
        conn.send(("ok", count_parameters(agent)))
        while True:
            command = conn.recv()
            if command[0] == "stop":
                return
            if command[0] == "memory":
                conn.send(("ok", peak_memory_gb(device) - baseline_gb))
                continue
            size = command[1]
            try:
                if size not in minibatches:
                    minibatches[size] = make_minibatches(agent, size, spec.grad_accum_steps,
                                                         spec.seed + size)
                synchronize(device)
                wall, cpu = time.perf_counter(), time.process_time()
                ppo_update_step(agent, optimizer, minibatches[size])
                synchronize(device)
                conn.send(("ok", (time.perf_counter() - wall, time.process_time() - cpu)))
            except torch.OutOfMemoryError as error:
                optimizer.zero_grad(set_to_none=True)
                minibatches.pop(size, None)
                torch.cuda.empty_cache()
                conn.send(("oom", str(error).splitlines()[0]))
    except Exception as error:  # report to the parent in one line, then exit
        traceback.print_exc()
        message = f"{type(error).__name__}: {error}".splitlines()[0]
        conn.send(("error", f"the {spec.critic} worker failed: {message}"))


# =============================================================================================
# The parent: starts workers, alternates their steps
# =============================================================================================


class WorkerError(RuntimeError):
    pass


class UpdateWorker:
    """A fresh spawned process holding one agent; steps on command."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        context = mp.get_context("spawn")  # a fresh process: its own RSS, no inherited state
        self.conn, child_conn = context.Pipe()
        self.process = context.Process(target=update_worker, args=(child_conn, spec), daemon=True)
        self.process.start()
        child_conn.close()
        self.counts: ParameterCounts = self.receive()

    def receive(self) -> object:
        try:
            status, value = self.conn.recv()
        except EOFError:
            self.process.join(timeout=10)
            raise WorkerError(f"the {self.spec.critic} worker died (exit code "
                              f"{self.process.exitcode}; out of memory?)") from None
        if status == "error":
            raise WorkerError(value)
        return None if status == "oom" else value

    def step(self, minibatch_size: int) -> tuple[float, float] | None:
        """(wall, CPU) seconds of one update step; None if it ran out of GPU memory."""
        self.conn.send(("step", minibatch_size))
        return self.receive()

    def peak_memory_gb(self) -> float:
        self.conn.send(("memory",))
        return self.receive()

    def close(self) -> None:
        if self.process.is_alive():
            try:
                self.conn.send(("stop",))
            except (BrokenPipeError, OSError):
                pass
            self.process.join(timeout=30)
            if self.process.is_alive():
                self.process.terminate()  # this worker only: we started it
        self.conn.close()


@dataclass
class StepTimes:
    wall: list[float]
    cpu: list[float]
    out_of_memory: bool = False

    @property
    def median_wall(self) -> float:
        return statistics.median(self.wall)

    @property
    def median_cpu(self) -> float:
        return statistics.median(self.cpu)


def alternate_steps(jobs: dict[str, tuple[UpdateWorker, int]], repeats: int) -> dict[str, StepTimes]:
    """Time `repeats` update steps of each (worker, minibatch size), interleaved: forward order
    in even rounds, reversed in odd ones, after one untimed warm-up step each."""
    times = {name: StepTimes([], []) for name in jobs}
    names = list(jobs)
    for name in names:  # warm-up: data, optimizer state, allocator caches
        worker, size = jobs[name]
        times[name].out_of_memory = worker.step(size) is None
    for round_index in range(repeats):
        for name in names if round_index % 2 == 0 else names[::-1]:
            if times[name].out_of_memory:
                continue
            worker, size = jobs[name]
            result = worker.step(size)
            if result is None:
                times[name].out_of_memory = True
                continue
            times[name].wall.append(result[0])
            times[name].cpu.append(result[1])
    return times


# =============================================================================================
# Reporting
# =============================================================================================


def format_gb(gb: float) -> str:
    return f"{gb:.2f} GiB" if gb >= 1 else f"{gb * 1024:.0f} MiB"


def format_count(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def describe_worker(name: str, worker: UpdateWorker) -> str:
    counts = worker.counts
    return (f"{name}: {format_count(counts.base)} base weights, {format_count(counts.lora)} LoRA "
            f"+ {format_count(counts.value_head)} value head trained")


def dry_run(scale: str, image_size: int) -> None:
    """Build the agents on the meta device (no memory, no init) and print parameter counts."""
    vla = build_random_vla(vla_config(scale, image_size), torch.device("meta"), torch.bfloat16)
    parts = {"DINOv2": vla.vision_backbone.featurizer,
             "SigLIP": vla.vision_backbone.fused_featurizer,
             "projector": vla.projector, "Llama": vla.language_model}
    total = sum(p.numel() for p in vla.parameters())
    print(f"{scale} scale, {image_size}px ({vla.num_patches} patches per tower), built on meta: "
          f"{total:,} base weights ("
          + ", ".join(f"{k} {format_count(sum(p.numel() for p in m.parameters()))}"
                      for k, m in parts.items()) + ")")
    for critic in ("h0", "separate"):
        counts = count_parameters(build_bench_agent(scale, critic, image_size,
                                                    torch.device("meta"), seed=0))
        print(f"  critic={critic}: {counts.base:,} base weights, {counts.lora:,} LoRA, "
              f"{counts.value_head:,} value head")
    print(f"RESULT {scale} scale: {format_count(total)} parameters (OpenVLA-7B: 7.54B)")


def run_benchmark(args: argparse.Namespace, device: torch.device, image_size: int) -> None:
    def spec(critic: str) -> WorkerSpec:
        return WorkerSpec(args.model_scale, critic, image_size, str(device),
                          args.grad_accum_steps, args.threads, args.seed)

    mb, accum = args.minibatch_size, args.grad_accum_steps
    concurrent = device.type != "cuda"  # CPU: alternate both; one GPU holds one 7B at a time
    print(f"{args.model_scale} scale on {device}, {image_size}px, update step = {accum} x "
          f"minibatch {mb} + AdamW, {args.repeats} timed steps per configuration (median), "
          f"{'alternating' if concurrent else 'one configuration after the other'}")
    workers: dict[str, UpdateWorker] = {}
    try:
        workers["shared"] = UpdateWorker(spec("h0"))
        print(describe_worker("shared-h0 critic", workers["shared"]))
        if concurrent:
            workers["separate"] = UpdateWorker(spec("separate"))
            print(describe_worker("separate critic ", workers["separate"]))
            times = alternate_steps({name: (w, mb) for name, w in workers.items()}, args.repeats)
            memory = {name: w.peak_memory_gb() for name, w in workers.items()}
            workers.pop("separate").close()
        else:
            times = alternate_steps({"shared": (workers["shared"], mb)}, args.repeats)
            memory = {"shared": workers["shared"].peak_memory_gb()}

        sizes = args.throughput_minibatch_sizes
        throughput = alternate_steps({f"{size}": (workers["shared"], size) for size in sizes},
                                     args.repeats)
        workers.pop("shared").close()

        if not concurrent:
            workers["separate"] = UpdateWorker(spec("separate"))
            print(describe_worker("separate critic ", workers["separate"]))
            times.update(alternate_steps({"separate": (workers["separate"], mb)}, args.repeats))
            memory["separate"] = workers["separate"].peak_memory_gb()
            workers.pop("separate").close()
    finally:
        for worker in workers.values():
            worker.close()

    report(args, device, image_size, times, memory, throughput)


def report(args: argparse.Namespace, device: torch.device, image_size: int,
           times: dict[str, StepTimes], memory: dict[str, float],
           throughput: dict[str, StepTimes]) -> None:
    memory_kind = "peak GPU memory allocated" if device.type == "cuda" else "peak RSS increase"
    on_cpu = device.type == "cpu"
    for name, label in (("shared", "shared-h0 critic"), ("separate", "separate critic ")):
        t = times[name]
        if t.out_of_memory:
            print(f"{label}: out of GPU memory")
            continue
        cpu = f" (CPU {t.median_cpu * 1e3:.0f} ms)" if on_cpu else ""
        print(f"{label}: {t.median_wall * 1e3:8.1f} ms/update{cpu}, "
              f"{memory_kind} {format_gb(memory[name])}")
    setting = (f"{args.model_scale}, {device.type}, {image_size}px, minibatch "
               f"{args.minibatch_size} x {args.grad_accum_steps}")
    shared, separate = times["shared"], times["separate"]
    if shared.out_of_memory or separate.out_of_memory:
        print(f"RESULT shared-h0 vs separate critic ({setting}): a configuration ran out of "
              "GPU memory; no ratio")
    else:
        cpu = (f", CPU time {shared.median_cpu / separate.median_cpu:.2f}x" if on_cpu else "")
        print(f"RESULT shared-h0 vs separate critic ({setting}): memory "
              f"{memory['shared'] / memory['separate']:.2f}x ({format_gb(memory['shared'])} vs "
              f"{format_gb(memory['separate'])}), time {shared.median_wall / separate.median_wall:.2f}x"
              f" ({shared.median_wall * 1e3:.0f} vs {separate.median_wall * 1e3:.0f} ms/update"
              f"{cpu}); paper, OpenVLA-7B on a GPU: ~{PAPER_MEMORY_RATIO}x memory, "
              f"~{PAPER_TIME_RATIO}x time")

    parts = []
    for size, t in throughput.items():
        samples = int(size) * args.grad_accum_steps
        if t.out_of_memory:
            parts.append(f"out of GPU memory at minibatch {size}")
            continue
        cpu = f" ({samples / t.median_cpu:.1f} per CPU-second)" if on_cpu else ""
        parts.append(f"{samples / t.median_wall:.1f} samples/s at minibatch {size}{cpu}")
    print(f"RESULT update throughput ({args.model_scale}, shared-h0, {device.type}, {image_size}px, "
          f"{args.grad_accum_steps} minibatches + AdamW per step): " + ", ".join(parts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto",
                        help="'auto' (CUDA if available, else CPU), 'cpu', 'cuda' or 'cuda:N'")
    parser.add_argument("--model-scale", choices=SCALES, default="tiny",
                        help="'tiny': the tiny preset (build_agent); '7b': the same modules at "
                             "OpenVLA-7B size with random bf16 weights (needs CUDA)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="image size, a multiple of 14 (default: tiny 112, 7b 224)")
    parser.add_argument("--minibatch-size", type=int, default=8,
                        help="samples per forward/backward in the critic comparison (paper: 8)")
    parser.add_argument("--grad-accum-steps", type=int, default=4,
                        help="minibatches per optimizer step (paper: 20; fewer keeps the run short)")
    parser.add_argument("--throughput-minibatch-sizes", type=int, nargs="+", default=[8, 32],
                        help="minibatch sizes of the throughput measurement (shared-h0 critic)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed update steps per configuration (after one warm-up step); "
                             "the median is reported")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads in each worker (0: torch's default, which "
                             "follows OMP_NUM_THREADS)")
    parser.add_argument("--seed", type=int, default=0, help="seed of LoRA, value head and data")
    parser.add_argument("--dry-run", action="store_true",
                        help="only build the models on the meta device and print parameter counts")
    args = parser.parse_args()

    image_size = args.image_size or DEFAULT_IMAGE_SIZE[args.model_scale]
    if image_size % 14:
        sys.exit(f"error: --image-size must be a multiple of the patch size 14, got {image_size}")
    if args.dry_run:
        dry_run(args.model_scale, image_size)
        return
    if min(args.minibatch_size, args.grad_accum_steps, args.repeats,
           *args.throughput_minibatch_sizes) < 1:
        sys.exit("error: --minibatch-size, --grad-accum-steps, --repeats and the throughput "
                 "minibatch sizes must be >= 1")
    device = resolve_device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"error: --device {args.device}: no CUDA device is available here")
    if args.model_scale == "7b" and device.type != "cuda":
        sys.exit("error: --model-scale 7b needs a CUDA GPU (7.5B random weights in bf16, twice "
                 "that with the separate critic); none is in use here. --dry-run checks its "
                 "config on the meta device")
    try:
        run_benchmark(args, device, image_size)
    except WorkerError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
