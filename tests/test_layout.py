"""The files' layers: imports point one way (no cycle, none hidden inside a function), and each
algorithm script runs from a copy of exactly the files docs/DESIGN.md names as its unit.

    tasks.py (the task's definition)  model.py (the VLA)
    twin_env.py  maniskill_env.py     (on tasks)
    envs.py  cli.py                   (make_vec_env; flags checked before torch)
    common.py                         (the agent and the plumbing, on model and tasks)
    demos.py                          (expert demonstrations, on common and envs)
    the scripts                       (on all of the above)
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, SIZE

MODULES = {path.stem for path in REPO.glob("*.py")}
SCRIPTS = ("ppo_vla", "grpo_vla", "dpo_vla", "sft_warmup", "evaluate_ood", "pretrain_tiny")
# The one import inside a function: the ManiSkill family, only when asked for (mani_skill and
# SAPIEN take seconds to import; the twin needs neither). Not a cycle: maniskill_env imports tasks.
LAZY = {("envs", "maniskill_env")}
# What a script needs beside itself on the twin (docs/DESIGN.md, "Copying a script").
TWIN_UNIT = ["cli.py", "common.py", "model.py", "tasks.py", "envs.py", "twin_env.py"]
COPY_UNITS = {"ppo_vla": TWIN_UNIT, "grpo_vla": TWIN_UNIT, "dpo_vla": TWIN_UNIT,
              "sft_warmup": [*TWIN_UNIT, "demos.py"]}


def repo_imports(module: str) -> list[tuple[str, bool]]:
    """(imported repo module, inside a function?) for every import statement of MODULE.py."""
    tree = ast.parse((REPO / f"{module}.py").read_text())
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            names: list[str] = []
            if isinstance(child, ast.Import):
                names = [alias.name.split(".")[0] for alias in child.names]
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                names = [child.module.split(".")[0]]
            found.extend((name, inner) for name in names if name in MODULES and name != module)
            visit(child, inner)

    visit(tree, False)
    return found


def dependencies(module: str) -> set[str]:
    """Every repo module MODULE needs, transitively (lazy imports included)."""
    seen: set[str] = set()
    stack = [module]
    while stack:
        for name, _ in repo_imports(stack.pop()):
            if name not in seen:
                seen.add(name)
                stack.append(name)
    return seen


def test_the_import_graph_has_no_cycle() -> None:
    graph = {module: {name for name, _ in repo_imports(module)} for module in MODULES}
    for module in graph:  # a cycle through `module` means it depends on itself
        assert module not in dependencies(module), f"{module} imports itself through {graph[module]}"


def test_no_module_imports_another_inside_a_function_but_the_simulator() -> None:
    hidden = {(module, name) for module in MODULES for name, inner in repo_imports(module) if inner}
    assert hidden == LAZY


def test_the_copy_units_are_what_the_scripts_import() -> None:
    for script, unit in COPY_UNITS.items():
        needed = dependencies(script) - {"maniskill_env"}  # the ManiSkill family: only when asked for
        assert needed == {Path(f).stem for f in unit}, script
    design = (REPO / "docs" / "DESIGN.md").read_text()
    assert " + ".join(TWIN_UNIT) in design, "docs/DESIGN.md states the copy unit"


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(COPY_UNITS))
def test_a_script_runs_from_a_copy_of_its_unit(script: str, tmp_path: Path) -> None:
    # Someone copies a script and what it needs into their own project, and runs it there.
    for name in [f"{script}.py", *COPY_UNITS[script]]:
        shutil.copy(REPO / name, tmp_path / name)
    small = ["--env", "twin", "--image-size", str(SIZE), "--device", "cpu", "--output-dir", "runs",
             "--eval-every", "0", "--lora-rank", "4"]
    flags = {
        "ppo_vla": ["--num-envs", "2", "--num-steps", "4", "--total-iterations", "1", "--minibatch-size", "8",
                    "--grad-accum-steps", "1"],
        "grpo_vla": ["--num-envs", "4", "--group-size", "2", "--max-episode-steps", "4", "--total-iterations", "1",
                     "--minibatch-size", "16", "--grad-accum-steps", "1"],
        "dpo_vla": ["--num-envs", "4", "--num-states", "4", "--rollouts-per-state", "2", "--rounds", "1",
                    "--max-episode-steps", "4"],
        "sft_warmup": ["--num-demos", "2", "--val-demos", "1", "--num-envs", "2", "--total-steps", "2",
                       "--batch-size", "4", "--grad-accum-steps", "1", "--demo-dir", "demos"],
    }[script]
    recipe = ["paper"] if script == "ppo_vla" else []  # PPO without a GPU: else its `laptop` recipe, on assets/
    result = subprocess.run([sys.executable, f"{script}.py", *recipe, *small, *flags], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "runs" / script / "checkpoint" / "config.json").exists(), sorted(tmp_path.rglob("*"))
