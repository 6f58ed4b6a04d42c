"""Stitching tile probabilities into a heatmap with bounded memory: on-disk (memory-mapped) weighted
sums and weights at the heatmap's resolution, projected per batch on the model's device.

Heatmap pixel (i, j) covers level-0 ``[j * D, (j + 1) * D) × [i * D, (i + 1) * D)`` with D the
downsample.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lymphnode.core.errors import ConfigError


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


def scratch_array(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """A zeroed float32 ``.npy`` memory map at ``path`` whose blocks are allocated on disk now:
    a full disk is an ``OSError`` (ENOSPC) here, not a SIGBUS when a page is first written
    (file systems without ``fallocate`` keep the sparse file)."""
    array = np.lib.format.open_memmap(path, "w+", np.float32, shape)
    try:
        fd = os.open(path, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
        finally:
            os.close(fd)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            return array  # no fallocate here: as before
        del array
        raise OSError(exc.errno, f"cannot allocate {path} ({exc.strerror})") from exc
    return array


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
        self.sum = scratch_array(workdir / "sum.npy", shape)
        self.weight = scratch_array(workdir / "weight.npy", shape)
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


__all__ = ["HeatmapStitcher", "TileBlocks"]
