"""Reading a user's local weights file (an encoder's or a foundation model's) as names -> tensors.

A weights file is data: it is read with ``safetensors`` (``*.safetensors``, which holds only
tensors) or with ``torch.load(weights_only=True)`` (``.bin``/``.pth``/``.pt``: tensors and plain
containers only; a pickle that would build any other object or call anything is refused before
it runs). Nothing here downloads: the path must name a file on this machine.

Used by :func:`lymphnode.models.smp_unet.load_encoder_weights` (``model.encoder_weights``) and
:func:`lymphnode.models.vit_weights.load_vit_weights` (``model.weights``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lymphnode.core.errors import ConfigError

SAFETENSORS_SUFFIX = ".safetensors"
WRAPPER_KEYS = ("state_dict", "model")  # {"state_dict": {...}} / {"model": {...}, "epoch": 3}
MAX_LISTED = 10  # problems named in an error message


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__


def _unwrap(state: Any, path: Path, what: str) -> dict[str, Tensor]:
    for key in WRAPPER_KEYS:
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ConfigError(
            f"{what}={path} holds a {type(state).__name__} that is not a state dict; "
            "expected names -> tensors (or a dict with 'state_dict' / 'model' holding one)"
        )
    return {str(k): v for k, v in state.items()}


def read_state_dict(path: str | Path, what: str = "weights") -> dict[str, Tensor]:
    """The tensors of the local weights file ``path`` by name (on the CPU).

    ``*.safetensors`` files are read with safetensors; any other file with
    ``torch.load(weights_only=True)``, unwrapping a state dict stored under ``state_dict`` or
    ``model``. ``what`` is the parameter that named the file (``encoder_weights``, ``weights``):
    every ConfigError starts with ``{what}={path}`` (missing file, unreadable or pickle payload,
    not a state dict).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what}={path} does not exist (expected a local weights file)")
    if path.suffix == SAFETENSORS_SUFFIX:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path), device="cpu"))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ConfigError(
                f"{what}={path} cannot be read as a safetensors file ({_first_line(exc)})"
            ) from exc
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle payloads, truncated files, foreign formats
        raise ConfigError(
            f"{what}={path} cannot be read as a torch weights file with weights_only=True "
            f"({_first_line(exc)})"
        ) from exc
    return _unwrap(raw, path, what)


def describe_problems(problems: Sequence[str], limit: int = MAX_LISTED) -> str:
    """The first ``limit`` problems, one an indented line, and how many more there are."""
    listed = "\n  ".join(problems[:limit])
    more = f"\n  ... {len(problems) - limit} more" if len(problems) > limit else ""
    return f"\n  {listed}{more}"


__all__ = ["MAX_LISTED", "describe_problems", "read_state_dict"]
