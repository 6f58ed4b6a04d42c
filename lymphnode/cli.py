"""``lymphnode <command> [args ...]``: the console script, one subcommand per CLI module.

    lymphnode --help                       # the commands, one line each
    lymphnode synth out_dir=outputs/demo   # = python -m lymphnode.synth out_dir=outputs/demo
    lymphnode train experiment=pretrain   # = python -m lymphnode.train experiment=pretrain
    lymphnode report outputs/demo/runs     # = python -m lymphnode.report outputs/demo/runs

The arguments after the command go to that command unchanged (Hydra overrides or argparse options),
and ``lymphnode <command> --help`` is the command's own help. A Hydra command becomes
``python -m lymphnode.<command>`` itself (see :func:`run_command`). Only the chosen command's module
is imported, so ``lymphnode --help`` does not load torch. A new CLI module is one line in
:data:`COMMANDS`.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from collections.abc import Sequence
from typing import NamedTuple

from lymphnode import __version__
from lymphnode.core.boundary import EXIT_USER_ERROR


class Command(NamedTuple):
    """A subcommand: the module run by ``python -m <module>``, how it reads its arguments
    (``hydra``: overrides from ``sys.argv``; ``argparse``: ``main(argv) -> exit code``) and the line
    ``lymphnode --help`` shows."""

    module: str
    kind: str
    help: str


COMMANDS: dict[str, Command] = {
    "synth": Command(
        "lymphnode.synth", "hydra", "made-up CAMELYON16-like slides (pyramidal TIFF + ASAP XML)"
    ),
    "prepare": Command(
        "lymphnode.prepare", "hydra", "slides + annotations -> unlabeled/labeled/test patch caches"
    ),
    "train": Command(
        "lymphnode.train",
        "hydra",
        "one run: experiment=pretrain|finetune|scratch; --multirun for the sweeps",
    ),
    "report": Command(
        "lymphnode.report", "argparse", "results table (Markdown + CSV) and F1 plot of a sweep"
    ),
    "infer": Command(
        "lymphnode.infer", "hydra", "slide + checkpoint -> tumor-probability heatmap + overlay"
    ),
    "evaluate": Command(
        "lymphnode.evaluate", "hydra", "heatmaps + annotations -> CAMELYON16 FROC, AUC, pixel F1"
    ),
    "export": Command(
        "lymphnode.export", "hydra", "heatmaps -> lesion outlines as QuPath GeoJSON / ASAP XML"
    ),
    "select": Command(
        "lymphnode.select", "hydra", "checkpoint + slides -> the k patches worth labelling (QuPath)"
    ),
    "cache": Command(
        "lymphnode.cache", "argparse", "patch caches: import a folder of patches, info / verify"
    ),
    "annotations": Command(
        "lymphnode.annotations", "argparse", "ASAP XML outlines: to-mask (pyramidal 0/255 TIFF)"
    ),
}

PROG = "lymphnode"


def usage() -> str:
    """The text of ``lymphnode --help``: usage, then every command with its line."""
    width = max(map(len, COMMANDS))
    lines = [
        f"usage: {PROG} <command> [args ...]",
        "",
        "Few-label segmentation of lymph-node metastases in whole-slide images.",
        "",
        "commands:",
        *(f"  {name:<{width}}  {command.help}" for name, command in COMMANDS.items()),
        "",
        f"'{PROG} <command> --help' shows a command's own options; "
        f"'{PROG} <command> ...' = 'python -m lymphnode.<command> ...'.",
    ]
    return "\n".join(lines) + "\n"


def run_command(name: str, args: Sequence[str]) -> int:
    """Run command ``name`` with its arguments ``args``; returns its exit code.

    A Hydra command replaces this process with ``python -m lymphnode.<name> args`` (on Windows: runs
    it and waits), so that it is exactly that command: Lightning's DDP launcher starts the other
    ranks by re-running ``sys.argv`` (with ``-m`` when ``__main__`` is a module), which must name the
    command's module, not this dispatcher. An argparse command runs in this process.
    """
    command = COMMANDS[name]
    if command.kind == "argparse":
        module = importlib.import_module(command.module)
        return int(module.main(list(args)))
    argv = [sys.executable, "-m", command.module, *args]
    sys.stdout.flush()
    sys.stderr.flush()
    if os.name == "posix":
        os.execv(sys.executable, argv)  # does not return
    return subprocess.call(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``lymphnode`` console script; returns the exit code (1: unknown command)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        (sys.stdout if argv else sys.stderr).write(usage())
        return 0 if argv else EXIT_USER_ERROR
    if argv[0] == "--version":
        print(f"{PROG} {__version__}")
        return 0
    name, args = argv[0], argv[1:]
    if name not in COMMANDS:
        sys.stderr.write(
            f"error: unknown command {name!r}; expected one of {', '.join(COMMANDS)} "
            f"(see '{PROG} --help')\n"
        )
        return EXIT_USER_ERROR
    return run_command(name, args)


if __name__ == "__main__":
    sys.exit(main())
