"""How to run a model over a slide (:class:`InferenceSettings`) and on which device."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lymphnode.core.errors import ConfigError


@dataclass(frozen=True)
class InferenceSettings:
    """How to run the model over a slide.

    patch_size: tile side in px at the read level (None: the checkpoint's).
    stride: step between tiles in px at the read level (None: patch_size, no overlap).
    downsample: level-0 px per heatmap px (32 = CAMELYON16 level 5).
    blend: "mean" (uniform average of overlapping tiles) or "hann" (tile centres weigh more).
    batch_size, num_workers: DataLoader settings; workers read tiles while the model computes.
    tta: average the 8 dihedral transforms (D4) of every tile.
    bf16: bfloat16 autocast; channels_last: NHWC memory format (both faster on recent hardware).
    device: "auto" (CUDA when available), "cpu" or "cuda[:N]".
    min_tissue_fraction: a tile is read when this fraction of it is tissue (0: when it touches any).
    num_threads: torch intra-op threads while the model runs on the CPU (None: the cores left to
        the model by the workers, at least 1 and at most torch's current setting; restored after).
    """

    patch_size: int | None = None
    stride: int | None = None
    downsample: float = 32.0
    blend: str = "mean"
    batch_size: int = 32
    num_workers: int = 2
    tta: bool = False
    bf16: bool = False
    channels_last: bool = True
    device: str = "auto"
    min_tissue_fraction: float = 0.0
    num_threads: int | None = None

    def __post_init__(self) -> None:
        if self.num_threads is not None and self.num_threads < 1:
            raise ConfigError(f"num_threads={self.num_threads} must be >= 1 (or null: automatic)")


def resolve_device(device: str) -> torch.device:
    """``auto`` → CUDA when available else CPU; otherwise the named device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(
            f"device={device!r} is not a torch device (expected auto|cpu|cuda[:N])"
        ) from exc


__all__ = ["InferenceSettings", "resolve_device"]
