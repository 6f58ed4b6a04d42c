"""Whole-slide sliding-window inference: tumor-probability heatmaps with bounded memory.

A slide is covered by a grid of tiles (``patch_size`` px at the model's read level, every ``stride``
px); only tiles that touch tissue are read. DataLoader workers read tiles in parallel with the
model's compute (each worker opens the slide itself). Each tile's tumor probabilities are blended
(optionally with a window that down-weights tile borders) into two on-disk float32 arrays at the
heatmap's resolution (``downsample`` level-0 px per heatmap px): the weighted sum and the weight. The
heatmap is their ratio, so memory does not grow with the size of the slide.

Coordinates: level-0 px, (x, y) top-left, as OpenSlide. Heatmap pixel (i, j) covers level-0
``[j * D, (j + 1) * D) × [i * D, (i + 1) * D)`` with D the downsample; its shape is
``(ceil(h0 / D), ceil(w0 / D))`` — the same grid :meth:`Annotations.mask` uses.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from lymphnode.errors import ConfigError
from lymphnode.heatmap import Heatmap
from lymphnode.slide import Slide
from lymphnode.tissue import TissueMask

log = logging.getLogger(__name__)


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


def tile_grid(
    slide_size: tuple[int, int],
    tile_level0: int,
    step_level0: int,
    tissue: TissueMask | None,
    min_tissue_fraction: float = 0.0,
) -> np.ndarray:
    """Top-left level-0 corners (N, 2) of the tiles covering the slide that touch tissue.

    Tiles start at 0 and step by ``step_level0`` until one reaches the right/bottom edge (the last
    may stick out: reads pad it white).
    """
    w0, h0 = slide_size
    xs = np.arange(0, max(w0 - tile_level0, 0) + step_level0, step_level0)
    ys = np.arange(0, max(h0 - tile_level0, 0) + step_level0, step_level0)
    xs = xs[xs < w0]
    ys = ys[ys < h0]
    corners = [(int(x), int(y)) for y in ys for x in xs]
    if tissue is not None:
        if min_tissue_fraction > 0:
            corners = [
                c for c in corners
                if tissue.fraction(c[0], c[1], tile_level0, tile_level0) >= min_tissue_fraction
            ]  # fmt: skip
        else:
            corners = [c for c in corners if tissue.any(c[0], c[1], tile_level0, tile_level0)]
    return np.asarray(corners, dtype=np.int64).reshape(-1, 2)


class TileDataset(Dataset):
    """Tiles of one slide as normalised float tensors; picklable (the slide opens per worker)."""

    def __init__(
        self, slide: Slide, corners: np.ndarray, patch_size: int, level: int,
        mean: tuple[float, ...], std: tuple[float, ...],
    ) -> None:  # fmt: skip
        self.slide = slide
        self.corners = corners
        self.patch_size = patch_size
        self.level = level
        self.mean = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)

    def __len__(self) -> int:
        return len(self.corners)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = (int(v) for v in self.corners[i])
        rgb = self.slide.read(x, y, self.patch_size, self.patch_size, level=self.level)  # (P, P, 3)
        img = rgb.transpose(2, 0, 1).astype(np.float32) / 255.0  # (3, P, P)
        img = (img - self.mean) / self.std
        return torch.from_numpy(img), torch.tensor([x, y], dtype=torch.int64)


def _window(patch_size: int, blend: str) -> np.ndarray:
    if blend == "mean":
        return np.ones((patch_size, patch_size), dtype=np.float32)
    if blend == "hann":
        # strictly positive so a tile's border still counts where no other tile covers it
        w = np.hanning(patch_size + 2)[1:-1].astype(np.float32)
        return np.outer(w, w)
    raise ConfigError(f"blend={blend!r} is not supported (expected 'mean' or 'hann')")


class HeatmapStitcher:
    """Accumulates tile probabilities into on-disk (memory-mapped) sum and weight arrays.

    Each tile pixel is assigned to the heatmap pixel that contains its centre; a heatmap pixel gets
    the weighted mean of all tile pixels assigned to it, over all tiles.
    """

    def __init__(self, shape: tuple[int, int], downsample: float, level_downsample: float,
                 patch_size: int, blend: str, workdir: Path) -> None:  # fmt: skip
        self.shape = shape
        self.downsample = downsample
        self.level_downsample = level_downsample
        self.patch_size = patch_size
        self.window = _window(patch_size, blend)
        workdir.mkdir(parents=True, exist_ok=True)
        self.sum = np.lib.format.open_memmap(workdir / "sum.npy", "w+", np.float32, shape)
        self.weight = np.lib.format.open_memmap(workdir / "weight.npy", "w+", np.float32, shape)
        # heatmap row/col of each tile pixel relative to the tile's level-0 corner, per corner
        # phase: computed on the fly because corners need not be aligned to the heatmap grid.
        self._offsets = (np.arange(patch_size) + 0.5) * level_downsample  # level-0 px

    def add(self, x: int, y: int, probs: np.ndarray) -> None:
        """Blend one tile: ``probs`` (P, P) float at the read level, tile corner (x, y) level 0."""
        rows = np.floor((y + self._offsets) / self.downsample).astype(np.int64)
        cols = np.floor((x + self._offsets) / self.downsample).astype(np.int64)
        r0, c0 = int(rows[0]), int(cols[0])
        r1, c1 = min(int(rows[-1]) + 1, self.shape[0]), min(int(cols[-1]) + 1, self.shape[1])
        if r1 <= r0 or c1 <= c0:
            return
        keep_r = rows < r1
        keep_c = cols < c1
        local = (rows[keep_r] - r0)[:, None] * (c1 - c0) + (cols[keep_c] - c0)[None, :]
        w = self.window[np.ix_(keep_r, keep_c)]
        p = probs[np.ix_(keep_r, keep_c)]
        n = (r1 - r0) * (c1 - c0)
        s = np.bincount(local.ravel(), weights=(w * p).ravel(), minlength=n)
        ws = np.bincount(local.ravel(), weights=w.ravel(), minlength=n)
        self.sum[r0:r1, c0:c1] += s.reshape(r1 - r0, c1 - c0).astype(np.float32)
        self.weight[r0:r1, c0:c1] += ws.reshape(r1 - r0, c1 - c0).astype(np.float32)

    def result(self, rows_per_chunk: int = 1024) -> np.ndarray:
        """The heatmap (float32, 0 where no tile was read), computed in row chunks."""
        out = np.zeros(self.shape, dtype=np.float32)
        for r in range(0, self.shape[0], rows_per_chunk):
            s = self.sum[r : r + rows_per_chunk]
            w = self.weight[r : r + rows_per_chunk]
            np.divide(s, w, out=out[r : r + rows_per_chunk], where=w > 0)
        return out


def _d4(x: torch.Tensor, k: int) -> torch.Tensor:
    """Dihedral transform k (0..7) of (B, C, H, W): rotate by 90°·(k % 4), then flip if k ≥ 4."""
    x = torch.rot90(x, k % 4, dims=(2, 3))
    return torch.flip(x, dims=(3,)) if k >= 4 else x


def _d4_inverse(x: torch.Tensor, k: int) -> torch.Tensor:
    if k >= 4:
        x = torch.flip(x, dims=(3,))
    return torch.rot90(x, -(k % 4), dims=(2, 3))


@torch.no_grad()
def predict_tiles(net: torch.nn.Module, batch: torch.Tensor, *, tta: bool, bf16: bool,
                  device: torch.device) -> torch.Tensor:  # fmt: skip
    """Tumor probabilities (B, H, W) float32 on the CPU for a normalised batch (B, 3, H, W)."""
    autocast = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        if bf16
        else contextlib.nullcontext()
    )
    transforms = range(8) if tta else (0,)
    total: torch.Tensor | None = None
    with autocast:
        for k in transforms:
            logits = net(_d4(batch, k)).seg  # (B, 1, H, W)
            prob = _d4_inverse(torch.sigmoid(logits.float()), k)
            total = prob if total is None else total + prob
    assert total is not None
    return (total / len(transforms))[:, 0].float().cpu()


def predict_slide(
    net: torch.nn.Module,
    slide: Slide,
    tissue: TissueMask,
    *,
    patch_size: int,
    level: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    settings: InferenceSettings,
    workdir: Path,
    progress: bool = True,
) -> Heatmap:
    """Run ``net`` over the tissue of ``slide`` and return its heatmap (see module docstring)."""
    from tqdm import tqdm

    if level >= slide.level_count:
        raise ConfigError(
            f"the model reads level {level} but {slide.path} has levels 0-{slide.level_count - 1}"
        )
    device = resolve_device(settings.device)
    level_ds = float(slide.level_downsamples[level])
    stride = settings.stride or patch_size
    if stride <= 0 or stride > patch_size:
        raise ConfigError(f"stride={stride} must be in 1..patch_size ({patch_size})")
    tile0 = round(patch_size * level_ds)
    step0 = round(stride * level_ds)
    corners = tile_grid(slide.dimensions, tile0, step0, tissue, settings.min_tissue_fraction)
    w0, h0 = slide.dimensions
    shape = (math.ceil(h0 / settings.downsample), math.ceil(w0 / settings.downsample))
    stitcher = HeatmapStitcher(
        shape, settings.downsample, level_ds, patch_size, settings.blend, workdir
    )
    dataset = TileDataset(slide, corners, patch_size, level, mean, std)
    loader = DataLoader(
        dataset,
        batch_size=settings.batch_size,
        num_workers=settings.num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=4 if settings.num_workers > 0 else None,
    )
    net = net.to(device).eval()
    if settings.channels_last:
        net = net.to(memory_format=torch.channels_last)
    bar = tqdm(
        total=len(dataset), desc=slide.path.stem, unit="tile", disable=not progress, leave=False
    )
    for images, xy in loader:
        images = images.to(device, non_blocking=True)
        if settings.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        probs = predict_tiles(net, images, tta=settings.tta, bf16=settings.bf16, device=device)
        for p, (x, y) in zip(probs.numpy(), xy.tolist()):
            stitcher.add(x, y, p)
        bar.update(len(images))
    bar.close()
    heat = stitcher.result()
    del stitcher
    return Heatmap(
        slide=slide.path.stem,
        probabilities=heat,
        downsample=settings.downsample,
        level0_size=(w0, h0),
        mpp=slide.mpp,
    )


def render_overlay(
    slide: Slide,
    heatmap: Heatmap,
    tumor_outlines: list[np.ndarray] | None = None,
    exclusion_outlines: list[np.ndarray] | None = None,
    max_side: int = 2048,
) -> np.ndarray:
    """RGB (H, W, 3) uint8 thumbnail of the slide with the heatmap overlaid (alpha ∝ probability)
    and annotation outlines (level-0 polygons; tumor green, exclusion blue) drawn on top."""
    import cv2
    from matplotlib import colormaps

    h, w = heatmap.probabilities.shape
    scale = min(1.0, max_side / max(h, w))
    out_w, out_h = max(1, round(w * scale)), max(1, round(h * scale))
    level = slide.best_level(heatmap.downsample / scale)
    base = slide.read_level(level)
    base = cv2.resize(base, (out_w, out_h), interpolation=cv2.INTER_AREA)
    probs = cv2.resize(heatmap.probabilities, (out_w, out_h), interpolation=cv2.INTER_LINEAR)
    colours = (colormaps["inferno"](probs)[..., :3] * 255).astype(np.float32)
    alpha = (np.clip(probs, 0, 1) * 0.6)[..., None]
    out = (base.astype(np.float32) * (1 - alpha) + colours * alpha).astype(np.uint8)
    px = heatmap.downsample / scale  # level-0 px per output px
    for polygons, colour in ((tumor_outlines, (0, 200, 0)), (exclusion_outlines, (40, 90, 255))):
        for poly in polygons or []:
            pts = np.round(np.asarray(poly) / px).astype(np.int32).reshape(-1, 1, 2)
            cv2.polylines(out, [pts], isClosed=True, color=colour, thickness=2)
    return out


@contextlib.contextmanager
def scratch_dir(parent: Path, name: str) -> Iterator[Path]:
    """A temporary folder under ``parent`` for one slide's on-disk arrays, removed afterwards."""
    parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(dir=parent, prefix=f".tmp-{name}-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
