"""Run any of the repo's scripts with the twin's study domain shifted: a candidate gripper colour and
step for `ind` and every OOD split (pretraining's own splits keep theirs). The calibration knobs of
docs/STUDY_PROTOCOL.md (section 4) are constants in twin_env.py; this tries a value without editing
them, so a candidate is judged on the base's and the warm-up's calibration numbers first.

    python scripts/shifted.py 90,90,90 0.1 evaluate_ood.py --env twin --calibration --splits ind \\
        --no-paper-columns --checkpoint base --model-path assets/tiny-openvla-twin
    torchrun --standalone --nproc_per_node 2 scripts/shifted.py 90,90,90 0.1 sft_warmup.py twin-warmup \\
        --demo-dir /tmp/demos-grey90 ...   # demos record their robot: give each shift its own --demo-dir
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repo's modules, from anywhere

import twin_env  # noqa: E402


def parse_colour(text: str) -> tuple[int, int, int]:
    parts = text.split(",")
    if len(parts) != 3 or not all(p.strip().isdigit() and 0 <= int(p) <= 255 for p in parts):
        raise ValueError(f"the gripper colour must be R,G,B with each in 0-255, got {text!r}")
    return int(parts[0]), int(parts[1]), int(parts[2])


def parse_step(text: str) -> float:
    try:
        step = float(text)
    except ValueError:
        raise ValueError(f"the step must be a number, got {text!r}") from None
    if not 0.0 < step <= 0.11:  # above 0.11 the expert overshoots the grasp radius (twin_env.STUDY_STEP)
        raise ValueError(f"the step must be in (0, 0.11], got {step}")
    return step


def main() -> None:
    if len(sys.argv) < 4:
        sys.exit("usage: scripts/shifted.py R,G,B STEP SCRIPT.py [ARGS...]")
    try:
        colour, step = parse_colour(sys.argv[1]), parse_step(sys.argv[2])
    except ValueError as error:
        sys.exit(f"error: {error}")
    script = ROOT / sys.argv[3]
    if not script.is_file():
        sys.exit(f"error: no script {sys.argv[3]!r} in {ROOT}")
    twin_env.STUDY_GRIPPER_COLOUR, twin_env.STUDY_STEP = colour, step
    print(f"study domain shifted: gripper colour {colour}, step {step}", file=sys.stderr)
    sys.argv = [str(script), *sys.argv[4:]]
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
