"""How to run a model over a slide (:class:`InferenceSettings`) and on which device."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lymphnode.core import validate
from lymphnode.core.errors import ConfigError

MAX_PATCH_SIZE = 8192  # px: one tile of 8192² is 0.8 GiB of float32 input per batch item
BLENDS = ("mean", "hann")


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
    adapt_bn: test-time adaptation (AdaBN, :mod:`lymphnode.inference.adapt`): before a slide is
        predicted, the network's BatchNorm statistics are re-estimated on up to ``adapt_tiles`` of
        its own tissue tiles (evenly spaced over the grid), then restored for the next slide.
    adapt_tiles: at most this many tiles per slide for ``adapt_bn``.
    adapt_layers: adapt only the first this many BatchNorm layers (the shallow ones, where a
        stain change shows); None: all of them.
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
    adapt_bn: bool = False
    adapt_tiles: int = 512
    adapt_layers: int | None = None

    def __post_init__(self) -> None:
        """ConfigError naming the setting, its value and the allowed range, before any slide or
        checkpoint is read (the device too: ``cuda`` needs a visible GPU)."""
        if self.num_threads is not None and self.num_threads < 1:
            raise ConfigError(f"num_threads={self.num_threads} must be >= 1 (or null: automatic)")
        where = "infer: "
        if self.patch_size is not None:
            validate.integer("patch_size", self.patch_size, 1, MAX_PATCH_SIZE, unit="px (or null: the checkpoint's)", where=where)  # fmt: skip
        if self.stride is not None:
            validate.integer("stride", self.stride, 1, unit="px (or null: patch_size)", where=where)
        validate.number("downsample", self.downsample, 1.0, unit="level-0 px per heatmap px", where=where)  # fmt: skip
        validate.choice("blend", self.blend, BLENDS, where=where)
        validate.integer("batch_size", self.batch_size, 1, where=where)
        validate.integer("num_workers", self.num_workers, 0, where=where)
        validate.number("min_tissue_fraction", self.min_tissue_fraction, 0.0, 1.0, where=where)
        if not isinstance(self.adapt_bn, bool):
            raise ConfigError(
                f"{where}adapt_bn={self.adapt_bn!r} is invalid: expected true or false"
            )
        validate.integer("adapt_tiles", self.adapt_tiles, 1, where=where)
        if self.adapt_layers is not None:
            validate.integer(
                "adapt_layers", self.adapt_layers, 1, unit="(or null: all)", where=where
            )
        resolve_device(self.device)


def resolve_device(device: str) -> torch.device:
    """``auto`` → CUDA when available else CPU; otherwise the named device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(
            f"device={device!r} is not a torch device (expected auto|cpu|cuda[:N])"
        ) from exc
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(
                f"device={device!r} but torch sees no CUDA GPU (torch.cuda.is_available() is "
                "False); expected device=cpu or device=auto"
            )
        if resolved.index is not None and resolved.index >= count:
            raise ConfigError(
                f"device={device!r} but torch sees {count} CUDA GPU(s): expected cuda:0.."
                f"cuda:{count - 1}"
            )
    return resolved


__all__ = ["InferenceSettings", "resolve_device"]
