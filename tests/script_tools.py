"""Helpers for tests that run lymphnode's CLIs in subprocesses or import the experiment scripts.

:func:`cli_env` is the environment of a CLI subprocess (offline wandb, no albumentations update
check, the repository and tests/ on the path); :func:`load_script` imports a script of
``experiments/`` (not a package) as a module.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

PROJECT_ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def cli_env(**extra: str) -> dict[str, str]:
    """``os.environ`` plus what every CLI subprocess of the tests needs, plus ``extra``."""
    return {
        **os.environ,
        "WANDB_MODE": "offline",
        "NO_ALBUMENTATIONS_UPDATE": "1",
        "PYTHONWARNINGS": "ignore",
        "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT), str(TESTS)]),
        **extra,
    }


def load_script(path: Path, name: str) -> ModuleType:
    """Import the script at ``path`` as module ``name`` (registered in ``sys.modules``, which
    dataclasses defined in it need)."""
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
