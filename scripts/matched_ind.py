"""OOD success against in-distribution success over training, one line per method: separates
"generalizes better" from "trained further" (issue: the study's answer with its uncertainty).

Reads the results.json that evaluate_ood.py wrote for checkpoints labelled METHOD@N, N the step or
iteration of a snapshot (sft_warmup.py / ppo_vla.py --keep-checkpoints keep RUN/snapshots/...):

    python evaluate_ood.py --env twin --splits all --checkpoint SFT@250=runs/sft/snapshots/step_250 \\
        --checkpoint PPO@4=runs/ppo/snapshots/iteration_4 ... --output-dir results/matched
    python scripts/matched_ind.py results/matched/results.json --out docs/matched_ind.png

At the same `ind` success, a method whose line lies higher kept or gained more out of distribution.
A label without @N (the base, the warm-up) is drawn as a point on every panel. `--also FILE
--steps SFT=1000 PPO=16` adds the final checkpoints from another evaluation (`make demo`: its main
one, on more episodes), as the given steps of their methods' lines:

    python scripts/matched_ind.py demo/matched/results.json --also demo/results/results.json \
        --steps SFT=1000 PPO=16 --out demo/matched/matched_ind.png
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import tyro

matplotlib.use("Agg")  # files only, no window
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's modules, from anywhere

from cli import parse_cli  # noqa: E402

DIMENSIONS = ("vision", "semantics", "execution")


@dataclass
class Args:
    """Plot OOD success against ind success along training, per method."""

    results: tyro.conf.Positional[str]
    """results.json written by evaluate_ood.py (checkpoints labelled METHOD@STEP)"""
    out: str = "matched_ind.png"
    """the PNG to write"""
    also: str | None = None
    """a second results.json whose checkpoints named in --steps join the lines (e.g. the final ones,
    evaluated on more episodes)"""
    steps: tuple[str, ...] = ()
    """LABEL=N for each checkpoint of --also to add: its method LABEL at step N"""


def series(summary: dict[str, dict[str, dict]]) -> dict[str, list[tuple[int | None, float, dict[str, float]]]]:
    """method -> [(step, ind %, {dimension: average %})], sorted by step; labels without @N are
    methods of one point with step None."""
    found: dict[str, list[tuple[int | None, float, dict[str, float]]]] = {}
    for label, rows in summary.items():
        method, _, step = label.partition("@")
        if step and not step.isdigit():
            raise ValueError(f"checkpoint label {label!r}: expected METHOD@N with N an integer")
        averages = {d: rows[f"avg:{d}"]["mean"] for d in DIMENSIONS if f"avg:{d}" in rows}
        if "ind" not in rows or not averages:
            raise ValueError(f"{label}: the results need `ind` and at least one OOD dimension (--splits all)")
        found.setdefault(method, []).append((int(step) if step else None, rows["ind"]["mean"], averages))
    return {method: sorted(points, key=lambda p: -1 if p[0] is None else p[0]) for method, points in found.items()}


def plot(lines: dict[str, list[tuple[int | None, float, dict[str, float]]]], path: Path, title: str) -> None:
    dimensions = [d for d in DIMENSIONS if any(d in p[2] for points in lines.values() for p in points)]
    fig, axes = plt.subplots(1, len(dimensions), figsize=(4.2 * len(dimensions), 4.0), squeeze=False)
    for ax, dimension in zip(axes[0], dimensions, strict=True):
        for method, points in lines.items():
            xs, ys = [p[1] for p in points], [p[2][dimension] for p in points]
            marker = "o" if len(points) > 1 else "s"
            ax.plot(xs, ys, marker=marker, linestyle="-" if len(points) > 1 else "none", label=method)
            for step, x, y in ((p[0], p[1], p[2][dimension]) for p in points if p[0] is not None):
                ax.annotate(str(step), (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
        ax.set_title(dimension)
        ax.set_xlabel("ind success (%)")
        ax.set_ylabel(f"{dimension} average success (%)")
        ax.grid(color="0.85", linewidth=0.6)
    handles, names = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, names, loc="upper center", ncol=min(len(names), 6), frameon=False)
    fig.suptitle(title, y=0.02, fontsize=9)
    fig.tight_layout(rect=(0, 0.04, 1, 0.9))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def read_results(path: Path) -> dict:
    if not path.is_file():
        sys.exit(f"error: no {path} (evaluate_ood.py writes OUTPUT_DIR/results.json)")
    return json.loads(path.read_text())


def renamed(summary: dict[str, dict], steps: tuple[str, ...]) -> dict[str, dict]:
    """The checkpoints named by LABEL=N, relabelled LABEL@N (the others left out)."""
    chosen = {}
    for spec in steps:
        label, _, step = spec.partition("=")
        if not step.isdigit() or label not in summary:
            raise ValueError(f"--steps {spec}: expected LABEL=N with LABEL one of {', '.join(summary)}")
        chosen[f"{label}@{step}"] = summary[label]
    return chosen


def main(args: Args) -> None:
    if bool(args.also) != bool(args.steps):
        sys.exit("error: --also FILE and --steps LABEL=N go together")
    document = read_results(Path(args.results))
    run = document["args"]
    title = f"{run['env']}, {len(run['seeds'])} seed(s) x {run['episodes']} episodes per split"
    summary = dict(document["summary"])
    try:
        if args.also:
            other = read_results(Path(args.also))
            summary.update(renamed(other["summary"], args.steps))
            title += f" ({', '.join(args.steps)}: {len(other['args']['seeds'])} x {other['args']['episodes']})"
        lines = series(summary)
    except ValueError as error:
        sys.exit(f"error: {error}")
    plot(lines, Path(args.out), f"{title}, temperature {run['temperature']}; numbers: training step / iteration")
    for method, points in lines.items():
        for step, ind, averages in points:
            cells = "  ".join(f"{d} {v:5.1f}" for d, v in averages.items())
            print(f"{method:>10} {'' if step is None else step:>6}  ind {ind:5.1f}  {cells}")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main(parse_cli(Args))
