"""Where patches come from: the paper's class-balanced random sampling, deterministic from a seed.

For each patch the sampler first picks its class (tumor with probability ``tumor_probability``,
0.5 in the paper), then draws random locations until one satisfies that class:

- tumor: at least ``min_tumor_fraction`` of the patch's central region (a square of
  ``center_fraction`` of the patch side, centred in the patch) is tumor;
- non-tumor: no tumor pixel anywhere in the patch and at least ``min_tissue_fraction`` tissue.

Rejection sampling over the whole slide would almost never hit a small lesion, so candidates are
drawn where they can succeed: tumor candidates from the pixels of a coarse tumor mask rasterised once
over the annotations' bounding box, non-tumor candidates from the pixels of the tissue mask. Every
candidate is then checked exactly at the resolution the patch is read at. Slides without
annotations yield only non-tumor patches; ``labeled=False`` (unlabeled caches) yields tissue patches
with no class balancing and label :data:`UNLABELED`.

Coordinates are level-0 pixels, ``(x, y)`` the patch's top-left corner, as OpenSlide. A patch is
``patch_size`` pixels of the read level, i.e. ``round(patch_size * level_downsample)`` level-0 px.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from lymphnode.core import validate
from lymphnode.core.errors import ConfigError, SamplingError

if TYPE_CHECKING:
    from lymphnode.wsi.annotations import Annotations
    from lymphnode.wsi.tissue import TissueMask

log = logging.getLogger(__name__)

TUMOR = 1
NON_TUMOR = 0
UNLABELED = -1  # label of patches sampled with labeled=False (class unknown / not balanced)

# The coarse tumor mask has about this many pixels across the patch's central region: enough to
# aim candidates at lesions the size of that region, coarse enough to rasterise a whole slide fast.
_COARSE_PIXELS_PER_CENTER = 4
_MAX_COARSE_PIXELS = 4096 * 4096  # caps the coarse mask's memory (bool, so 16 MiB)


@dataclass(frozen=True)
class PatchLocation:
    """One sampled patch: level-0 top-left ``(x, y)`` and its class (1 tumor, 0 non-tumor, -1 unlabeled)."""

    x: int
    y: int
    label: int


@dataclass(frozen=True)
class _Geometry:
    """Patch geometry in level-0 pixels."""

    extent: int  # patch side in level-0 px
    center_offset: int  # offset of the central region from the patch's top-left, level-0 px
    center: int  # side of the central region, level-0 px
    max_x: int  # largest valid top-left x (the patch stays inside the slide)
    max_y: int


def sample_patches(
    *,
    slide_size: tuple[int, int],
    n: int,
    patch_size: int,
    seed: int,
    tissue: TissueMask,
    annotations: Annotations | None,
    level_downsample: float = 1.0,
    tumor_probability: float = 0.5,
    min_tumor_fraction: float = 0.5,
    center_fraction: float = 0.5,
    min_tissue_fraction: float = 0.5,
    max_tries: int | None = None,
    labeled: bool = True,
    slide_name: str | None = None,
) -> list[PatchLocation]:
    """Sample ``n`` patch locations of one slide, class-balanced as in the paper.

    Args:
        slide_size: level-0 ``(width, height)`` of the slide.
        n: number of patches.
        patch_size: patch side in pixels of the read level.
        seed: seed of the numpy Generator; the same inputs and seed give the same locations.
        tissue: tissue mask of the slide (non-tumor and unlabeled candidates come from its pixels).
        annotations: tumor/exclusion polygons in level-0 px, or ``None`` for a normal slide.
        level_downsample: downsample of the read level (level-0 px per read-level px).
        tumor_probability: probability that a patch is drawn as tumor (when the slide has tumor).
        min_tumor_fraction: fraction of the central region that must be tumor for a tumor patch.
        center_fraction: side of the central region as a fraction of the patch side.
        min_tissue_fraction: tissue fraction a non-tumor (or unlabeled) patch must have.
        max_tries: candidate locations tried in all before giving up
            (default ``max(10_000, 200 * n)``).
        labeled: ``False`` samples tissue patches with no class balancing (label ``-1``).
        slide_name: name used in error messages.

    Returns:
        ``n`` locations in the order drawn, no two at the same position (a repeat is drawn
        again); level-0 top-left ``(x, y)``, label 1/0 (-1 unlabeled).

    Raises:
        ConfigError: a parameter is out of range or the patch does not fit in the slide.
        SamplingError: the quota cannot be met within ``max_tries`` (message has the counts found).
    """
    name = slide_name or (str(annotations.path) if annotations and annotations.path else "slide")
    geometry = _geometry(slide_size, patch_size, level_downsample, center_fraction, name=name)
    _check_parameters(
        n=n,
        tumor_probability=tumor_probability,
        min_tumor_fraction=min_tumor_fraction,
        min_tissue_fraction=min_tissue_fraction,
        max_tries=max_tries,
    )
    if max_tries is None:
        max_tries = max(10_000, 200 * n)
    rng = np.random.default_rng(seed)

    has_tumor = labeled and annotations is not None and not annotations.is_empty
    if not labeled:
        classes = np.full(n, UNLABELED, dtype=np.int64)
    elif has_tumor:
        classes = np.where(rng.random(n) < tumor_probability, TUMOR, NON_TUMOR)
    else:
        classes = np.full(n, NON_TUMOR, dtype=np.int64)
    wanted = {label: int((classes == label).sum()) for label in (TUMOR, NON_TUMOR, UNLABELED)}

    sampler = _Sampler(
        geometry=geometry,
        tissue=tissue,
        annotations=annotations if labeled else None,
        level_downsample=float(level_downsample),
        min_tumor_fraction=min_tumor_fraction,
        min_tissue_fraction=min_tissue_fraction,
        rng=rng,
    )
    found: list[PatchLocation] = []
    seen: set[tuple[int, int]] = set()  # a position drawn twice would be one patch in two folds
    duplicates = 0
    counts = {TUMOR: 0, NON_TUMOR: 0, UNLABELED: 0}
    tries = 0
    for label in classes.tolist():
        while True:
            if tries >= max_tries:
                reason = "max_tries reached" + (
                    f"; {duplicates} draws repeated a position already taken (the slide has "
                    "fewer distinct positions than asked for: lower counts)"
                    if duplicates
                    else ""
                )
                raise SamplingError(_quota_message(name, counts, wanted, tries, labeled, reason))
            if not sampler.can_draw(label):
                raise SamplingError(
                    _quota_message(name, counts, wanted, tries, labeled, sampler.why_not(label))
                )
            tries += 1
            location = sampler.draw(label)
            if location is not None and (location.x, location.y) in seen:
                duplicates += 1
                continue
            if location is not None:
                seen.add((location.x, location.y))
                found.append(location)
                counts[label] += 1
                break
    log.debug("%s: %d patches in %d tries", name, len(found), tries)
    return found


def _quota_message(
    name: str,
    counts: dict[int, int],
    wanted: dict[int, int],
    tries: int,
    labeled: bool,
    reason: str,
) -> str:
    if labeled:
        found = f"tumor {counts[TUMOR]}/{wanted[TUMOR]}, non-tumor {counts[NON_TUMOR]}/{wanted[NON_TUMOR]}"
    else:
        found = f"tissue {counts[UNLABELED]}/{wanted[UNLABELED]}"
    return f"{name}: could not sample the patch quota ({reason} after {tries} tries); found {found}"


def _geometry(
    slide_size: tuple[int, int],
    patch_size: int,
    level_downsample: float,
    center_fraction: float,
    *,
    name: str,
) -> _Geometry:
    patch_size = validate.integer("patch_size", patch_size, minimum=1, unit="px")
    level_downsample = validate.number("level_downsample", level_downsample, minimum=1)
    center_fraction = validate.number("center_fraction", center_fraction, 0, 1, strict_minimum=True)
    extent = round(patch_size * level_downsample)
    width, height = (int(v) for v in slide_size)
    if extent > width or extent > height:
        raise ConfigError(
            f"{name}: a patch of {patch_size} px at downsample {level_downsample:g} spans {extent} "
            f"level-0 px, larger than the slide ({width} x {height})"
        )
    center = max(1, round(extent * center_fraction))
    return _Geometry(
        extent=extent,
        center_offset=(extent - center) // 2,
        center=center,
        max_x=width - extent,
        max_y=height - extent,
    )


def _check_parameters(
    *,
    n: int,
    tumor_probability: float,
    min_tumor_fraction: float,
    min_tissue_fraction: float,
    max_tries: int | None,
) -> None:
    validate.integer("n (patches per slide)", n, minimum=0)
    for key, value in (
        ("tumor_probability", tumor_probability),
        ("min_tumor_fraction", min_tumor_fraction),
        ("min_tissue_fraction", min_tissue_fraction),
    ):
        validate.number(key, value, 0, 1)
    if max_tries is not None:
        validate.integer("max_tries", max_tries, minimum=1)


class _Sampler:
    """Draws and checks one candidate location per call, for a given class."""

    def __init__(
        self,
        *,
        geometry: _Geometry,
        tissue: TissueMask,
        annotations: Annotations | None,
        level_downsample: float,
        min_tumor_fraction: float,
        min_tissue_fraction: float,
        rng: np.random.Generator,
    ) -> None:
        self.g = geometry
        self.tissue = tissue
        self.annotations = annotations
        self.ds = level_downsample
        self.min_tumor_fraction = min_tumor_fraction
        self.min_tissue_fraction = min_tissue_fraction
        self.rng = rng
        # Flat indices of tissue pixels (lazily, only when a non-tumor/unlabeled patch is wanted).
        self._tissue_pixels: np.ndarray | None = None
        self._tumor: tuple[np.ndarray, float, int, int, int] | None = None
        self._bounds = annotations.bounds() if annotations is not None else None

    # -- candidate pools ------------------------------------------------------------------------
    def _tissue_pool(self) -> np.ndarray:
        if self._tissue_pixels is None:
            self._tissue_pixels = np.flatnonzero(np.asarray(self.tissue.mask, dtype=bool))
        return self._tissue_pixels

    def _tumor_pool(self) -> tuple[np.ndarray, float, int, int, int]:
        """Flat indices of a coarse tumor mask over the annotations' box, its downsample, x0, y0, width."""
        if self._tumor is None:
            if self.annotations is None or self._bounds is None:
                self._tumor = (np.empty(0, dtype=np.int64), 1.0, 0, 0, 1)
            else:
                bx0, by0, bx1, by1 = self._bounds
                width = self.g.max_x + self.g.extent
                height = self.g.max_y + self.g.extent
                x0 = max(0, math.floor(bx0))
                y0 = max(0, math.floor(by0))
                x1 = min(width, math.ceil(bx1) + 1)
                y1 = min(height, math.ceil(by1) + 1)
                if x1 <= x0 or y1 <= y0:
                    self._tumor = (np.empty(0, dtype=np.int64), 1.0, 0, 0, 1)
                else:
                    w, h = x1 - x0, y1 - y0
                    ds = max(1.0, self.g.center / _COARSE_PIXELS_PER_CENTER)
                    ds = max(ds, math.sqrt(w * h / _MAX_COARSE_PIXELS))
                    coarse = np.asarray(self.annotations.mask(x0, y0, w, h, downsample=ds))
                    self._tumor = (np.flatnonzero(coarse), ds, x0, y0, coarse.shape[1])
        return self._tumor

    def can_draw(self, label: int) -> bool:
        if label == TUMOR:
            return self._tumor_pool()[0].size > 0
        return self._tissue_pool().size > 0

    def why_not(self, label: int) -> str:
        if label == TUMOR:
            return "no tumor pixels inside the slide at the sampling resolution"
        return "the tissue mask is empty"

    # -- drawing --------------------------------------------------------------------------------
    def draw(self, label: int) -> PatchLocation | None:
        """One candidate of class ``label``; returns it when it satisfies the class, else None."""
        if label == TUMOR:
            pool, ds, ox, oy, width = self._tumor_pool()
            px, py = self._point_in_pixel(pool, ds, width, ox, oy)
            # Put the point uniformly inside the central region, so lesion borders are seen too.
            x = px - self.g.center_offset - self.rng.random() * self.g.center
            y = py - self.g.center_offset - self.rng.random() * self.g.center
            x, y = self._clamp(x, y)
            return PatchLocation(x, y, TUMOR) if self._is_tumor(x, y) else None
        pool = self._tissue_pool()
        tissue_ds = float(self.tissue.downsample)
        width = int(np.shape(self.tissue.mask)[1])
        px, py = self._point_in_pixel(pool, tissue_ds, width, 0, 0)
        x, y = self._clamp(px - self.g.extent / 2, py - self.g.extent / 2)
        if self.tissue.fraction(x, y, self.g.extent, self.g.extent) < self.min_tissue_fraction:
            return None
        if label == NON_TUMOR and self._touches_tumor(x, y):
            return None
        return PatchLocation(x, y, label)

    def _point_in_pixel(
        self, pool: np.ndarray, ds: float, width: int, ox: int, oy: int
    ) -> tuple[float, float]:
        """A uniform level-0 point inside a uniformly chosen pixel of a mask at downsample ``ds``."""
        flat = int(pool[self.rng.integers(pool.size)])
        row, col = divmod(flat, width)
        u, v = self.rng.random(2)
        return ox + (col + u) * ds, oy + (row + v) * ds

    def _clamp(self, x: float, y: float) -> tuple[int, int]:
        return (
            min(max(round(x), 0), self.g.max_x),
            min(max(round(y), 0), self.g.max_y),
        )

    def _is_tumor(self, x: int, y: int) -> bool:
        assert self.annotations is not None  # internal: tumor is only drawn with annotations
        c = self.g.center
        region = self.annotations.mask(
            x + self.g.center_offset, y + self.g.center_offset, c, c, downsample=self.ds
        )
        return bool(region.size) and float(np.mean(region)) >= self.min_tumor_fraction

    def _touches_tumor(self, x: int, y: int) -> bool:
        if self.annotations is None or self._bounds is None:
            return False
        e = self.g.extent
        bx0, by0, bx1, by1 = self._bounds
        if x + e <= bx0 or y + e <= by0 or x > bx1 or y > by1:
            return False
        return bool(np.any(self.annotations.mask(x, y, e, e, downsample=self.ds)))
