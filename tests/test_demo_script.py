"""scripts/demo.sh (`make demo`, `make study`) goes on where it stopped: a finished training run is
kept, a killed one continues with --resume, the evaluations re-run only when a training run
changed. Run with stand-ins for `python` and `torchrun` that log their command lines and leave
what the real scripts leave (a checkpoint, snapshots, an output folder), so the test takes
seconds: what it checks is the script's bookkeeping, each stage's own resume is tested with it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from conftest import REPO

FAKE_TORCHRUN = r"""#!/usr/bin/env bash
echo "torchrun $*" >> "$FAKE_LOG"
script=$4; shift 4
out= name=
while (($#)); do case $1 in --output-dir) out=$2;; --exp-name) name=$2;; esac; shift; done
if [[ $script == evaluate_ood.py ]]; then mkdir -p "$out"; echo "table of $out"; exit 0; fi
mkdir -p "$out/$name/checkpoint"
[[ $name == ppo-* ]] && mkdir -p "$out/$name/snapshots/step_4" "$out/$name/snapshots/step_16"
[[ $name == sft-* ]] && mkdir -p "$out/$name/snapshots/step_250" "$out/$name/snapshots/step_1000"
[[ $name == "${FAKE_KILL:-}" ]] && exit 1  # killed after its first checkpoint
exit 0
"""
FAKE_PYTHON = """#!/usr/bin/env bash
echo "python $*" >> "$FAKE_LOG"
"""


def run_demo(tmp_path: Path, kill: str = "", study: bool = False) -> tuple[subprocess.CompletedProcess, list[str]]:
    """scripts/demo.sh with the stand-ins -> (its result, the commands it ran this time)."""
    bin_dir = tmp_path / "bin"
    if not bin_dir.exists():
        bin_dir.mkdir()
        for name, text in (("torchrun", FAKE_TORCHRUN), ("python", FAKE_PYTHON)):
            (bin_dir / name).write_text(text)
            (bin_dir / name).chmod(0o755)
    log = tmp_path / "commands.log"
    log.write_text("")
    env = {**os.environ, "PY": str(bin_dir / "python"), "DEMO_DIR": str(tmp_path / "demo"),
           "FAKE_LOG": str(log), "FAKE_KILL": kill, "STUDY": str(int(study))}
    result = subprocess.run(["bash", str(REPO / "scripts" / "demo.sh")], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=60)
    return result, log.read_text().splitlines()


def script_of(command: str) -> str:
    """'torchrun --standalone --nproc_per_node 2 ppo_vla.py ... --exp-name ppo-0' -> 'ppo-0' or
    'evaluate_ood.py'; 'python scripts/matched_ind.py ...' -> 'matched_ind.py'."""
    words = command.split()
    if "--exp-name" in words:
        return words[words.index("--exp-name") + 1]
    return Path(words[4] if words[0] == "torchrun" else words[1]).name


def test_the_demo_goes_on_where_it_stopped(tmp_path: Path) -> None:
    runs = tmp_path / "demo" / "runs"
    # PPO killed after its first checkpoint: the warm-up is finished, nothing is evaluated.
    result, commands = run_demo(tmp_path, kill="ppo-0")
    assert result.returncode != 0
    assert [script_of(c) for c in commands] == ["warmup-0", "ppo-0"]
    assert "--resume" not in commands[1] and (runs / "warmup-0" / "done").exists()
    assert not (runs / "ppo-0" / "done").exists()

    # Again: the warm-up is kept, PPO continues from its checkpoint, then SFT and the evaluations.
    result, commands = run_demo(tmp_path)
    assert result.returncode == 0, result.stderr
    assert [script_of(c) for c in commands] == ["ppo-0", "sft-0", "evaluate_ood.py", "evaluate_ood.py",
                                                "matched_ind.py"]
    assert "--resume" in commands[0] and "--resume" not in commands[1]
    assert f"{runs}/warmup-0 finished in an earlier run: kept" in result.stdout
    # The matched evaluation plays the snapshots along training, the final ones come from the main
    # evaluation (--also).
    matched = commands[3].split()
    assert "SFT@250=" + str(runs / "sft-0/snapshots/step_250") in matched
    assert "PPO@4=" + str(runs / "ppo-0/snapshots/step_4") in matched
    assert not any("step_1000" in word or "step_16" in word for word in matched)
    assert commands[4].endswith("--steps SFT=1000 PPO=16 --out " + str(tmp_path / "demo/matched/matched_ind.png"))

    # Finished: nothing runs again, the table is shown from the earlier run.
    result, commands = run_demo(tmp_path)
    assert result.returncode == 0 and commands == []
    assert f"table of {tmp_path / 'demo' / 'results'}" in result.stdout

    # A training run that changes (here: SFT continued) makes both evaluations stale.
    (runs / "sft-0" / "done").unlink()
    result, commands = run_demo(tmp_path)
    assert [script_of(c) for c in commands] == ["sft-0", "evaluate_ood.py", "evaluate_ood.py", "matched_ind.py"]
    assert "--resume" in commands[0]


def test_the_study_trains_every_stage_with_three_seeds_and_evaluates_every_snapshot(tmp_path: Path) -> None:
    result, commands = run_demo(tmp_path, study=True)
    assert result.returncode == 0, result.stderr
    runs = [script_of(c) for c in commands[:-3]]
    assert runs == [f"{stage}-{seed}" for seed in range(3) for stage in ("warmup", "ppo", "sft", "grpo", "dpo")]
    main, matched, figure = commands[-3:]
    assert main.count("--checkpoint ") == 15 and "--seeds 0 1 --episodes 64" in main
    # The matched evaluation plays every snapshot, the final ones too (the main table pools 3 runs).
    assert "step_1000" in matched and "step_16" in matched and "--episodes 32" in matched
    assert "--also" not in figure
