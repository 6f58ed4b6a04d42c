"""Reading lymphnode checkpoints: pretrain -> fine-tune weight transfer and models for inference.

A lymphnode checkpoint is a Lightning checkpoint written by :class:`ReconstructionModule` or
:class:`MultiTaskModule`: ``state_dict`` holds the UNet under ``net.*`` and ``hyper_parameters``
holds at least ``model`` (the UNet's constructor arguments), ``normalize`` ({"mean", "std"}, 0..1
units, applied as ``(rgb / 255 - mean) / std``), ``patch_size`` (px at ``level``) and ``level``.
Checkpoints are read with ``torch.load(weights_only=True)``: they hold only tensors and plain
containers, so a file from elsewhere cannot run code on load.
"""

from __future__ import annotations

import logging
import pathlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lymphnode.core.errors import CheckpointError, ConfigError
from lymphnode.models.unet import UNet, build_unet

log = logging.getLogger(__name__)

NET_PREFIX = "net."  # the LightningModules hold the UNet as `self.net`
REQUIRED_HPARAMS = ("model", "normalize", "patch_size", "level")
TOP_DECODER_PREFIX = "decoder.0."  # the block the top skip feeds


@dataclass
class LoadReport:
    """What :func:`load_pretrained_weights` did, by parameter/buffer name (without ``net.``)."""

    path: Path
    loaded: list[str] = field(default_factory=list)
    reinitialized: list[str] = field(default_factory=list)  # top decoder block on top_skip change
    skipped: list[str] = field(default_factory=list)  # shape mismatches (strict_shapes=False only)
    missing: list[str] = field(default_factory=list)  # in the model, not in the checkpoint
    unexpected: list[str] = field(default_factory=list)  # in the checkpoint, not in the model

    def summary(self) -> str:
        """One line for the log."""
        return (
            f"{self.path}: loaded {len(self.loaded)} tensors, re-initialised "
            f"{len(self.reinitialized)}, skipped {len(self.skipped)} (shape), "
            f"{len(self.missing)} missing, {len(self.unexpected)} unexpected"
        )


@dataclass
class InferenceModel:
    """A trained UNet (eval mode) with what is needed to feed it patches like in training."""

    net: UNet
    mean: tuple[float, ...]  # per channel, 0..1 units
    std: tuple[float, ...]  # per channel, 0..1 units
    patch_size: int  # px at `level`
    level: int  # slide pyramid level the patches were read at
    hparams: dict[str, Any]

    def prepare(self, rgb: np.ndarray | Tensor) -> Tensor:
        """uint8 RGB (H, W, 3) or (B, H, W, 3) -> normalised float (B, 3, H, W) on the net's
        device: ``(rgb / 255 - mean) / std``."""
        x = torch.as_tensor(rgb)
        if x.ndim == 3:
            x = x.unsqueeze(0)
        if x.ndim != 4 or x.shape[-1] != len(self.mean):
            raise ConfigError(
                f"prepare() takes (H, W, {len(self.mean)}) or (B, H, W, {len(self.mean)}) RGB; "
                f"got shape {tuple(x.shape)}"
            )
        device = next(self.net.parameters()).device
        x = x.to(device).permute(0, 3, 1, 2).float() / 255.0  # (B, 3, H, W) 0..1
        mean = torch.tensor(self.mean, device=device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=device).view(1, -1, 1, 1)
        return (x - mean) / std


def _read_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist (or is not a file)")
    try:
        with torch.serialization.safe_globals([pathlib.PosixPath, pathlib.WindowsPath]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        raise CheckpointError(
            f"checkpoint {path} is not a torch checkpoint readable with weights_only=True "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from exc
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(
            f"checkpoint {path} holds a {type(ckpt).__name__}; expected a Lightning checkpoint dict"
        )
    return dict(ckpt)


def _lymphnode_parts(
    ckpt: Mapping[str, Any], path: Path
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(hyper_parameters, UNet state dict without ``net.``) or CheckpointError naming what lacks."""
    hparams = ckpt.get("hyper_parameters")
    state = ckpt.get("state_dict")
    problems = []
    if not isinstance(hparams, Mapping):
        problems.append("no 'hyper_parameters'")
    else:
        absent = [k for k in REQUIRED_HPARAMS if k not in hparams]
        if absent:
            problems.append(f"hyper_parameters lack {absent}")
        elif not isinstance(hparams["model"], Mapping):
            problems.append("hyper_parameters['model'] is not a dict of UNet arguments")
    net_state = {}
    if not isinstance(state, Mapping):
        problems.append("no 'state_dict'")
    else:
        net_state = {k[len(NET_PREFIX) :]: v for k, v in state.items() if k.startswith(NET_PREFIX)}
        if not net_state:
            problems.append(f"state_dict has no '{NET_PREFIX}*' weights")
    if problems:
        raise CheckpointError(
            f"checkpoint {path} is not a lymphnode checkpoint: {'; '.join(problems)} "
            f"(expected one written by ReconstructionModule or MultiTaskModule)"
        )
    return dict(hparams), net_state  # type: ignore[arg-type]


def is_lymphnode_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a readable lymphnode checkpoint (never raises)."""
    try:
        _lymphnode_parts(_read_checkpoint(path), Path(path))
    except CheckpointError:
        return False
    return True


def load_pretrained_weights(
    net: UNet, ckpt_path: str | Path, *, strict_shapes: bool = True
) -> LoadReport:
    """Copy a lymphnode checkpoint's UNet weights into ``net`` by name, in place.

    If the checkpoint's ``top_skip`` differs from ``net.top_skip``, the top decoder block
    (``decoder.0``, whose input is the top skip) cannot be reused: it is re-initialised instead of
    loaded and a warning says so. Every other tensor must exist on both sides with equal shapes;
    otherwise CheckpointError lists each mismatched name with its checkpoint and model shapes.
    With ``strict_shapes=False`` the mismatches are skipped (left as initialised) and logged.
    """
    path = Path(ckpt_path)
    hparams, ckpt_state = _lymphnode_parts(_read_checkpoint(path), path)
    report = LoadReport(path=path)
    model_state = net.state_dict()

    ckpt_top_skip = hparams["model"].get("top_skip", True)
    reinit: set[str] = set()
    top_skip_changed = bool(ckpt_top_skip) != net.top_skip
    if top_skip_changed:
        report.reinitialized = [k for k in model_state if k.startswith(TOP_DECODER_PREFIX)]
        reinit = set(report.reinitialized) | {
            k for k in ckpt_state if k.startswith(TOP_DECODER_PREFIX)
        }

    to_load: dict[str, Tensor] = {}
    mismatched: list[str] = []
    for name, value in ckpt_state.items():
        if name in reinit:
            continue
        if name not in model_state:
            report.unexpected.append(name)
        elif tuple(value.shape) != tuple(model_state[name].shape):
            mismatched.append(
                f"{name}: checkpoint {tuple(value.shape)} vs model {tuple(model_state[name].shape)}"
            )
            report.skipped.append(name)
        else:
            to_load[name] = value
    report.missing = [k for k in model_state if k not in ckpt_state and k not in reinit]

    problems = (
        mismatched
        + [f"{k}: in the checkpoint, not in the model" for k in report.unexpected]
        + [f"{k}: in the model, not in the checkpoint" for k in report.missing]
    )
    if problems and strict_shapes:
        raise CheckpointError(
            f"checkpoint {path} (model {hparams['model']}) does not fit the model "
            f"{net.config}; {len(problems)} mismatched keys:\n  " + "\n  ".join(problems)
        )
    if problems:
        log.warning(
            "checkpoint %s: %d keys not loaded (strict_shapes=False):\n  %s",
            path,
            len(problems),
            "\n  ".join(problems),
        )
    if top_skip_changed:
        net.reset_top_decoder()
        log.warning(
            "checkpoint %s was trained with top_skip=%s but the model has top_skip=%s: the top "
            "decoder block 'decoder.0' (%d tensors) is re-initialised, not loaded",
            path,
            ckpt_top_skip,
            net.top_skip,
            len(report.reinitialized),
        )
    with torch.no_grad():
        for name, value in to_load.items():
            model_state[name].copy_(value)  # in place: keeps device, dtype and memory format
    report.loaded = sorted(to_load)
    log.info("pretrained weights %s", report.summary())
    return report


def load_inference_model(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> InferenceModel:
    """Rebuild the trained UNet of a lymphnode checkpoint (eval mode) with its preprocessing."""
    path = Path(path)
    hparams, state = _lymphnode_parts(_read_checkpoint(path), path)
    try:
        net = build_unet(hparams["model"])
    except ConfigError as exc:
        raise CheckpointError(f"checkpoint {path} has an invalid model config: {exc}") from exc
    missing, unexpected = (
        sorted(set(net.state_dict()) - set(state)),
        sorted(set(state) - set(net.state_dict())),
    )
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path}: weights do not match its model config {hparams['model']} "
            f"(missing {missing}, unexpected {unexpected})"
        )
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {path}: weights do not fit its model: {exc}") from exc
    normalize = hparams["normalize"] or {}
    channels = net.in_channels
    mean = tuple(float(v) for v in normalize.get("mean", [0.0] * channels))
    std = tuple(float(v) for v in normalize.get("std", [1.0] * channels))
    return InferenceModel(
        net=net.to(map_location).eval(),
        mean=mean,
        std=std,
        patch_size=int(hparams["patch_size"]),
        level=int(hparams["level"]),
        hparams=hparams,
    )


__all__ = [
    "InferenceModel",
    "LoadReport",
    "is_lymphnode_checkpoint",
    "load_inference_model",
    "load_pretrained_weights",
]
