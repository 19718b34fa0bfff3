"""PPO throughput with 1 rank against 2 ranks (torchrun, gloo on the CPU), in one run.

    .venv/bin/python benchmarks/bench_ddp.py

Runs ppo_vla.py on the 2D twin twice, one torch thread per process: as one process with
--num-envs N, and under `torchrun --nproc_per_node 2` with --num-envs N per rank (twice the
global batch). Each iteration's cost (rollout + update, from the runs' TensorBoard scalars,
first iteration dropped as warm-up) gives env-steps/s of a whole PPO iteration; the RESULT is
the 2-rank / 1-rank ratio (target >= 1.6x on 2 cores: each rank has a core). Not a test.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

REPO = Path(__file__).resolve().parent.parent


def run(ranks: int, args: argparse.Namespace, out: Path) -> float:
    """Env-steps/s of PPO iterations 2..K with `ranks` processes."""
    launcher = [sys.executable] if ranks == 1 else [
        str(Path(sys.executable).parent / "torchrun"), "--standalone", f"--nproc_per_node={ranks}"]
    cmd = [*launcher, "ppo_vla.py", "paper", "--env", "twin", "--num-envs", str(args.num_envs), "--num-steps",
           str(args.num_steps), "--total-iterations", str(args.iterations), "--minibatch-size", "32",
           "--grad-accum-steps", "4", "--eval-every", "0", "--save-every", str(args.iterations),
           "--output-dir", str(out), "--exp-name", f"ranks{ranks}"]
    if args.model_path:
        cmd += ["--model-path", args.model_path]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    events = EventAccumulator(str(out / f"ranks{ranks}"))
    events.Reload()
    seconds = [r.value + u.value for r, u in zip(events.Scalars("time/rollout_s"), events.Scalars("time/update_s"),
                                                  strict=True)][1:]
    return ranks * args.num_envs * args.num_steps * len(seconds) / sum(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-envs", type=int, default=16, help="envs per rank")
    parser.add_argument("--num-steps", type=int, default=15)
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--model-path", default=None, help="the base model (default: random tiny)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        one = run(1, args, Path(tmp))
        two = run(2, args, Path(tmp))
    print(f"RESULT PPO env-steps/s (rollout + update), 1 rank: {one:.0f}, 2 ranks: {two:.0f}")
    print(f"RESULT 2 ranks / 1 rank: {two / one:.2f}x (target >= 1.6x)")


if __name__ == "__main__":
    main()
