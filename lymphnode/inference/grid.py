"""The tile grid over a slide's tissue and the tiles themselves (read and stain-normalised by the
checkpoint's preprocessing contract in DataLoader workers).

Coordinates: level-0 px, (x, y) top-left, as OpenSlide.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from lymphnode.core.errors import ConfigError
from lymphnode.inference.settings import InferenceSettings, resolve_device
from lymphnode.models.preprocess import Preprocess
from lymphnode.wsi.slide import Slide
from lymphnode.wsi.tissue import TissueMask


def tile_grid(
    slide_size: tuple[int, int],
    tile_level0: int,
    step_level0: int,
    tissue: TissueMask | None,
    min_tissue_fraction: float = 0.0,
) -> np.ndarray:
    """Top-left level-0 corners (N, 2) int64 of the tiles covering the slide that touch tissue,
    row by row (y outer, x inner: neighbouring tiles share the slide's JPEG tiles).

    Tiles start at 0 and step by ``step_level0`` until one reaches the right/bottom edge (the last
    may stick out: reads pad it white). "Touches tissue" is :meth:`TissueMask.any`, evaluated one
    row of tiles at a time on the mask itself, so memory stays O(mask width) beyond the result.
    """
    w0, h0 = slide_size
    xs = np.arange(0, max(w0 - tile_level0, 0) + step_level0, step_level0, dtype=np.int64)
    ys = np.arange(0, max(h0 - tile_level0, 0) + step_level0, step_level0, dtype=np.int64)
    xs = xs[xs < w0]
    ys = ys[ys < h0]
    if tissue is None:
        gx, gy = np.meshgrid(xs, ys)  # (rows, cols) each
        return np.stack([gx.ravel(), gy.ravel()], axis=1)
    mask, ds = tissue.mask, tissue.downsample
    rows, cols = mask.shape
    # mask columns [c0, c1) under each tile column, as TissueMask.any computes them
    c0 = np.clip(np.floor(xs / ds), 0, cols).astype(np.int64)
    c1 = np.clip(np.ceil((xs + tile_level0) / ds), 0, cols).astype(np.int64)
    kept = []
    for y in ys.tolist():
        r0 = min(max(math.floor(y / ds), 0), rows)
        r1 = min(max(math.ceil((y + tile_level0) / ds), 0), rows)
        if r1 <= r0:
            continue
        hits = np.zeros(cols + 1, np.int64)
        np.cumsum(mask[r0:r1].any(axis=0), out=hits[1:])  # tissue columns left of each column
        keep = (c1 > c0) & (hits[c1] > hits[c0])
        if keep.any():
            kept.append(np.stack([xs[keep], np.full(int(keep.sum()), y, np.int64)], axis=1))
    corners = np.concatenate(kept) if kept else np.empty((0, 2), np.int64)
    if min_tissue_fraction > 0:  # exact overlap (fraction > 0 implies any)
        corners = corners[
            [tissue.fraction(int(x), int(y), tile_level0, tile_level0) >= min_tissue_fraction
             for x, y in corners.tolist()]
        ].reshape(-1, 2)  # fmt: skip
    return corners


class TileDataset(Dataset):
    """Tiles of one slide, stain-normalised by the contract; picklable (the slide opens per worker).

    Item ``i``: ``(image, xy)`` with ``image`` the tile's RGB (P, P, 3) uint8 after
    :meth:`Preprocess.stain_normalize` (on the CPU, in the DataLoader workers) and ``xy`` its
    level-0 corner (2,) int64. The normalisation (:meth:`Preprocess.normalize`) runs on the model's
    device (4x fewer bytes between processes and to a GPU than float32).

    Args:
        slide: the slide.
        corners: (N, 2) level-0 top-left corners of the tiles.
        preprocess: the checkpoint's contract (its ``level`` is the read level).
        patch_size: tile side in px at that level (default the contract's).
    """

    def __init__(
        self, slide: Slide, corners: np.ndarray, preprocess: Preprocess,
        patch_size: int | None = None,
    ) -> None:  # fmt: skip
        self.slide = slide
        self.corners = corners
        self.preprocess = preprocess
        self.patch_size = patch_size or preprocess.patch_size

    def __len__(self) -> int:
        return len(self.corners)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = (int(v) for v in self.corners[i])
        p, level = self.patch_size, self.preprocess.level
        rgb = self.slide.read(x, y, p, p, level=level)  # (P, P, 3) uint8
        rgb = self.preprocess.stain_normalize(rgb)
        return torch.from_numpy(np.ascontiguousarray(rgb)), torch.tensor([x, y], dtype=torch.int64)


@dataclass
class SlidePlan:
    """Where the tiles of a slide go: their level-0 corners (N, 2), the read level's downsample
    and the heatmap's (rows, cols)."""

    corners: np.ndarray
    level_downsample: float
    heatmap_shape: tuple[int, int]


def plan_slide(
    slide: Slide, tissue: TissueMask | None, *, patch_size: int, level: int,
    settings: InferenceSettings,
) -> SlidePlan:  # fmt: skip
    """The tissue tiles of ``slide`` and the heatmap grid for ``settings`` (checks level/stride)."""
    if level >= slide.level_count:
        raise ConfigError(
            f"the model reads level {level} but {slide.path} has levels 0-{slide.level_count - 1}"
        )
    level_ds = float(slide.level_downsamples[level])
    stride = settings.stride or patch_size
    if stride <= 0 or stride > patch_size:
        raise ConfigError(f"stride={stride} must be in 1..patch_size ({patch_size})")
    tile0 = round(patch_size * level_ds)
    step0 = round(stride * level_ds)
    corners = tile_grid(slide.dimensions, tile0, step0, tissue, settings.min_tissue_fraction)
    w0, h0 = slide.dimensions
    shape = (math.ceil(h0 / settings.downsample), math.ceil(w0 / settings.downsample))
    return SlidePlan(corners=corners, level_downsample=level_ds, heatmap_shape=shape)


def tile_loader(dataset: TileDataset, settings: InferenceSettings) -> DataLoader:
    """The DataLoader :func:`predict_slide` reads ``dataset`` with (workers, pinning, prefetch)."""
    device = resolve_device(settings.device)
    return DataLoader(
        dataset,
        batch_size=settings.batch_size,
        num_workers=settings.num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=4 if settings.num_workers > 0 else None,
    )


__all__ = ["SlidePlan", "TileDataset", "plan_slide", "tile_grid", "tile_loader"]
