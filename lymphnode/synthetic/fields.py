"""Low-frequency fields, periodic textures and shapes that the synthetic slides are drawn from
(level-0 px unless noted)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np

GRID = 32  # level-0 px per cell of the low-resolution fields (tissue shape, zones)
FINE = 8  # level-0 px per cell of the lookup maps used to place nuclei and vacuoles
SHIFT = 4  # cv2 drawing sub-pixel bits

__all__ = [
    "FINE",
    "GRID",
    "SHIFT",
    "Texture",
    "fill_polygons",
    "oriented",
    "periodic_noise",
    "smooth_noise",
    "star_polygon",
    "upsample",
]


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-blurred white noise, rescaled to zero mean and unit standard deviation."""
    field_ = cv2.GaussianBlur(
        rng.standard_normal(shape, dtype=np.float32), (0, 0), sigma, borderType=cv2.BORDER_REFLECT
    )
    return (field_ - field_.mean()) / max(float(field_.std()), 1e-6)


def periodic_noise(rng: np.random.Generator, side: int, sigma: float) -> np.ndarray:
    """A wrap-around (tileable) square of blurred noise with unit standard deviation."""
    tile: np.ndarray = rng.standard_normal((side, side), dtype=np.float32)
    if sigma > 0:  # blur with wrap-around (OpenCV's filters have no BORDER_WRAP)
        pad = math.ceil(4 * sigma)
        tile = cv2.GaussianBlur(np.pad(tile, pad, mode="wrap"), (0, 0), sigma)[pad:-pad, pad:-pad]
    return np.ascontiguousarray(tile / max(float(tile.std()), 1e-6))


class Texture:
    """A periodic texture sampled in level-0 coordinates: strip ``rows(y0, h, w)`` is (h, w)."""

    def __init__(self, tile: np.ndarray, rng: np.random.Generator) -> None:
        self.tile = tile
        self.offset = (int(rng.integers(tile.shape[0])), int(rng.integers(tile.shape[1])))

    def rows(self, y0: int, h: int, w: int) -> np.ndarray:
        side_y, side_x = self.tile.shape
        block = self.tile[(np.arange(y0, y0 + h) + self.offset[0]) % side_y]
        block = np.roll(block, -self.offset[1], axis=1)
        return np.tile(block, (1, -(-w // side_x)))[:, :w]


def star_polygon(
    rng: np.random.Generator,
    center: tuple[float, float],
    radius: float,
    *,
    roughness: float,
    aspect: float = 1.0,
    n_vertices: int | None = None,
) -> np.ndarray:
    """An irregular closed outline around ``center``: a circle with random low harmonics.

    Returns ``(N, 2)`` float64 ``(x, y)`` in the units of ``center`` and ``radius``.
    """
    if n_vertices is None:
        n_vertices = int(np.clip(radius / 12, 24, 160))
    theta = np.linspace(0, 2 * np.pi, n_vertices, endpoint=False)
    r = np.ones_like(theta)
    for k in range(2, 8):
        r += roughness * rng.uniform(0, 1) / k**0.8 * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    r += roughness * 0.03 * rng.standard_normal(n_vertices)
    r = np.clip(r, 0.35, None) * radius
    rot = rng.uniform(0, np.pi)
    x, y = r * np.cos(theta) * aspect, r * np.sin(theta)
    xr = x * np.cos(rot) - y * np.sin(rot)
    yr = x * np.sin(rot) + y * np.cos(rot)
    return np.stack([xr + center[0], yr + center[1]], axis=1)


def fill_polygons(
    shape: tuple[int, int], polygons: Sequence[np.ndarray], scale: float
) -> np.ndarray:
    """uint8 0/1 raster of ``polygons`` (level-0 px) on a grid of ``scale`` level-0 px per cell."""
    out = np.zeros(shape, np.uint8)
    for p in polygons:  # one call per polygon: fillPoly XORs overlapping polygons of one call
        pts = np.round((p / scale - 0.5) * (1 << SHIFT)).astype(np.int32)
        cv2.fillPoly(out, [pts], 1, cv2.LINE_8, SHIFT)
    return out


def upsample(lowres: np.ndarray, scale: int, y0: int, width: int, height: int) -> np.ndarray:
    """Bilinear upsampling by the integer ``scale`` of a low-resolution field, rows y0..y0+height.

    The same values as ``cv2.resize`` of the whole field, computed from a crop with one row of
    margin (all bilinear needs), so a strip costs only its own pixels.
    """
    r0 = max(0, y0 // scale - 1)
    r1 = min(lowres.shape[0], -(-(y0 + height) // scale) + 1)
    crop = lowres[r0:r1]
    size = (crop.shape[1] * scale, crop.shape[0] * scale)
    big = cv2.resize(crop, size, interpolation=cv2.INTER_LINEAR)
    top = y0 - r0 * scale
    return big[top : top + height, :width]


def oriented(
    tile: np.ndarray, angle: float, along: float, across: float, y0: int, w: int, h: int
) -> np.ndarray:
    """Resample the wrap-around noise ``tile`` stretched ``along`` x ``across`` px at ``angle``.

    Rows y0..y0+h, columns 0..w: a fibre-like texture with orientation ``angle`` (rad). Done in
    column chunks whose source coordinates stay inside a 2 x 2 copy of the tile (OpenCV's
    wrap-around border is slow far outside the source).
    """
    side = tile.shape[0]
    source = np.tile(tile, (2, 2))
    c, s = math.cos(angle), math.sin(angle)
    m = np.array([[c / along, s / along], [-s / across, c / across]], np.float64)
    # widest chunk whose source span stays under 0.9 period in both source coordinates
    room = 0.9 * side - h * np.abs(m[:, 1])
    chunk = max(16, int(np.min(room / np.maximum(np.abs(m[:, 0]), 1e-9))))
    out = np.empty((h, w), np.float32)
    for x0 in range(0, w, chunk):
        cw = min(chunk, w - x0)
        corners = m @ np.array([[0, cw, 0, cw], [0, 0, h, h]], np.float64)
        start = m @ np.array([x0, y0], np.float64)
        low = corners.min(axis=1)
        shift = np.mod(start + low, side) - low  # = start modulo the period; coordinates >= 0
        full = np.hstack([m, shift[:, None]])
        cv2.warpAffine(
            source,
            full,
            (cw, h),
            dst=out[:, x0 : x0 + cw],
            flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
            borderMode=cv2.BORDER_WRAP,
        )
    return out
