"""Tissue masks: where on a slide there is tissue, from a low-resolution image of it.

The standard recipe of Liu et al., NCRF, MONAI and CLAM: Otsu's threshold on the HSV saturation of
a low-resolution level (glass and empty slide areas are grey or white, so unsaturated; stained
tissue is pink to purple), with guards against near-white and near-black pixels (dark pixels have
meaningless hue and saturation: pen marks, scanner borders), a morphological closing and opening,
and removal of objects smaller than a minimum area (dust, debris).

A :class:`TissueMask` answers per level-0 region questions (:meth:`TissueMask.fraction`,
:meth:`TissueMask.any`) in constant time through an integral image, so a sampler can test
thousands of candidate patches per second.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import cv2
import numpy as np

from lymphnode.core import validate
from lymphnode.core.errors import ConfigError, TissueError

if TYPE_CHECKING:
    from lymphnode.wsi.slide import Slide

log = logging.getLogger(__name__)

#: Default mask resolution: level-0 px per mask px (7.8 µm/px on CAMELYON16's 0.243 µm/px).
DEFAULT_DOWNSAMPLE = 32.0
#: Small slides get a finer mask so that its longest side keeps at least this many px.
DEFAULT_MIN_MASK_SIDE = 1024
#: Tissue pieces smaller than this are dropped (µm²; 0.01 mm², a 100 µm square) ...
DEFAULT_MIN_OBJECT_UM2 = 10_000.0
#: ... or, when the slide's mpp is unknown, smaller than this many mask px.
DEFAULT_MIN_OBJECT_PX = 64
#: Saturation threshold floor (0-255): Otsu on a blank slide splits JPEG noise, this keeps it out.
DEFAULT_MIN_SATURATION = 20
#: Pixels whose brightest channel is below this are black (pen, borders), not tissue.
DEFAULT_MIN_VALUE = 50
#: Pixels whose darkest channel is at or above this are white (glass, empty slide), not tissue.
DEFAULT_MAX_BRIGHTNESS = 230
#: Rows of a fine level read at a time when it must be downsized (bounds memory, px).
_STRIP_PIXELS = 2**25


@dataclass(eq=False)
class TissueMask:
    """A boolean tissue mask of a slide and the level-0 px each of its pixels covers.

    Mask pixel ``(row, col)`` covers the level-0 square ``[col * downsample, (col + 1) *
    downsample) x [row * downsample, (row + 1) * downsample)``.

    Attributes:
        mask: (H, W) bool, True where there is tissue.
        downsample: level-0 px per mask px (> 0).
    """

    mask: np.ndarray
    downsample: float
    _integral: np.ndarray | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        mask = np.asarray(self.mask)
        if mask.ndim != 2 or mask.size == 0:
            raise ConfigError(f"TissueMask: mask must be a non-empty 2-D array, got {mask.shape}")
        self.mask = mask.astype(bool, copy=False)
        ds = float(self.downsample)
        if not (math.isfinite(ds) and ds > 0):
            raise ConfigError(f"TissueMask: downsample must be a positive number, got {ds}")
        self.downsample = ds

    def __repr__(self) -> str:
        h, w = self.mask.shape
        return (
            f"TissueMask({w}x{h} px at downsample {self.downsample:.4g}, "
            f"{self.mask.mean():.1%} tissue)"
        )

    @property
    def integral(self) -> np.ndarray:
        """Summed-area table (H + 1, W + 1) int64: ``integral[r, c]`` = tissue px in mask[:r, :c]."""
        if self._integral is None:
            table = np.zeros((self.mask.shape[0] + 1, self.mask.shape[1] + 1), np.int64)
            np.cumsum(np.cumsum(self.mask, axis=0, dtype=np.int64), axis=1, out=table[1:, 1:])
            self._integral = table
        return self._integral

    def _check_region(self, w: float, h: float) -> None:
        if not (w > 0 and h > 0):
            raise ConfigError(f"TissueMask: region size must be positive, got w={w}, h={h}")

    def _area_to(self, u: float, v: float) -> float:
        """Tissue area (mask px²) in [0, u) x [0, v), u, v in mask px within the mask.

        The tissue indicator is constant on each mask pixel, so this integral is bilinear inside a
        pixel and bilinear interpolation of the summed-area table is exact.
        """
        table = self.integral
        i = min(int(u), table.shape[1] - 2)
        j = min(int(v), table.shape[0] - 2)
        fu, fv = u - i, v - j
        top = table[j, i] * (1 - fu) + table[j, i + 1] * fu
        bottom = table[j + 1, i] * (1 - fu) + table[j + 1, i + 1] * fu
        return float(top * (1 - fv) + bottom * fv)

    def fraction(self, x: float, y: float, w: float, h: float) -> float:
        """Fraction (0-1) of the level-0 region ``(x, y, w, h)`` covered by tissue.

        Partly covered mask pixels count by their overlap; any part of the region outside the
        mask counts as no tissue.
        """
        self._check_region(w, h)
        rows, cols = self.mask.shape
        ds = self.downsample
        u0, u1 = (min(max(c / ds, 0.0), cols) for c in (x, x + w))
        v0, v1 = (min(max(c / ds, 0.0), rows) for c in (y, y + h))
        if u1 <= u0 or v1 <= v0:
            return 0.0
        area = (
            self._area_to(u1, v1)
            - self._area_to(u0, v1)
            - self._area_to(u1, v0)
            + self._area_to(u0, v0)
        )
        return min(max(area / ((w / ds) * (h / ds)), 0.0), 1.0)

    def any(self, x: float, y: float, w: float, h: float) -> bool:
        """True when the level-0 region ``(x, y, w, h)`` overlaps any tissue pixel."""
        self._check_region(w, h)
        rows, cols = self.mask.shape
        ds = self.downsample
        c0 = min(max(math.floor(x / ds), 0), cols)
        c1 = min(max(math.ceil((x + w) / ds), 0), cols)
        r0 = min(max(math.floor(y / ds), 0), rows)
        r1 = min(max(math.ceil((y + h) / ds), 0), rows)
        if c1 <= c0 or r1 <= r0:
            return False
        table = self.integral
        return bool(table[r1, c1] - table[r0, c1] - table[r1, c0] + table[r0, c0] > 0)


def _disk(radius: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def saturation_threshold(rgb: np.ndarray, min_value: int = DEFAULT_MIN_VALUE) -> float:
    """Otsu's threshold (0-255) of the HSV saturation of ``rgb``'s non-black pixels."""
    hsv = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2HSV)
    saturation = hsv[..., 1][hsv[..., 2] >= min_value]
    if saturation.size == 0:
        return 255.0
    threshold, _ = cv2.threshold(
        saturation.reshape(-1, 1), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU
    )
    return float(threshold)


def tissue_mask_from_rgb(
    rgb: np.ndarray,
    *,
    min_object_px: int = DEFAULT_MIN_OBJECT_PX,
    min_saturation: int = DEFAULT_MIN_SATURATION,
    min_value: int = DEFAULT_MIN_VALUE,
    max_brightness: int = DEFAULT_MAX_BRIGHTNESS,
    closing_radius: int = 2,
    opening_radius: int = 2,
) -> np.ndarray:
    """Tissue mask (H, W) bool of a low-resolution RGB image (H, W, 3) uint8.

    A pixel is tissue when its HSV saturation is above ``max(Otsu threshold, min_saturation)``,
    its brightest channel is at least ``min_value`` (not black) and its darkest channel is below
    ``max_brightness`` (not white). The mask is then closed and opened with disks of the given
    radii (px) and objects smaller than ``min_object_px`` px are removed. An image without
    tissue gives an all-False mask.
    """
    if not (isinstance(rgb, np.ndarray) and rgb.dtype == np.uint8):
        got = getattr(rgb, "dtype", type(rgb).__name__)
        raise ConfigError(f"tissue_mask_from_rgb: rgb must be a uint8 numpy array, got {got}")
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ConfigError(f"tissue_mask_from_rgb: rgb must have shape (H, W, 3), got {rgb.shape}")
    for name, given, low, high in (
        ("min_saturation", min_saturation, 0, 255),
        ("min_value", min_value, 0, 255),
        ("max_brightness", max_brightness, 1, 256),
        ("closing_radius", closing_radius, 0, None),
        ("opening_radius", opening_radius, 0, None),
        ("min_object_px", min_object_px, 0, None),
    ):
        if given < low or (high is not None and given > high):
            allowed = f"{low}..{high}" if high is not None else f">= {low}"
            raise ConfigError(f"tissue_mask_from_rgb: {name} must be {allowed}, got {given}")

    rgb = np.ascontiguousarray(rgb)
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    saturation, value = hsv[..., 1], hsv[..., 2]
    threshold = max(saturation_threshold(rgb, min_value), float(min_saturation))
    mask = (saturation > threshold) & (value >= min_value) & (rgb.min(axis=2) < max_brightness)
    mask = mask.astype(np.uint8)
    if closing_radius:
        mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, _disk(closing_radius))
    if opening_radius:
        mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, _disk(opening_radius))
    if min_object_px > 1:
        _, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        keep = stats[:, cv2.CC_STAT_AREA] >= min_object_px
        keep[0] = False  # label 0 is the background
        tissue = keep[labels]
    else:
        tissue = mask.astype(bool)
    log.debug(
        "tissue: saturation threshold %.0f, %.1f%% of %s px",
        threshold,
        100 * tissue.mean(),
        rgb.shape[:2],
    )
    return tissue


def _pick_level(slide: Slide, downsample: float) -> int:
    """The level whose downsample is nearest ``downsample`` (log scale, ties to the finer one),
    among levels at most twice as coarse."""
    candidates = [
        (abs(math.log(d / downsample)), level)
        for level, d in enumerate(slide.level_downsamples)
        if d <= 2 * downsample
    ]
    return min(candidates)[1]


def _read_downsized(slide: Slide, level: int, factor: float) -> np.ndarray:
    """Level ``level`` reduced by ``factor`` with area averaging, read in strips (bounded memory)."""
    lw, lh = slide.level_dimensions[level]
    out_w, out_h = max(1, math.ceil(lw / factor)), max(1, math.ceil(lh / factor))
    level_ds = slide.level_downsamples[level]
    rows_per_strip = max(1, int(_STRIP_PIXELS // max(1.0, lw * factor)))
    strips = []
    for r0 in range(0, out_h, rows_per_strip):
        r1 = min(out_h, r0 + rows_per_strip)
        y0, y1 = round(r0 * factor), min(lh, round(r1 * factor))
        strip = slide.read(0, round(y0 * level_ds), lw, max(1, y1 - y0), level)
        strips.append(cv2.resize(strip, (out_w, r1 - r0), interpolation=cv2.INTER_AREA))
    return np.concatenate(strips, axis=0)


def tissue_image(
    slide: Slide, downsample: float = DEFAULT_DOWNSAMPLE, min_mask_side: int = DEFAULT_MIN_MASK_SIDE
) -> tuple[np.ndarray, float]:
    """Low-resolution RGB image of the whole slide and its downsample (level-0 px per px).

    Reads the level nearest ``downsample`` (resized with area averaging when that level is
    finer than needed, e.g. single-level slides). The downsample is lowered so that the image's
    longest side keeps at least ``min_mask_side`` px.
    """
    where = f"tissue mask of {slide.path}: "
    downsample = validate.number("downsample", downsample, 0, strict_minimum=True, where=where)
    min_mask_side = validate.integer("min_mask_side", min_mask_side, minimum=1, where=where)
    target = max(1.0, min(float(downsample), max(slide.dimensions) / min_mask_side))
    level = _pick_level(slide, target)
    level_ds = slide.level_downsamples[level]
    factor = target / level_ds
    if factor < 1.25:  # close enough (or coarser): use the level as it is
        return slide.read_level(level), level_ds
    image = _read_downsized(slide, level, factor)
    # The mask spans the level exactly: its downsample is the level's size over the mask's.
    return image, level_ds * slide.level_dimensions[level][0] / image.shape[1]


def tissue_mask(
    slide: Slide,
    downsample: float = DEFAULT_DOWNSAMPLE,
    min_object_um2: float = DEFAULT_MIN_OBJECT_UM2,
    *,
    min_object_px: int = DEFAULT_MIN_OBJECT_PX,
    min_mask_side: int = DEFAULT_MIN_MASK_SIDE,
    require: bool = True,
    **options: int,
) -> TissueMask:
    """Tissue mask of ``slide`` at about ``downsample`` level-0 px per mask px.

    Args:
        slide: an open :class:`~lymphnode.wsi.slide.Slide`.
        downsample: target mask resolution (level-0 px per mask px); 32 is 1/32 of level 0.
            Lowered for small slides so that the mask's longest side has ``min_mask_side`` px.
        min_object_um2: tissue pieces smaller than this area (µm²) are removed; used when the
            slide's mpp is known.
        min_object_px: the same in mask px, used when the slide has no mpp.
        min_mask_side: see ``downsample``.
        require: raise TissueError when no tissue is found (else return an empty mask).
        **options: passed to :func:`tissue_mask_from_rgb` (``min_saturation``, ``min_value``,
            ``max_brightness``, ``closing_radius``, ``opening_radius``).

    Raises:
        TissueError: no tissue found and ``require`` is true (the message names the slide).
        ConfigError: a bad parameter.
        SlideError: the slide cannot be read.
    """
    if not min_object_um2 >= 0:
        raise ConfigError(
            f"tissue mask of {slide.path}: min_object_um2 must be >= 0, got {min_object_um2}"
        )
    image, ds = tissue_image(slide, downsample, min_mask_side)
    if slide.mpp is not None:
        min_object_px = math.ceil(min_object_um2 / (slide.mpp * ds) ** 2)
    mask = tissue_mask_from_rgb(image, min_object_px=min_object_px, **options)
    result = TissueMask(mask=mask, downsample=ds)
    log.info("%s: %r", slide.path, result)
    if require and not mask.any():
        raise TissueError(
            f"no tissue found in slide {slide.path}: no pixel of its {image.shape[1]}x"
            f"{image.shape[0]} px image at downsample {ds:.3g} passed the saturation threshold "
            f"(Otsu, at least {options.get('min_saturation', DEFAULT_MIN_SATURATION)}) and the "
            "size filter; is it blank, or out of focus? (require=False returns an empty mask)"
        )
    return result


__all__ = [
    "DEFAULT_DOWNSAMPLE",
    "TissueMask",
    "saturation_threshold",
    "tissue_image",
    "tissue_mask",
    "tissue_mask_from_rgb",
]
