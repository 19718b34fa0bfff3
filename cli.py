"""Command-line plumbing shared by the scripts. Light on purpose (tyro and the standard library):
each script parses and checks its flags with it BEFORE importing torch, so `--help` and a
mistyped or out-of-range flag answer in well under two seconds.

    ARGS = parse_cli(Args, check_args, RECIPES)    # in a script, right after its Args

A recipe is a named set of defaults, a tyro subcommand: `python ppo_vla.py twin --seed 1` starts
from RECIPES["twin"] (the README's numbers on the 2D twin) and applies the flags on top;
`python ppo_vla.py --epochs 1` uses the dataclass defaults (the paper's), the `paper` subcommand
that tyro picks when no recipe is named (PPO on a machine without a GPU: its `laptop` recipe).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import tyro

from tasks import check_split  # numpy only: still no torch

T = TypeVar("T")
TINY_PATCH_SIZE = 16  # = model.TINY_PATCH_SIZE (tests check), kept here so cli.py never imports torch
PAPER = "paper"  # parse_cli's subcommand for the dataclass defaults, beside a script's recipes


def parse_cli(args_type: type[T], check: Callable[[T], None] | None = None,
              recipes: Mapping[str, tuple[str, T]] | None = None,
              argv: list[str] | None = None, no_gpu_recipe: str | None = None) -> T:
    """Flags -> a checked Args. `recipes` are tyro.extras.overridable_config_cli's named
    (description, default Args) pairs: a first word naming one picks its defaults, the flags apply
    on top. That helper requires a first word; here none is needed (the README's
    `python ppo_vla.py --epochs 1`), so the dataclass defaults are one more subcommand, PAPER, and
    tyro's default subcommand (CascadeSubcommandArgs lets its flags come without its name).
    no_gpu_recipe: the recipe taken instead of PAPER when none is named on a machine without an
    NVIDIA GPU (PPO's `laptop`: the first command learns in minutes there), said on stderr.
    A ValueError from `check` becomes one line on stderr and exit status 2, as argparse's own."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if recipes:
        assert PAPER not in recipes, f"{PAPER!r} names the dataclass defaults"
        defaults = {PAPER: args_type(), **{name: default for name, (_, default) in recipes.items()}}
        descriptions = {PAPER: "the dataclass defaults (the paper's); also when no recipe is named",
                        **{name: text for name, (text, _) in recipes.items()}}
        doc = (args_type.__module__ and sys.modules[args_type.__module__].__doc__) or ""
        default = PAPER
        if no_gpu_recipe is not None and not (argv and argv[0] in defaults) and not nvidia_gpu_present():
            default = no_gpu_recipe
        args = tyro.cli(tyro.extras.subcommand_type_from_defaults(defaults, descriptions), args=argv,
                        default=defaults[default], config=(tyro.conf.CascadeSubcommandArgs,),
                        description=f"{doc.strip()}\n\nRecipes (subcommands below): a first word that "
                                    "sets other defaults, the flags applying on top.")
    else:
        args = tyro.cli(args_type, args=argv)
    if check is not None:
        try:
            check(args)
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            raise SystemExit(2) from None
    if recipes and default != PAPER:
        print(f"note: no GPU here, so the '{default}' recipe: {descriptions[default]}; name the "
              f"'{PAPER}' recipe first for the paper's defaults", file=sys.stderr)
    return args


# --- checks the scripts share (each raises ValueError naming the flag) ------------------------


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def require_positive(args: Any, *names: str) -> None:
    """Each named field is an int >= 1."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"{flag(name)} must be at least 1, got {value}")


def require_non_negative(args: Any, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and not value >= 0:  # `not >=` also rejects nan
            raise ValueError(f"{flag(name)} must be >= 0, got {value}")


def require_finite_positive(args: Any, *names: str) -> None:
    """Each named field is a float > 0 and finite (learning rates, temperatures, betas)."""
    for name in names:
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"{flag(name)} must be a positive number, got {value}")


def check_device(name: str) -> None:
    """--device is auto, cpu, cuda or cuda:N (whether that GPU exists is checked once torch is
    imported)."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", name):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")


def check_model_args(args: Any) -> None:
    """The flags every training script shares: task, model, adapter, run directory, resume."""
    check_device(args.device)
    check_split(args.split, args.env)
    require_positive(args, "lora_rank", "lora_alpha", "image_size")
    if args.image_size is not None and args.model_path is None and args.image_size % TINY_PATCH_SIZE:
        raise ValueError(f"--image-size must be a multiple of {TINY_PATCH_SIZE} (the tiny model's patch), "
                         f"got {args.image_size}")
    if args.resume and args.init_checkpoint is not None:
        raise ValueError("--resume continues this run from its own checkpoint; drop "
                         "--init-checkpoint (it only seeds a new run)")
    # A new run takes the base model's statistics; a checkpoint brings its own.
    fresh = not args.resume and args.init_checkpoint is None
    check_unnorm_key(args.model_path, args.unnorm_key, required=fresh)
    if not args.exp_name or "/" in args.exp_name:
        raise ValueError(f"--exp-name must be a plain name, got {args.exp_name!r}")
    check_output_dir(args.output_dir, args.exp_name)


def check_output_dir(output_dir: str, subdir: str = "") -> None:
    """A file where OUTPUT_DIR/SUBDIR (or a folder above it) belongs would surface only at the
    first write, as a NotADirectoryError traceback: one line now, naming --output-dir."""
    target = Path(output_dir) / subdir
    in_the_way = next((path for path in (target, *target.parents) if path.is_file()), None)
    if in_the_way is not None:
        which = "" if in_the_way == Path(output_dir) else f": {in_the_way}"
        raise ValueError(f"--output-dir {output_dir}{which} is a file, not a directory")


def check_unnorm_key(model_path: str | None, unnorm_key: str | None, required: bool = True) -> None:
    """--unnorm-key against the datasets whose action statistics the model directory holds
    (config.json's norm_stats, else dataset_statistics.json), from those JSON files alone: a
    wrong or missing key fails here, not after minutes of set-up or a 15 GB read. required: the
    run takes the base's statistics (a new run, or evaluate_ood's 'base'), so several datasets
    and no key is an error. Unreadable files are left to the loader to name."""
    if model_path is None:  # the tiny model built in code, or a checkpoint's own base
        if unnorm_key is not None and required:
            raise ValueError("--unnorm-key picks the statistics of a --model-path directory; "
                             "the tiny model built in code has none")
        return
    model_dir = Path(model_path)
    try:
        stats = json.loads((model_dir / "config.json").read_text()).get("norm_stats")
        if not stats and (model_dir / "dataset_statistics.json").exists():
            stats = json.loads((model_dir / "dataset_statistics.json").read_text())
    except (OSError, ValueError, AttributeError):
        return
    if not stats or not isinstance(stats, dict):
        return
    if unnorm_key is None and required and len(stats) > 1:
        raise ValueError(f"{model_path} has action statistics for {len(stats)} datasets; choose "
                         f"one with --unnorm-key from {sorted(stats)}")
    if unnorm_key is not None and unnorm_key not in stats:
        raise ValueError(f"--unnorm-key {unnorm_key!r} is not in {model_path}'s statistics "
                         f"{sorted(stats)}")


DEVICE_FILES = Path("/dev")  # the driver's /dev/nvidia0, /dev/nvidia1, ...: GPUs this process can open


def nvidia_gpu_present() -> bool:
    """Can this process reach an NVIDIA GPU, whatever torch sees? Its device files (a container
    started without GPUs has none, though /proc may list the host's), else nvidia-smi's list;
    never when CUDA_VISIBLE_DEVICES hides every GPU on purpose ("" or -1)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1"):
        return False
    if any(DEVICE_FILES.glob("nvidia[0-9]*")):
        return True
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return listing.returncode == 0 and "GPU" in listing.stdout
