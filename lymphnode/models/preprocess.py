"""The preprocessing contract: how stored pixels become network input, in training and inference.

A :class:`Preprocess` says which slide level (and, when the cache recorded it, which microns per
pixel) patches are read at, their side in pixels, the per-channel normalisation and the fitted
stain normaliser (if any). The DataModule builds it from the cache manifest and the data config
(:attr:`lymphnode.data.FinetuneDataModule.preprocess`), the task module saves it in every
checkpoint (``checkpoint["lymphnode"]["preprocess"]``, :meth:`Preprocess.to_dict`), and ``infer``
loads it with the network. Its two steps are the only code in lymphnode that normalises:

1. :meth:`Preprocess.stain_normalize`: uint8 RGB -> uint8 RGB (identity without a stain state);
   on the CPU, per patch (DataLoader workers).
2. :meth:`Preprocess.normalize`: uint8 RGB ``(..., H, W, 3)`` -> float32 ``(..., 3, H, W)``,
   ``(rgb / 255 - mean) / std``, on any device (batches on a GPU in ``infer``).

:meth:`Preprocess.apply` is both, for one patch: what validation/test batches hold and what
``infer`` feeds the network for the same pixels. Training augmentations run between the two steps
(``lymphnode.data.transforms``).

``patch_size`` is the side of the patches the network was trained on: with a random training crop
(``data.transforms.crop``) it is the crop, since validation and test use centre crops of that size
and ``infer`` tiles the slide with it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import torch
from torch import Tensor

from lymphnode.core import validate
from lymphnode.core.errors import ConfigError
from lymphnode.models.stain import (
    MacenkoNormalizer,
    ReinhardNormalizer,
    stain_normalizer_from_state,
)

# The network is trained from scratch on H&E, so there is no ImageNet statistic to match: mapping
# 0..255 to -1..1 keeps the reconstruction target symmetric and independent of the stain.
DEFAULT_MEAN = (0.5, 0.5, 0.5)
DEFAULT_STD = (0.5, 0.5, 0.5)
PREPROCESS_FORMAT = 1  # version of Preprocess.to_dict()'s layout


def normalize_stats(normalize: Mapping[str, Sequence[float]] | None) -> dict[str, list[float]]:
    """Validate ``{"mean": [r, g, b], "std": [r, g, b]}`` in 0..1 units; None -> the default
    (0.5 / 0.5: -1..1). Returns plain lists."""
    if normalize is None:
        normalize = {"mean": DEFAULT_MEAN, "std": DEFAULT_STD}
    if not isinstance(normalize, Mapping) or set(normalize) != {"mean", "std"}:
        raise ConfigError(
            f"normalize={normalize!r} is invalid: expected a mapping with exactly the keys "
            "'mean' and 'std' (3 numbers each, 0..1 units)"
        )
    stats: dict[str, list[float]] = {}
    for key in ("mean", "std"):
        values = normalize[key]
        try:
            numbers = [float(v) for v in values]
        except (TypeError, ValueError):
            numbers = []
        if len(numbers) != 3 or not all(math.isfinite(v) for v in numbers):
            raise ConfigError(
                f"normalize.{key}={values!r} is invalid: expected 3 finite numbers (R, G, B)"
            )
        stats[key] = numbers
    if any(not 0.0 <= m <= 1.0 for m in stats["mean"]):
        raise ConfigError(
            f"normalize.mean={stats['mean']} is invalid: expected values in 0..1 (intensity / 255), "
            "not 0..255"
        )
    if any(s <= 0.0 for s in stats["std"]):
        raise ConfigError(f"normalize.std={stats['std']} is invalid: expected values > 0")
    return stats


@dataclass(frozen=True)
class Preprocess:
    """Level, patch size, normalisation and fitted stain state of a network's input.

    Args:
        level: slide pyramid level the patches are read at (0 = full resolution).
        patch_size: side in px at ``level`` of what the network was trained on (and ``infer``
            tiles with).
        mean, std: per-channel normalisation in 0..1 units, ``(rgb / 255 - mean) / std``.
        stain: a fitted stain normaliser's state (``MacenkoNormalizer.state()`` /
            ``ReinhardNormalizer.state()``), or None for no stain normalisation.
        mpp: microns per level-0 pixel of the slides the patches came from, when the cache
            recorded it (informational; patches are read by ``level``).
    """

    level: int
    patch_size: int
    mean: tuple[float, ...] = DEFAULT_MEAN
    std: tuple[float, ...] = DEFAULT_STD
    stain: Mapping[str, Any] | None = None
    mpp: float | None = None
    _normalizer: MacenkoNormalizer | ReinhardNormalizer | None = field(
        default=None, init=False, repr=False, compare=False
    )
    _affine: dict[str, tuple[Tensor, Tensor]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    _luts: list[np.ndarray] = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "level", validate.integer("level", self.level, 0, where="preprocess: ")
        )
        object.__setattr__(
            self,
            "patch_size",
            validate.integer("patch_size", self.patch_size, 1, unit="px", where="preprocess: "),
        )
        stats = normalize_stats({"mean": self.mean, "std": self.std})
        object.__setattr__(self, "mean", tuple(stats["mean"]))
        object.__setattr__(self, "std", tuple(stats["std"]))
        if self.mpp is not None:
            mpp = validate.number(
                "mpp",
                self.mpp,
                0.0,
                strict_minimum=True,
                unit="µm/px (or null)",
                where="preprocess: ",
            )
            object.__setattr__(self, "mpp", mpp)
        if self.stain is not None:
            normalizer = stain_normalizer_from_state(self.stain)  # ConfigError when invalid
            object.__setattr__(self, "stain", normalizer.state())  # plain, canonical
            object.__setattr__(self, "_normalizer", normalizer)

    # -- the two steps -------------------------------------------------------------------------
    def stain_normalize(self, rgb: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 RGB -> the same, stain-normalised to the fitted reference (unchanged
        without a stain state)."""
        if self._normalizer is None:
            return rgb
        return self._normalizer.transform(rgb)

    def _scale_shift(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """(3,) scale and shift with ``rgb * scale + shift`` the normalisation, made once per
        device (a host-to-GPU copy per batch would stall the GPU's queue)."""
        key = str(device)
        if key not in self._affine:
            scale = torch.tensor([1.0 / (255.0 * s) for s in self.std], dtype=torch.float32)
            shift = torch.tensor([-m / s for m, s in zip(self.mean, self.std)], dtype=torch.float32)
            self._affine[key] = (scale.to(device), shift.to(device))
        return self._affine[key]

    def normalize(
        self,
        rgb: np.ndarray | Tensor,
        device: torch.device | str | None = None,
        *,
        channels_last: bool = False,
    ) -> Tensor:
        """uint8 RGB (H, W, 3) or (B, H, W, 3) -> float32 (3, H, W) or (B, 3, H, W) on ``device``
        (default: where ``rgb`` is), ``(rgb / 255 - mean) / std``. The result is contiguous
        NCHW, or with ``channels_last`` keeps the input's NHWC memory layout (free)."""
        if (
            isinstance(rgb, np.ndarray)
            and rgb.dtype == np.uint8
            and rgb.ndim == 3
            and rgb.shape[-1] == len(self.mean)
            and (device is None or torch.device(device).type == "cpu")
        ):
            return self._normalize_patch(rgb)
        x = torch.as_tensor(rgb)
        if x.dtype != torch.uint8 or x.ndim not in (3, 4) or x.shape[-1] != len(self.mean):
            raise ConfigError(
                f"preprocess takes uint8 RGB (H, W, 3) or (B, H, W, 3); got {tuple(x.shape)} "
                f"{x.dtype}"
            )
        target = x.device if device is None else torch.device(device)
        x = x.to(target, non_blocking=True)
        scale, shift = self._scale_shift(target)
        x = x.float().mul_(scale).add_(shift)  # (..., H, W, 3), normalised
        x = x.movedim(-1, -3)  # (..., 3, H, W), NHWC strides
        return x if channels_last else x.contiguous()

    def _normalize_patch(self, rgb: np.ndarray) -> Tensor:
        """:meth:`normalize` of one (H, W, 3) uint8 patch on the CPU: the same float32
        ``rgb * scale + shift`` per value, looked up in a 256-entry table per channel into a
        channel-first buffer (6x faster than the tensor ops per patch in DataLoader workers)."""
        if not self._luts:
            scale, shift = self._scale_shift(torch.device("cpu"))
            values = torch.arange(256, dtype=torch.float32)
            self._luts.extend((values * a + b).numpy() for a, b in zip(scale, shift))
        luts = self._luts
        out = np.empty((3, *rgb.shape[:2]), np.float32)
        for channel, (plane, lut) in enumerate(zip(cv2.split(np.ascontiguousarray(rgb)), luts)):
            cv2.LUT(plane, lut, dst=out[channel])
        return torch.from_numpy(out)

    def apply(self, rgb: np.ndarray) -> Tensor:
        """One (H, W, 3) uint8 RGB patch -> the (3, H, W) float32 tensor the network gets for it
        at validation, test and inference time: :meth:`stain_normalize`, then :meth:`normalize`."""
        return self.normalize(np.ascontiguousarray(self.stain_normalize(rgb)))

    def denormalize(self, x: Tensor) -> Tensor:
        """Normalised images (B, 3, H, W) -> 0..1 images (clamped; stain normalisation stays)."""
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        return (x * std + mean).clamp(0.0, 1.0)

    # -- saving and comparing ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON- and ``torch.load(weights_only=True)``-safe) for checkpoints."""
        return {
            "format": PREPROCESS_FORMAT,
            "level": self.level,
            "patch_size": self.patch_size,
            "mpp": self.mpp,
            "normalize": {"mean": list(self.mean), "std": list(self.std)},
            "stain": None if self.stain is None else dict(self.stain),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Preprocess:
        """Inverse of :meth:`to_dict`; ConfigError naming what is missing or invalid."""
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"preprocess={data!r} is invalid: expected a dict (Preprocess.to_dict)"
            )
        missing = [k for k in ("level", "patch_size", "normalize") if k not in data]
        if missing:
            raise ConfigError(f"preprocess {dict(data)!r} lacks {missing} (Preprocess.to_dict)")
        if data.get("format", PREPROCESS_FORMAT) != PREPROCESS_FORMAT:
            raise ConfigError(
                f"preprocess format {data.get('format')!r} is not supported; expected "
                f"{PREPROCESS_FORMAT} (a newer lymphnode wrote it)"
            )
        stats = normalize_stats(data["normalize"])
        return cls(
            level=data["level"],
            patch_size=data["patch_size"],
            mean=tuple(stats["mean"]),
            std=tuple(stats["std"]),
            stain=data.get("stain"),
            mpp=data.get("mpp"),
        )

    def differences(self, other: Preprocess) -> list[str]:
        """What differs from ``other``, one ``"key: self vs other"`` line per field (empty: the
        same). Stain states compare by method and fitted values."""
        mine, theirs = self.to_dict(), other.to_dict()
        lines = []
        for key in ("level", "patch_size", "mpp", "normalize", "stain"):
            a, b = mine[key], theirs[key]
            if key == "stain":
                a = None if a is None else _rounded(a)
                b = None if b is None else _rounded(b)
                if (a is None) != (b is None) or (a and b and a != b):
                    lines.append(f"stain: {_stain_desc(mine[key])} vs {_stain_desc(theirs[key])}")
            elif _rounded(a) != _rounded(b):
                lines.append(f"{key}: {a} vs {b}")
        return lines


def _rounded(value: Any) -> Any:
    """Numbers rounded to 6 significant digits, recursively (fitted states are floats)."""
    if isinstance(value, Mapping):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_rounded(v) for v in value]
    if isinstance(value, float):
        return float(f"{value:.6g}")
    return value


def _stain_desc(state: Mapping[str, Any] | None) -> str:
    if state is None:
        return "none"
    fitted = {k: v for k, v in state.items() if k not in ("method", "options")}
    return f"{state['method']} {_rounded(fitted)}"


__all__ = ["DEFAULT_MEAN", "DEFAULT_STD", "Preprocess", "normalize_stats"]
