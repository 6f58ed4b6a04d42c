"""Whole-slide sliding-window inference: tumor-probability heatmaps with bounded memory.

A slide is covered by a grid of tiles (``patch_size`` px at the model's read level, every ``stride``
px); only tiles that touch tissue are read. DataLoader workers read tiles in parallel with the
model's compute (each worker opens the slide itself) and pass raw uint8 tiles, which are normalised
on the model's device (4x fewer bytes between processes and to a GPU than float32). Each tile's tumor
probabilities are blended (optionally with a window that down-weights tile borders) into two on-disk
float32 arrays at the heatmap's resolution (``downsample`` level-0 px per heatmap px): the weighted
sum and the weight. The heatmap is their ratio, so memory does not grow with the size of the slide.
The blending runs on the model's device as two small matrix products per tile, so only a
(heatmap rows x cols) block per tile comes back to the host, one batch behind the model.

On the CPU, DataLoader workers and torch's intra-op threads share the cores: by default the model
gets the cores the workers do not take (``InferenceSettings.num_threads``); oversubscribing them
makes torch's threads wait on each other and can halve the throughput.

Coordinates: level-0 px, (x, y) top-left, as OpenSlide. Heatmap pixel (i, j) covers level-0
``[j * D, (j + 1) * D) × [i * D, (i + 1) * D)`` with D the downsample; its shape is
``(ceil(h0 / D), ceil(w0 / D))`` — the same grid :meth:`Annotations.mask` uses.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from lymphnode.core.errors import ConfigError
from lymphnode.inference.heatmap import Heatmap
from lymphnode.models.preprocess import Preprocess
from lymphnode.wsi.slide import Slide
from lymphnode.wsi.tissue import TissueMask

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


def _window_1d(patch_size: int, blend: str) -> np.ndarray:
    """(P,) float32 factor of the separable blending window (the window is its outer product)."""
    if blend == "mean":
        return np.ones(patch_size, dtype=np.float32)
    if blend == "hann":
        # strictly positive so a tile's border still counts where no other tile covers it
        return np.hanning(patch_size + 2)[1:-1].astype(np.float32)
    raise ConfigError(f"blend={blend!r} is not supported (expected 'mean' or 'hann')")


@dataclass
class TileBlocks:
    """Tiles projected onto the heatmap grid, ready to be added: block ``b`` covers heatmap rows
    ``origins[b, 0] + [0, R)`` and columns ``origins[b, 1] + [0, C)`` (clipped to the heatmap when
    added). ``sums`` / ``weights``: (B, R, C) float32 tensors, possibly on a GPU still being
    copied to the host; ``ready`` (a CUDA event or None) marks when the copy is done."""

    origins: np.ndarray
    sums: torch.Tensor
    weights: torch.Tensor
    ready: torch.cuda.Event | None = None


class HeatmapStitcher:
    """Accumulates tile probabilities into on-disk (memory-mapped) sum and weight arrays.

    Each tile pixel is assigned to the heatmap pixel that contains its centre; a heatmap pixel gets
    the weighted mean of all tile pixels assigned to it, over all tiles. A batch of tiles is first
    projected (:meth:`project`, on the tiles' device: per tile ``R @ (w * p) @ C.T`` with one-hot
    row/column assignment matrices, the window being separable), then added (:meth:`accumulate`).
    """

    def __init__(self, shape: tuple[int, int], downsample: float, level_downsample: float,
                 patch_size: int, blend: str, workdir: Path) -> None:  # fmt: skip
        self.shape = shape
        self.downsample = downsample
        self.level_downsample = level_downsample
        self.patch_size = patch_size
        self._window_1d = _window_1d(patch_size, blend)
        self.window = np.outer(self._window_1d, self._window_1d)
        self._window_t: dict[torch.device, torch.Tensor] = {}
        workdir.mkdir(parents=True, exist_ok=True)
        self.sum = np.lib.format.open_memmap(workdir / "sum.npy", "w+", np.float32, shape)
        self.weight = np.lib.format.open_memmap(workdir / "weight.npy", "w+", np.float32, shape)
        # heatmap row/col of each tile pixel relative to the tile's level-0 corner, per corner
        # phase: computed on the fly because corners need not be aligned to the heatmap grid.
        self._offsets = (np.arange(patch_size) + 0.5) * level_downsample  # level-0 px

    def add(self, x: int, y: int, probs: np.ndarray) -> None:
        """Blend one tile: ``probs`` (P, P) float at the read level, tile corner (x, y) level 0."""
        self.add_batch(np.array([[x, y]]), torch.as_tensor(np.asarray(probs))[None])

    def add_batch(self, xy: np.ndarray, probs: torch.Tensor) -> None:
        """Blend tiles: ``probs`` (B, P, P) at the read level (any device), corners ``xy`` (B, 2)."""
        self.accumulate(self.project(xy, probs))

    def _bins(self, starts: np.ndarray) -> np.ndarray:
        """(B, P) heatmap row (or column) of each tile pixel row (column), from level-0 starts."""
        return np.floor((starts[:, None] + self._offsets[None, :]) / self.downsample).astype(
            np.int64
        )

    def _assign(self, bins: np.ndarray, n: int, device: torch.device) -> torch.Tensor:
        """(B, n, P) window-weighted one-hot: entry (b, j, i) = w[i] where pixel i falls in bin j."""
        w = self._window_t.get(device)
        if w is None:
            w = self._window_t[device] = torch.from_numpy(self._window_1d).to(device)
        # (B, P) bin of each pixel relative to the tile's first, 0..n-1; non-blocking: a blocking
        # copy to a GPU would wait for the model's queued work
        rel = torch.from_numpy(bins - bins[:, :1]).to(device, non_blocking=True)
        out = torch.zeros((len(bins), n, self.patch_size), dtype=torch.float32, device=device)
        return out.scatter_(1, rel[:, None, :], w.expand(len(bins), 1, -1).contiguous())

    def project(self, xy: np.ndarray, probs: torch.Tensor) -> TileBlocks:
        """Per-tile weighted sums and weights on the heatmap grid, computed on ``probs``' device
        (B, P, P); corners ``xy`` (B, 2) level 0. A CUDA result is copied to pinned host memory
        asynchronously: :meth:`accumulate` waits for it."""
        xy = np.asarray(xy, dtype=np.int64).reshape(-1, 2)
        rows, cols = self._bins(xy[:, 1]), self._bins(xy[:, 0])  # (B, P) each
        n_rows = int((rows[:, -1] - rows[:, 0]).max()) + 1
        n_cols = int((cols[:, -1] - cols[:, 0]).max()) + 1
        device = probs.device
        r = self._assign(rows, n_rows, device)  # (B, R, P)
        c = self._assign(cols, n_cols, device)  # (B, C, P)
        sums = torch.bmm(torch.bmm(r, probs.float()), c.transpose(1, 2))  # (B, R, C)
        weights = r.sum(2)[:, :, None] * c.sum(2)[:, None, :]  # (B, R, C)
        origins = np.stack([rows[:, 0], cols[:, 0]], axis=1)
        if device.type != "cuda":
            return TileBlocks(origins, sums, weights)
        blocks = TileBlocks(
            origins, sums.to("cpu", non_blocking=True), weights.to("cpu", non_blocking=True)
        )
        blocks.ready = torch.cuda.Event()
        blocks.ready.record()
        return blocks

    def accumulate(self, blocks: TileBlocks) -> None:
        """Add projected tiles into the on-disk sums (clipped to the heatmap)."""
        if blocks.ready is not None:
            blocks.ready.synchronize()
        sums, weights = blocks.sums.cpu().numpy(), blocks.weights.cpu().numpy()
        h, w = self.shape
        for (r0, c0), s, ws in zip(blocks.origins.tolist(), sums, weights):
            r1, c1 = min(r0 + s.shape[0], h), min(c0 + s.shape[1], w)
            if r1 <= r0 or c1 <= c0:
                continue
            self.sum[r0:r1, c0:c1] += s[: r1 - r0, : c1 - c0]
            self.weight[r0:r1, c0:c1] += ws[: r1 - r0, : c1 - c0]

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
def tile_probabilities(model: torch.nn.Module, batch: torch.Tensor, *, tta: bool, bf16: bool,
                       device: torch.device) -> torch.Tensor:  # fmt: skip
    """Tumor probabilities (B, H, W) float32 on ``device`` for a normalised batch (B, 3, H, W)
    on ``device``, from the task's ``probabilities(x)`` (B, 1, H, W); with ``tta`` the mean
    over the 8 D4 transforms, in the input's frame."""
    autocast = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        if bf16
        else contextlib.nullcontext()
    )
    transforms = range(8) if tta else (0,)
    total: torch.Tensor | None = None
    with autocast:
        for k in transforms:
            prob = _d4_inverse(model.probabilities(_d4(batch, k)).float(), k)  # (B, 1, H, W)
            total = prob if total is None else total + prob
    assert total is not None
    return (total / len(transforms))[:, 0].float()


def predict_slide(
    model: torch.nn.Module,
    preprocess: Preprocess,
    slide: Slide,
    tissue: TissueMask,
    *,
    settings: InferenceSettings,
    workdir: Path,
    progress: bool = True,
) -> Heatmap:
    """Run ``model`` (a task module: ``probabilities(x)``) over the tissue of ``slide``, its
    tiles made by ``preprocess`` (read level, stain normalisation, normalisation; tile side
    ``settings.patch_size`` or the contract's), and return its heatmap (see module docstring)."""
    from tqdm import tqdm

    patch_size = settings.patch_size or preprocess.patch_size
    plan = plan_slide(
        slide, tissue, patch_size=patch_size, level=preprocess.level, settings=settings
    )
    stitcher = HeatmapStitcher(
        plan.heatmap_shape, settings.downsample, plan.level_downsample, patch_size,
        settings.blend, workdir,
    )  # fmt: skip
    dataset = TileDataset(slide, plan.corners, preprocess, patch_size)
    loader = tile_loader(dataset, settings)
    bar = tqdm(
        total=len(dataset), desc=slide.path.stem, unit="tile", disable=not progress, leave=False
    )
    run_tiles(model, loader, stitcher, preprocess=preprocess, settings=settings,
              on_batch=lambda n: bar.update(n))  # fmt: skip
    bar.close()
    heat = stitcher.result()
    del stitcher
    return Heatmap(
        slide=slide.path.stem,
        probabilities=heat,
        downsample=settings.downsample,
        level0_size=slide.dimensions,
        mpp=slide.mpp,
    )


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


def available_cpus() -> int:
    """CPU cores this process may run on (its affinity mask, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def model_threads(settings: InferenceSettings, device: torch.device) -> int | None:
    """torch intra-op threads for the model (None: leave torch's setting): ``num_threads`` when
    given; on the CPU, the cores the DataLoader workers leave free (at least 1, at most torch's
    current setting)."""
    if settings.num_threads is not None:
        return settings.num_threads
    if device.type != "cpu":
        return None
    return max(1, min(torch.get_num_threads(), available_cpus() - settings.num_workers))


@contextlib.contextmanager
def _torch_settings(threads: int | None, device: torch.device) -> Iterator[None]:
    """Set torch's intra-op threads (and cuDNN autotuning on CUDA: tiles have one shape) for the
    duration, then restore them."""
    old_threads, old_bench = torch.get_num_threads(), torch.backends.cudnn.benchmark
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.backends.cudnn.benchmark = old_bench


def run_tiles(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    stitcher: HeatmapStitcher,
    *,
    preprocess: Preprocess,
    settings: InferenceSettings,
    on_batch: Callable[[int], object] | None = None,
) -> int:
    """Run ``model`` (``probabilities(x)``) over ``batches`` of (stain-normalised uint8 tiles
    (B, P, P, 3), level-0 corners (B, 2)), normalised on the device by
    :meth:`Preprocess.normalize`, and blend the probabilities into ``stitcher``; returns the
    number of tiles.

    The blocks of batch i are added to the on-disk sums after batch i + 1 is queued on the device,
    so a GPU keeps computing while the host adds. Torch's threads are set by :func:`model_threads`
    for the duration.
    """
    device = resolve_device(settings.device)
    model = model.to(device).eval()
    if settings.channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    n = 0
    pending: TileBlocks | None = None
    with _torch_settings(model_threads(settings, device), device), torch.inference_mode():
        for images, xy in batches:
            x = preprocess.normalize(images, device, channels_last=settings.channels_last)
            probs = tile_probabilities(
                model, x, tta=settings.tta, bf16=settings.bf16, device=device
            )
            blocks = stitcher.project(xy.numpy(), probs)
            if pending is not None:
                stitcher.accumulate(pending)
            pending = blocks
            n += len(images)
            if on_batch is not None:
                on_batch(len(images))
        if pending is not None:
            stitcher.accumulate(pending)
    return n


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
