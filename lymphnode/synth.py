"""Made-up CAMELYON16-like slides, so that everything runs on a fresh machine without 700 GB of data.

A synthetic slide is a pyramidal tiled JPEG TIFF (OpenSlide ``generic-tiff``, 0.243 µm/px at level
0, like CAMELYON16's 40x scans) of H&E-stained lymph-node tissue, and, for tumor slides, an ASAP XML
file with the lesion outlines (group ``_0``) and normal islands inside them (group ``_2``).

What it draws, and why (the point is a segmentation task that is not trivial and has to generalise
across slides, as CAMELYON16's is):

- Tissue: one to three irregular lobes (smoothed random star polygons plus low-frequency noise) on a
  white background, a fibrous pink capsule along the edge, white fat vacuoles (clusters of round
  empty holes) inside. Stroma is eosin with an oriented fibrous texture.
- Normal node: densely packed small, dark, round lymphocyte nuclei, with the confounders real
  metastasis detectors trip over: follicles whose germinal centres hold larger, paler nuclei, and
  sinuses with sparse, pale, oval histiocyte nuclei in pink cytoplasm, plus spindle-shaped stromal
  nuclei.
- Metastases: irregular polygons inside the tissue (a few large and some small, isolated-tumour-cell
  sized ones) of crowded, large, pleomorphic, vesicular nuclei (pale interior, dark rim, nucleoli) in
  more abundant cytoplasm. Their mean colour is close to normal node's; they differ in texture.
  Some contain a normal island (an exclusion polygon) drawn as normal node.
- Slide-to-slide variation as between CAMELYON centres: haematoxylin and eosin stain vectors (hue and
  strength), overall stain amount, background tint, scanner blur, sensor noise, JPEG quality.
  Colour is rendered in optical density (Beer–Lambert: ``OD = c_H * v_H + c_E * v_E``,
  ``RGB = 255 * exp(-OD)``) so that a stain change acts as it does on real slides.

Rendering is vectorised: low-frequency fields are drawn at low resolution and resampled with OpenCV,
nuclei are stamped as small irregular polygons (``cv2.fillConvexPoly``) onto concentration maps,
and the slide is rendered in horizontal strips, so memory stays at about the size of the RGB image.
Everything comes from one seed: same seed, same bytes.

``python -m lymphnode.synth`` (Hydra, ``conf/synth.yaml``) writes ``<out_dir>/slides/tumor_XXX.tif``,
``normal_XXX.tif`` and ``<out_dir>/annotations/tumor_XXX.xml`` (CAMELYON16 names) in parallel, with a
manifest so that a rerun skips finished slides and a rerun with another config refuses.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import secrets
import time
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from lymphnode.core.errors import ConfigError
from lymphnode.wsi.annotations import Annotations, write_asap
from lymphnode.wsi.pyramid import write_pyramid

log = logging.getLogger(__name__)

#: Bump when the rendering changes, so that a rerun over slides made by an older generator refuses.
GENERATOR_VERSION = 1
CAMELYON_MPP = 0.243  # µm/px at level 0 of CAMELYON16's 40x scans
MANIFEST_NAME = "synth_manifest.json"
MIN_SIDE = 512  # px; smaller slides leave no room for lobes, fat and lesions

_GRID = 32  # level-0 px per cell of the low-resolution fields (tissue shape, zones)
_FINE = 8  # level-0 px per cell of the lookup maps used to place nuclei and vacuoles
_STRIP = 128  # rows rendered at a time (a multiple of _GRID; small strips stay in cache)
_SHIFT = 4  # cv2 drawing sub-pixel bits

# Stain optical densities per unit concentration (R, G, B), Ruifrok & Johnston's H&E vectors.
_H_VECTOR = np.array([0.65, 0.70, 0.29])
_E_VECTOR = np.array([0.07, 0.99, 0.11])


# --------------------------------------------------------------------------------------------------
# Per-slide appearance


@dataclass(frozen=True)
class SlideStyle:
    """How one slide looks, as if stained and scanned at one CAMELYON centre.

    Attributes:
        stain_h, stain_e: optical density (R, G, B) per unit haematoxylin / eosin concentration.
        background_od: optical density (R, G, B) of the glass (a faint tint).
        blur_sigma: scanner blur, Gaussian sigma in level-0 px.
        noise_sigma: sensor noise, standard deviation in RGB units (0..255).
        jpeg_quality: JPEG quality of the pyramid's tiles.
    """

    stain_h: tuple[float, float, float]
    stain_e: tuple[float, float, float]
    background_od: tuple[float, float, float]
    blur_sigma: float
    noise_sigma: float
    jpeg_quality: int

    @classmethod
    def sample(cls, rng: np.random.Generator) -> SlideStyle:
        """A random style; ranges chosen so that slides look like different centres' scans."""

        def vector(base: np.ndarray, strength: float, jitter: float) -> tuple[float, float, float]:
            v = base / np.linalg.norm(base) + rng.normal(0.0, jitter, 3)
            v = np.clip(v, 0.02, None)
            v *= strength / np.linalg.norm(v)
            return float(v[0]), float(v[1]), float(v[2])

        amount = rng.uniform(0.6, 1.45)  # staining strength (section thickness, stain time)
        glass = rng.uniform(0.01, 0.04) + rng.uniform(0.0, 0.025, 3)  # a faint tint
        return cls(
            stain_h=vector(_H_VECTOR, amount * rng.uniform(0.8, 1.25), 0.05),
            stain_e=vector(_E_VECTOR, amount * rng.uniform(0.6, 1.4), 0.08),
            background_od=(float(glass[0]), float(glass[1]), float(glass[2])),
            blur_sigma=float(rng.uniform(0.4, 1.6)),
            noise_sigma=float(rng.uniform(1.0, 4.0)),
            jpeg_quality=int(rng.integers(75, 96)),
        )


@dataclass
class SynthSlide:
    """What :func:`make_slide` wrote.

    Attributes:
        path: the pyramidal TIFF.
        annotation_path: the ASAP XML (tumor slides), else None.
        size: level-0 ``(width, height)`` px.
        seed: the seed it was drawn from.
        tumor: lesion outlines, ``(N, 2)`` float64 ``(x, y)`` level-0 px.
        exclusion: normal islands inside lesions, same format.
        style: the slide's stain and scanner.
        tissue_fraction: tissue area / slide area.
        tumor_fraction: tumor (minus exclusion) area / tissue area.
        seconds: wall time to make it.
    """

    path: Path
    annotation_path: Path | None
    size: tuple[int, int]
    seed: int
    tumor: list[np.ndarray]
    exclusion: list[np.ndarray]
    style: SlideStyle
    tissue_fraction: float
    tumor_fraction: float
    seconds: float = field(default=0.0)


# --------------------------------------------------------------------------------------------------
# Low-frequency fields, periodic textures and shapes


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-blurred white noise, rescaled to zero mean and unit standard deviation."""
    field_ = cv2.GaussianBlur(
        rng.standard_normal(shape, dtype=np.float32), (0, 0), sigma, borderType=cv2.BORDER_REFLECT
    )
    return (field_ - field_.mean()) / max(float(field_.std()), 1e-6)


def _periodic_noise(rng: np.random.Generator, side: int, sigma: float) -> np.ndarray:
    """A wrap-around (tileable) square of blurred noise with unit standard deviation."""
    tile: np.ndarray = rng.standard_normal((side, side), dtype=np.float32)
    if sigma > 0:  # blur with wrap-around (OpenCV's filters have no BORDER_WRAP)
        pad = math.ceil(4 * sigma)
        tile = cv2.GaussianBlur(np.pad(tile, pad, mode="wrap"), (0, 0), sigma)[pad:-pad, pad:-pad]
    return np.ascontiguousarray(tile / max(float(tile.std()), 1e-6))


class _Texture:
    """A periodic texture sampled in level-0 coordinates: strip ``rows(y0, h, w)`` is (h, w)."""

    def __init__(self, tile: np.ndarray, rng: np.random.Generator) -> None:
        self.tile = tile
        self.offset = (int(rng.integers(tile.shape[0])), int(rng.integers(tile.shape[1])))

    def rows(self, y0: int, h: int, w: int) -> np.ndarray:
        side_y, side_x = self.tile.shape
        block = self.tile[(np.arange(y0, y0 + h) + self.offset[0]) % side_y]
        block = np.roll(block, -self.offset[1], axis=1)
        return np.tile(block, (1, -(-w // side_x)))[:, :w]


def _star_polygon(
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


def _fill(shape: tuple[int, int], polygons: Sequence[np.ndarray], scale: float) -> np.ndarray:
    """uint8 0/1 raster of ``polygons`` (level-0 px) on a grid of ``scale`` level-0 px per cell."""
    out = np.zeros(shape, np.uint8)
    for p in polygons:  # one call per polygon: fillPoly XORs overlapping polygons of one call
        pts = np.round((p / scale - 0.5) * (1 << _SHIFT)).astype(np.int32)
        cv2.fillPoly(out, [pts], 1, cv2.LINE_8, _SHIFT)
    return out


def _upsample(lowres: np.ndarray, scale: int, y0: int, width: int, height: int) -> np.ndarray:
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


def _oriented(
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


# --------------------------------------------------------------------------------------------------
# The slide's layout: tissue, zones, lesions, vacuoles, nuclei

# nucleus kinds
_LYMPHOCYTE, _CENTROBLAST, _HISTIOCYTE, _SPINDLE, _TUMOR = range(5)
# columns of the nuclei table (level-0 px, radians)
_X, _Y, _RX, _RY, _ANGLE, _KIND, _FILL, _RIM, _A2, _A3, _P2, _P3 = range(12)
_VERTICES = 12  # polygon vertices per nucleus


@dataclass
class _Layout:
    """Everything drawn on a slide, decided before rendering (level-0 px unless noted)."""

    width: int
    height: int
    um: float  # level-0 px per µm
    fields: np.ndarray  # (gh, gw, 3) float32 at _GRID: tissue (> 0.5), fibre blend, eosin amount
    fibre_angles: tuple[float, float]  # radians
    tumor: list[np.ndarray]
    exclusion: list[np.ndarray]
    vacuoles: np.ndarray  # (V, 5): x, y, rx, ry, angle (degrees), sorted by y
    nuclei: np.ndarray  # (N, 12) columns _X.._P3, sorted by y
    fine_tumor: np.ndarray  # bool at _FINE: tumor minus exclusion
    fine_tissue: np.ndarray  # bool at _FINE


def _tissue_field(rng: np.random.Generator, gw: int, gh: int) -> np.ndarray:
    """Low-resolution field whose > 0.5 region is one to three irregular tissue lobes."""
    lobes = np.zeros((gh, gw), np.uint8)
    n_lobes = int(rng.choice([1, 1, 2, 2, 3]))
    side = min(gw, gh)
    for i in range(n_lobes):
        radius = side * rng.uniform(0.26, 0.36) / (1 + 0.35 * i)
        cx = rng.uniform(0.3, 0.7) * gw if i == 0 else rng.uniform(0.18, 0.82) * gw
        cy = rng.uniform(0.3, 0.7) * gh if i == 0 else rng.uniform(0.18, 0.82) * gh
        poly = _star_polygon(
            rng, (cx, cy), radius, roughness=0.35, aspect=rng.uniform(0.6, 1.0), n_vertices=96
        )
        cv2.fillPoly(lobes, [np.round(poly * 16).astype(np.int32)], 1, cv2.LINE_8, _SHIFT)
    field_: np.ndarray = cv2.GaussianBlur(lobes.astype(np.float32), (0, 0), max(1.0, side / 60))
    field_ += 0.12 * _smooth_noise(rng, (gh, gw), max(1.0, side / 40))
    field_ += 0.04 * _smooth_noise(rng, (gh, gw), max(0.7, side / 150))
    # keep the tissue off the slide border, as on a glass slide
    yy, xx = np.mgrid[0:gh, 0:gw]
    border = np.minimum.reduce([xx + 0.5, yy + 0.5, gw - xx - 0.5, gh - yy - 0.5]) / (0.04 * side)
    return (field_ * np.clip(border, 0, 1)).astype(np.float32)


def _place_lesions(
    rng: np.random.Generator, tissue: np.ndarray, um: float
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Lesion outlines (and normal islands inside some) within ``tissue`` (bool at _GRID)."""
    # distance (level-0 px) from each cell to the tissue edge: a lesion of radius r fits where >= r
    inside = cv2.distanceTransform(tissue.astype(np.uint8), cv2.DIST_L2, 5) * _GRID
    tissue_area = float(tissue.sum()) * _GRID**2
    target = rng.uniform(0.05, 0.12) * tissue_area  # share of the tissue that is metastasis
    n_large, n_small = int(rng.integers(1, 4)), int(rng.integers(1, 5))
    # a few large lesions share most of the area; micro-metastases / isolated tumour cell
    # clusters (radius 40-120 µm) take at most 15% of it
    small_r = [
        min(rng.uniform(40, 120) * um, math.sqrt(0.15 * target / n_small / math.pi))
        for _ in range(n_small)
    ]
    large_area = target - sum(math.pi * r**2 for r in small_r)
    shares = rng.dirichlet(np.full(n_large, 1.5))
    radii = [math.sqrt(large_area * s / math.pi) for s in shares] + small_r

    placed: list[tuple[float, float, float]] = []
    tumor: list[np.ndarray] = []
    exclusion: list[np.ndarray] = []
    for radius in radii:
        r = radius
        for attempt in range(60):
            shape = _star_polygon(rng, (0.0, 0.0), r, roughness=0.45, aspect=rng.uniform(0.6, 1))
            shape *= r * math.sqrt(math.pi / max(_polygon_area(shape), 1e-9))  # area = pi r^2
            reach = float(np.hypot(shape[:, 0], shape[:, 1]).max()) + _GRID
            ys, xs = np.nonzero(inside >= reach)
            if len(xs) == 0:
                r *= 0.85
                continue
            k = int(rng.integers(len(xs)))
            cx = (xs[k] + rng.uniform()) * _GRID
            cy = (ys[k] + rng.uniform()) * _GRID
            if any(math.hypot(cx - px, cy - py) < 1.35 * (r + pr) for px, py, pr in placed):
                if attempt % 10 == 9:
                    r *= 0.85
                continue
            outline = shape + np.array([cx, cy])
            placed.append((cx, cy, r))
            tumor.append(np.round(outline, 1))
            if r > 30 * um and rng.uniform() < 0.5:
                island = _normal_island(rng, outline, (cx, cy), r)
                if island is not None:
                    exclusion.append(np.round(island, 1))
            break
        else:
            log.debug("no room for a lesion of radius %.0f px; skipped", radius)
    return tumor, exclusion


def _polygon_area(polygon: np.ndarray) -> float:
    """Area enclosed by a simple polygon (shoelace formula), in squared units of its vertices."""
    x, y = polygon[:, 0], polygon[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _normal_island(
    rng: np.random.Generator, outline: np.ndarray, center: tuple[float, float], radius: float
) -> np.ndarray | None:
    """A small normal region well inside the lesion ``outline`` (an ASAP ``_2`` polygon)."""
    contour = outline.astype(np.float32).reshape(-1, 1, 2)
    for _ in range(20):
        r = radius * rng.uniform(0.12, 0.25)
        off = rng.uniform(0, 0.35 * radius, 2) * rng.choice([-1, 1], 2)
        island = _star_polygon(rng, (center[0] + off[0], center[1] + off[1]), r, roughness=0.3)
        margin = [cv2.pointPolygonTest(contour, (float(x), float(y)), True) for x, y in island]
        if min(margin) > 0.1 * radius:
            return island
    return None


def _fat_vacuoles(rng: np.random.Generator, where: np.ndarray, um: float) -> np.ndarray:
    """Adipocytes (round empty holes) packed where ``where`` (float 0..1 at _FINE) is high.

    Returns (V, 5): x, y, rx, ry, angle (level-0 px, degrees), sorted by y.
    """
    fw = where.shape[1]
    weights = where.ravel().astype(np.float64)
    if weights.sum() <= 0:
        return np.zeros((0, 5))
    mean_r = 30 * um
    n_candidates = int(8 * weights.sum() * _FINE**2 / (math.pi * mean_r**2)) + 1
    cells = rng.choice(len(weights), n_candidates, p=weights / weights.sum())
    xs = (cells % fw + rng.uniform(size=n_candidates)) * _FINE
    ys = (cells // fw + rng.uniform(size=n_candidates)) * _FINE
    rs = rng.uniform(16, 45, len(xs)) * um
    chosen: list[int] = []
    cell = 100 * um  # greedy packing with a coarse grid of the accepted ones: walls of ~2 µm
    buckets: dict[tuple[int, int], list[int]] = {}
    for i in range(len(xs)):
        bx, by = int(xs[i] // cell), int(ys[i] // cell)
        near = [
            j for dx in (-1, 0, 1) for dy in (-1, 0, 1) for j in buckets.get((bx + dx, by + dy), ())
        ]
        if near:
            j = np.asarray(near)
            if np.any(np.hypot(xs[j] - xs[i], ys[j] - ys[i]) < rs[j] + rs[i] + 2 * um):
                continue
        chosen.append(i)
        buckets.setdefault((bx, by), []).append(i)
    c = np.asarray(chosen, dtype=int)
    aspect = rng.uniform(0.75, 1.0, len(c))
    out = np.stack([xs[c], ys[c], rs[c], rs[c] * aspect, rng.uniform(0, 180, len(c))], axis=1)
    return out[np.argsort(out[:, 1], kind="stable")].reshape(-1, 5)


def _draw_vacuoles(img: np.ndarray, vacuoles: np.ndarray, y0: int, scale: int = 1) -> None:
    """Stamp vacuoles (level-0 px, sorted by y) as 1 onto ``img``: row 0 is level-0 row ``y0``."""
    f = (1 << _SHIFT) / scale
    reach = float(vacuoles[:, 2].max()) if len(vacuoles) else 0.0
    lo = np.searchsorted(vacuoles[:, 1], y0 - reach)
    hi = np.searchsorted(vacuoles[:, 1], y0 + img.shape[0] * scale + reach)
    for x, y, rx, ry, angle in vacuoles[lo:hi].tolist():
        center = (round(x * f), round((y - y0) * f))
        axes = (round(rx * f), round(ry * f))
        cv2.ellipse(img, center, axes, angle, 0, 360, 1, -1, cv2.LINE_8, _SHIFT)


def _nuclei(
    rng: np.random.Generator,
    width: int,
    height: int,
    um: float,
    fine_tumor: np.ndarray,
    usable: np.ndarray,
    zones: dict[str, np.ndarray],
) -> np.ndarray:
    """All nuclei of the slide, (N, 12) with columns _X.._P3, sorted by y (level-0 px)."""
    parts = []

    def scatter(density: np.ndarray, per_um2: float) -> tuple[np.ndarray, np.ndarray]:
        """Poisson points with intensity ``per_um2 * density`` (density 0..1 at _FINE)."""
        n = rng.poisson(per_um2 * width * height / um**2)
        xs = rng.uniform(0, width, n)
        ys = rng.uniform(0, height, n)
        d = density[(ys // _FINE).astype(int), (xs // _FINE).astype(int)]
        keep = rng.uniform(size=n) < d
        return xs[keep], ys[keep]

    def add(
        xs: np.ndarray,
        ys: np.ndarray,
        kind: int,
        radius_um: Callable[[int], np.ndarray],
        aspect: tuple[float, float],
        fill: tuple[float, float],
        rim: tuple[float, float],
        irregular: float,
    ) -> None:
        n = len(xs)
        table = np.empty((n, 12))
        table[:, _X], table[:, _Y] = xs, ys
        table[:, _RX] = radius_um(n) * um
        table[:, _RY] = table[:, _RX] * rng.uniform(aspect[0], aspect[1], n)
        table[:, _ANGLE] = rng.uniform(0, np.pi, n)
        table[:, _KIND] = kind
        table[:, _FILL] = rng.uniform(fill[0], fill[1], n)
        table[:, _RIM] = rng.uniform(rim[0], rim[1], n)
        table[:, _A2] = rng.uniform(0, irregular, n)
        table[:, _A3] = rng.uniform(0, irregular * 0.8, n)
        table[:, _P2:] = rng.uniform(0, 2 * np.pi, (n, 2))
        parts.append(table)

    def normal_r(mean: float, sd: float) -> Callable[[int], np.ndarray]:
        return lambda n: np.clip(rng.normal(mean, sd, n), 0.5 * mean, 2 * mean)

    normal = usable * ~fine_tumor
    centre, sinus, capsule, fat = (zones[k] for k in ("centre", "sinus", "capsule", "fat"))
    # lymphocytes: small, round, dark, densely packed; fewer in sinuses, capsule, germinal centres
    dens = normal * zones["cellularity"] * (1 - 0.75 * sinus) * (1 - 0.85 * capsule)
    dens *= (1 - 0.6 * centre) * (1 - 0.9 * fat)
    xs, ys = scatter(dens, 0.045)
    add(xs, ys, _LYMPHOCYTE, normal_r(2.6, 0.3), (0.8, 1.0), (0.95, 1.35), (0.0, 0.0), 0.05)
    # germinal-centre cells: larger, paler, vesicular (a confounder for metastases)
    xs, ys = scatter(normal * centre * 0.8, 0.009)
    add(xs, ys, _CENTROBLAST, normal_r(3.6, 0.5), (0.7, 1.0), (0.55, 0.85), (0.8, 1.1), 0.08)
    # sinus histiocytes: sparse, large, pale, oval, in pink cytoplasm (a confounder)
    xs, ys = scatter(normal * sinus * 0.7, 0.004)
    add(xs, ys, _HISTIOCYTE, normal_r(4.0, 0.6), (0.5, 0.8), (0.4, 0.6), (0.7, 1.0), 0.12)
    # stromal / endothelial spindles, mostly in the capsule, septa and between fat cells
    xs, ys = scatter(normal * (0.15 + 0.85 * np.maximum(capsule, fat)) * 0.5, 0.0012)
    add(xs, ys, _SPINDLE, normal_r(4.5, 0.8), (0.22, 0.35), (0.9, 1.2), (0.0, 0.0), 0.03)
    # metastatic carcinoma: crowded, large, pleomorphic (log-normal sizes, irregular), vesicular
    xs, ys = scatter(fine_tumor * usable * np.clip(zones["nest"], 0.5, 1.0), 0.024)
    tumor_r = lambda n: np.exp(rng.normal(math.log(5.0), 0.22, n))  # noqa: E731
    add(xs, ys, _TUMOR, tumor_r, (0.55, 1.0), (0.3, 0.5), (0.75, 1.0), 0.14)

    nuclei = np.concatenate(parts)
    nuclei = nuclei[rng.permutation(len(nuclei))]  # random stacking order of overlaps ...
    return nuclei[np.argsort(nuclei[:, _Y], kind="stable")]  # ... then by row for strip rendering


def _nucleus_polygons(nuclei: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """(N, _VERTICES, 2) int32 outlines in level-0 px * 2**_SHIFT (irregular ellipses)."""
    theta = np.linspace(0, 2 * np.pi, _VERTICES, endpoint=False)[None, :]
    r = (
        1
        + nuclei[:, _A2, None] * np.cos(2 * theta + nuclei[:, _P2, None])
        + nuclei[:, _A3, None] * np.cos(3 * theta + nuclei[:, _P3, None])
    ) * scale
    px = r * nuclei[:, _RX, None] * np.cos(theta)
    py = r * nuclei[:, _RY, None] * np.sin(theta)
    c, s = np.cos(nuclei[:, _ANGLE, None]), np.sin(nuclei[:, _ANGLE, None])
    x = nuclei[:, _X, None] + px * c - py * s
    y = nuclei[:, _Y, None] + px * s + py * c
    return np.round(np.stack([x, y], axis=2) * (1 << _SHIFT)).astype(np.int32)


def _layout(rng: np.random.Generator, width: int, height: int, mpp: float, tumor: bool) -> _Layout:
    um = 1.0 / mpp
    gw, gh = -(-width // _GRID), -(-height // _GRID)
    fw, fh = gw * (_GRID // _FINE), gh * (_GRID // _FINE)

    def to_fine(grid: np.ndarray) -> np.ndarray:
        return cv2.resize(grid.astype(np.float32), (fw, fh), interpolation=cv2.INTER_LINEAR)

    def zone(sigma_um: float, threshold: float) -> np.ndarray:
        """Soft patches (0..1 at _FINE) of low-frequency noise above ``threshold`` sd."""
        n = _smooth_noise(rng, (gh, gw), max(0.8, sigma_um * um / _GRID))
        return to_fine(np.clip((n - threshold) / 0.5, 0, 1))

    tissue_field = _tissue_field(rng, gw, gh)
    lesions, islands = _place_lesions(rng, tissue_field > 0.5, um) if tumor else ([], [])
    if tumor and not lesions:
        raise ConfigError(
            f"synthetic slide {width}x{height}: no room for a lesion; use a larger width/height"
        )
    fine_tumor = Annotations(tumor=lesions, exclusion=islands).mask(
        0, 0, fw * _FINE, fh * _FINE, _FINE
    )
    fine_tissue = to_fine(tissue_field) > 0.5
    fine_outline = _fill((fh, fw), lesions, _FINE).astype(bool)  # lesions with their islands

    # follicles: round dense lymphoid nodules; germinal centres are their paler cores
    follicle: np.ndarray = np.zeros((fh, fw), np.float32)
    centre: np.ndarray = np.zeros((fh, fw), np.float32)
    ys, xs = np.nonzero(fine_tissue & ~fine_outline)
    n_follicles = rng.poisson(len(xs) * _FINE**2 / (600 * um) ** 2 * 1.5)
    for _ in range(min(n_follicles, 40) if len(xs) else 0):
        k = int(rng.integers(len(xs)))
        r = rng.uniform(90, 200) * um / _FINE
        box = ((float(xs[k]), float(ys[k])), (2 * r, 2 * r * rng.uniform(0.7, 1.0)))
        angle = rng.uniform(0, 180)
        cv2.ellipse(follicle, (*box, angle), 1.0, -1)
        if rng.uniform() < 0.7:
            cv2.ellipse(centre, (box[0], (0.6 * box[1][0], 0.6 * box[1][1]), angle), 1.0, -1)
    follicle = cv2.GaussianBlur(follicle, (0, 0), 8 * um / _FINE)
    centre = cv2.GaussianBlur(centre, (0, 0), 8 * um / _FINE)
    sinus = zone(60, 0.9) * (1 - follicle)
    edge = np.clip((tissue_field - 0.5) / 0.07, 0, 1)  # 0 at the tissue edge, 1 inside
    capsule = to_fine(1 - edge) * fine_tissue
    cellularity = 0.8 + 0.2 * to_fine(_smooth_noise(rng, (gh, gw), max(0.8, 150 * um / _GRID)))
    cellularity = np.clip(cellularity + 0.3 * follicle, 0.3, 1.0)
    # fat: patches and the periphery (hilum, around the capsule); never inside a lesion
    fat = np.maximum(zone(200, rng.uniform(0.5, 1.6)), capsule * zone(80, rng.uniform(0.0, 1.0)))
    fat *= fine_tissue * ~fine_outline
    nest = 0.6 + 0.4 * to_fine(_smooth_noise(rng, (gh, gw), max(0.6, 20 * um / _GRID)))
    vacuoles = _fat_vacuoles(rng, fat, um)
    scattered = fine_tissue & ~fine_outline & (rng.uniform(size=(fh, fw)) < 2e-4)
    if scattered.any():  # a few lone fat cells / small vessels anywhere in the node
        sy, sx = np.nonzero(scattered)
        lone_r = rng.uniform(10, 25, len(sx)) * um
        aspect = rng.uniform(0.6, 1, len(sx))
        lone = np.stack(
            [sx * _FINE + 4.0, sy * _FINE + 4.0, lone_r, lone_r * aspect, 0 * lone_r], axis=1
        )
        vacuoles = np.concatenate([vacuoles, lone])
        vacuoles = vacuoles[np.argsort(vacuoles[:, 1], kind="stable")]
    if lesions and len(vacuoles):  # no fat cell reaches into a lesion
        clearance = cv2.distanceTransform((~fine_outline).view(np.uint8), cv2.DIST_L2, 5) * _FINE
        cy = np.clip((vacuoles[:, 1] // _FINE).astype(int), 0, fh - 1)
        cx = np.clip((vacuoles[:, 0] // _FINE).astype(int), 0, fw - 1)
        vacuoles = vacuoles[clearance[cy, cx] > vacuoles[:, 2] + 2 * _FINE]
    holes = np.zeros((fh, fw), np.uint8)
    _draw_vacuoles(holes, vacuoles, 0, scale=_FINE)
    zones = {"centre": centre, "sinus": sinus, "capsule": capsule, "fat": fat}
    zones |= {"cellularity": cellularity, "nest": nest}
    usable = (fine_tissue & (holes == 0)).astype(np.float32)
    nuclei = _nuclei(rng, width, height, um, fine_tumor, usable, zones)

    # eosin amount: patchy; sinuses (histiocyte cytoplasm) and capsule (collagen) are pinker
    eosin = 1.0 + 0.18 * _smooth_noise(rng, (gh, gw), max(0.8, 40 * um / _GRID))
    sinus_grid = cv2.resize(sinus, (gw, gh), interpolation=cv2.INTER_AREA)
    eosin *= 1 + 0.35 * sinus_grid + 0.6 * (1 - edge)
    blend = np.clip(0.5 + 0.5 * _smooth_noise(rng, (gh, gw), max(0.8, 80 * um / _GRID)), 0, 1)
    return _Layout(
        width=width,
        height=height,
        um=um,
        fields=np.dstack([tissue_field, blend, eosin]).astype(np.float32),
        fibre_angles=(float(rng.uniform(0, np.pi)), float(rng.uniform(0, np.pi))),
        tumor=lesions,
        exclusion=islands,
        vacuoles=vacuoles,
        nuclei=nuclei,
        fine_tumor=fine_tumor[: -(-height // _FINE), : -(-width // _FINE)],
        fine_tissue=fine_tissue[: -(-height // _FINE), : -(-width // _FINE)],
    )


# --------------------------------------------------------------------------------------------------
# Rendering


def _render(rng: np.random.Generator, layout: _Layout, style: SlideStyle) -> np.ndarray:
    """The level-0 RGB image (H, W, 3) uint8, rendered in strips of _STRIP rows."""
    w, h, um = layout.width, layout.height, layout.um
    rgb = np.empty((h, w, 3), np.uint8)
    fibre_tile = _periodic_noise(rng, 512, 1.0) / 3
    grain = _Texture(_periodic_noise(rng, 1024, 0.45 * um), rng)  # chromatin granules
    cyto = _Texture(_periodic_noise(rng, 1024, 1.5 * um), rng)  # tumour cytoplasm
    sensor = _Texture(rng.standard_normal((1024, 1024), dtype=np.float32), rng)
    annotations = Annotations(tumor=layout.tumor, exclusion=layout.exclusion)
    minus_h = [-float(v) for v in style.stain_h]
    minus_e = [-float(v) for v in style.stain_e]
    minus_bg = [-float(v) for v in style.background_od]
    f = 1 << _SHIFT

    nuclei = layout.nuclei
    kinds = nuclei[:, _KIND]
    polygons = _nucleus_polygons(nuclei)  # (N, V, 2), level-0 px * f
    reach = float(np.abs(polygons[..., 1] - polygons[..., 1].mean(1, keepdims=True)).max()) / f
    reach = reach + 2 if len(nuclei) else 0.0
    ny = nuclei[:, _Y]
    fills = nuclei[:, _FILL].tolist()
    rim_levels = np.round(nuclei[:, _RIM] * 10) / 10  # rims drawn in batches of equal value
    rim_width = max(1, round(0.45 * um))
    # nucleoli: tumour (large) and germinal-centre (small) cells, off-centre
    has_nucleolus = np.flatnonzero(np.isin(kinds, (_TUMOR, _CENTROBLAST)))
    sub = nuclei[has_nucleolus]
    off = 0.3 * np.minimum(sub[:, _RX], sub[:, _RY]) * np.sign(sub[:, _P2] - np.pi)
    nucleoli_y = sub[:, _Y]
    nucleoli = np.stack(
        [
            np.round((sub[:, _X] + off * np.cos(sub[:, _ANGLE])) * f),
            np.round((sub[:, _Y] + off * np.sin(sub[:, _ANGLE])) * f),
            np.maximum(1, np.round(np.where(sub[:, _KIND] == _TUMOR, 0.75, 0.45) * um * f)),
        ],
        axis=1,
    ).astype(int)
    nucleoli_value = (1.2 * sub[:, _RIM]).tolist()
    # histiocytes: a halo of pink cytoplasm
    histiocytes = np.flatnonzero(kinds == _HISTIOCYTE)
    halos = _nucleus_polygons(nuclei[histiocytes], scale=2.7)
    halo_y = ny[histiocytes]
    halo_reach = 3 * reach

    a1, a2 = layout.fibre_angles
    half = _GRID // 2
    for y0 in range(0, h, _STRIP):
        sh = min(_STRIP, h - y0)
        hh, hw = -(-sh // 2), -(-w // 2)
        # smooth fields at half resolution: tissue, fibre orientation blend, eosin amount
        fields = _upsample(layout.fields, half, y0 // 2, hw, hh)
        f1 = _oriented(fibre_tile, a1, 6 * um, 0.6 * um, y0 // 2, hw, hh)
        f2 = _oriented(fibre_tile, a2, 6 * um, 0.6 * um, y0 // 2, hw, hh)
        fibres = f2 + (f1 - f2) * fields[..., 1]
        eosin_half = fields[..., 2] * (0.22 + 0.14 * fibres)
        full = cv2.resize(np.dstack([fields[..., 0], eosin_half]), (2 * hw, 2 * hh))
        tissue = (full[:sh, :w, 0] > 0.5).astype(np.uint8)
        eosin = np.ascontiguousarray(full[:sh, :w, 1])
        holes = np.zeros((sh, w), np.uint8)
        _draw_vacuoles(holes, layout.vacuoles, y0)
        solid = cv2.subtract(tissue, holes)  # 1 where tissue and no vacuole
        hema = np.full((sh, w), 0.05, np.float32)
        amp = np.full((sh, w), 0.15, np.float32)  # chromatin grain contrast
        lesion = annotations.mask(0, y0, w, sh).view(np.uint8) if layout.tumor else None
        if lesion is not None and lesion.any():
            # carcinoma: smoother cytoplasm, faintly basophilic, coarser chromatin
            cv2.copyTo(0.3 + 0.05 * cyto.rows(y0, sh, w), lesion, eosin)
            hema[lesion.view(bool)] = 0.08
            amp[lesion.view(bool)] = 0.28

        lo, hi = np.searchsorted(halo_y, (y0 - halo_reach, y0 + sh + halo_reach))
        shift = np.array([0, y0 * f], np.int32)
        for poly in halos[lo:hi] - shift:
            cv2.fillConvexPoly(eosin, poly, 0.4, cv2.LINE_8, _SHIFT)
        lo, hi = np.searchsorted(ny, (y0 - reach, y0 + sh + reach))
        pts = polygons[lo:hi] - shift
        for poly, value in zip(pts, fills[lo:hi]):
            cv2.fillConvexPoly(hema, poly, value, cv2.LINE_8, _SHIFT)
        levels = rim_levels[lo:hi]
        for value in np.unique(levels[levels > 0.3]).tolist():  # vesicular: chromatin at the rim
            cv2.polylines(
                hema, list(pts[levels == value]), True, value, rim_width, cv2.LINE_8, _SHIFT
            )
        lo, hi = np.searchsorted(nucleoli_y, (y0 - reach, y0 + sh + reach))
        for (x, y, r), value in zip(nucleoli[lo:hi].tolist(), nucleoli_value[lo:hi]):
            cv2.circle(hema, (x, y - y0 * f), r, value, -1, cv2.LINE_8, _SHIFT)

        amp *= grain.rows(y0, sh, w)
        amp += 1
        hema *= amp
        eosin *= np.clip(1 - 0.55 * hema, 0.25, 1)  # nuclei hold little eosin
        cv2.multiply(hema, solid, dst=hema, dtype=cv2.CV_32F)
        cv2.multiply(eosin, solid, dst=eosin, dtype=cv2.CV_32F)
        noise = sensor.rows(y0, sh, w) * style.noise_sigma
        channels = []
        for c in range(3):
            od = cv2.addWeighted(hema, minus_h[c], eosin, minus_e[c], minus_bg[c])
            channels.append(cv2.convertScaleAbs(cv2.scaleAdd(cv2.exp(od), 255.0, noise)))
        cv2.merge(channels, dst=rgb[y0 : y0 + sh])
    if style.blur_sigma > 0:
        cv2.GaussianBlur(rgb, (0, 0), style.blur_sigma, dst=rgb, borderType=cv2.BORDER_REFLECT)
    return rgb


# --------------------------------------------------------------------------------------------------
# Public API


def _resolve_size(
    size: tuple[int, int] | None, width: int | None, height: int | None
) -> tuple[int, int]:
    if size is not None and (width is not None or height is not None):
        raise ConfigError("make_slide: give either size=(width, height) or width= and height=")
    if size is None:
        if width is None or height is None:
            raise ConfigError("make_slide: size=(width, height) or both width= and height= needed")
        size = (width, height)
    w, h = size
    for name, v in (("width", w), ("height", h)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < MIN_SIDE:
            raise ConfigError(f"make_slide: {name} must be an integer >= {MIN_SIDE} px, got {v!r}")
    return int(w), int(h)


def make_slide(
    path: str | Path,
    *,
    seed: int,
    tumor: bool,
    size: tuple[int, int] | None = None,
    width: int | None = None,
    height: int | None = None,
    mpp: float = CAMELYON_MPP,
    annotation_path: str | Path | None = None,
    style: SlideStyle | None = None,
    tile_size: int = 256,
) -> SynthSlide:
    """Draw one synthetic H&E lymph-node slide and write it as a pyramidal TIFF (+ ASAP XML).

    Args:
        path: the ``.tif`` to write (atomically; parent folders are created).
        seed: everything is drawn from it; the same arguments give the same bytes.
        tumor: draw metastases and write their outlines to ``annotation_path``.
        size: level-0 ``(width, height)`` px; or give ``width`` and ``height``. At least 512 px.
        mpp: µm per level-0 pixel (CAMELYON16: 0.243); nuclei and fat keep their size in µm.
        annotation_path: the ASAP XML of a tumor slide; default ``path`` with suffix ``.xml``.
        style: stain/scanner appearance; default drawn from ``seed``.
        tile_size: TIFF tile side in px.

    Returns:
        :class:`SynthSlide` with the outlines (level-0 px), style and tissue/tumor fractions.

    Raises:
        ConfigError: bad size, mpp or seed.
    """
    t0 = time.perf_counter()
    path = Path(path)
    w, h = _resolve_size(size, width, height)
    if not (isinstance(mpp, (int, float)) and math.isfinite(mpp) and 0.05 <= mpp <= 5):
        raise ConfigError(f"make_slide: mpp must be in 0.05..5 µm/px, got {mpp!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"make_slide: seed must be a non-negative integer, got {seed!r}")
    style_seed, layout_seed = np.random.SeedSequence(seed).spawn(2)
    rng = np.random.default_rng(layout_seed)  # the layout does not depend on the style given
    style = style if style is not None else SlideStyle.sample(np.random.default_rng(style_seed))
    layout = _layout(rng, w, h, float(mpp), tumor)
    rgb = _render(rng, layout, style)
    description = (
        f"lymphnode synthetic slide seed={seed} tumor={tumor} generator={GENERATOR_VERSION}"
    )
    write_pyramid(
        path,
        rgb,
        mpp=float(mpp),
        tile_size=tile_size,
        compression="jpeg",
        quality=style.jpeg_quality,
        description=description,
    )
    xml_path = None
    if tumor:
        xml_path = (
            Path(annotation_path) if annotation_path is not None else path.with_suffix(".xml")
        )
        write_asap(xml_path, layout.tumor, layout.exclusion)
    tissue = float(layout.fine_tissue.mean())
    lesion = float(
        (layout.fine_tumor & layout.fine_tissue).sum() / max(1, layout.fine_tissue.sum())
    )
    seconds = time.perf_counter() - t0
    log.debug("%s: %dx%d, %.1f s, tumor fraction %.3f", path.name, w, h, seconds, lesion)
    return SynthSlide(
        path=path,
        annotation_path=xml_path,
        size=(w, h),
        seed=int(seed),
        tumor=layout.tumor,
        exclusion=layout.exclusion,
        style=style,
        tissue_fraction=tissue,
        tumor_fraction=lesion,
        seconds=seconds,
    )


def slide_seed(seed: int, name: str) -> int:
    """The seed of slide ``name`` in a set drawn from ``seed`` (independent streams per name)."""
    sequence = np.random.SeedSequence([int(seed), zlib.crc32(name.encode("utf-8"))])
    return int(sequence.generate_state(1, np.uint64)[0] >> np.uint64(1))


def slide_names(n_tumor: int, n_normal: int) -> list[tuple[str, bool]]:
    """CAMELYON16 names: ``tumor_001``.., ``normal_001``.. with whether each is a tumor slide."""
    return [(f"tumor_{i:03d}", True) for i in range(1, n_tumor + 1)] + [
        (f"normal_{i:03d}", False) for i in range(1, n_normal + 1)
    ]


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _read_manifest(path: Path, *, required: bool) -> dict | None:
    """The manifest at ``path``; None if absent (or unreadable and not ``required``)."""
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
        if not isinstance(manifest.get("config"), dict) or not isinstance(
            manifest.get("slides"), dict
        ):
            raise ValueError("no 'config' and 'slides' objects")
    except (OSError, ValueError, AttributeError) as err:
        if not required:
            return None
        raise ConfigError(
            f"synth: {path} is not a synth manifest ({err}); use another out_dir or overwrite=true"
        ) from err
    return manifest


def _worker_init(threads: int) -> None:
    cv2.setNumThreads(threads)


def _make_one(job: dict) -> dict:
    info = make_slide(
        job["path"],
        seed=job["seed"],
        tumor=job["tumor"],
        size=(job["width"], job["height"]),
        mpp=job["mpp"],
        annotation_path=job["xml"],
    )
    return {
        "name": job["name"],
        "seconds": round(info.seconds, 2),
        "tumor_fraction": round(info.tumor_fraction, 4),
        "tissue_fraction": round(info.tissue_fraction, 4),
        "n_tumor_polygons": len(info.tumor),
        "n_exclusion_polygons": len(info.exclusion),
    }


def generate_slides(
    out_dir: str | Path,
    *,
    n_tumor: int,
    n_normal: int,
    width: int,
    height: int,
    seed: int,
    mpp: float = CAMELYON_MPP,
    workers: int = 2,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Write a set of synthetic slides in the CAMELYON16 layout; returns the manifest.

    ``<out_dir>/slides/{tumor_001,..,normal_001,..}.tif``, ``<out_dir>/annotations/tumor_XXX.xml``
    and ``<out_dir>/slides/synth_manifest.json`` (the config, per-slide seeds and facts). Slides
    already written with the same config are skipped (a killed run resumes); a folder made with
    another config (or holding slides synth did not write) is refused unless ``overwrite``.

    Raises:
        ConfigError: bad parameter, or the folder holds slides made with another config.
    """
    for name, value, low in (
        ("n_tumor", n_tumor, 0),
        ("n_normal", n_normal, 0),
        ("width", width, MIN_SIDE),
        ("height", height, MIN_SIDE),
        ("workers", workers, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ConfigError(f"synth: {name} must be an integer >= {low}, got {value!r}")
    if n_tumor + n_normal == 0:
        raise ConfigError("synth: n_tumor + n_normal must be at least 1, got 0 slides")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"synth: seed must be a non-negative integer, got {seed!r}")
    if not (isinstance(mpp, (int, float)) and math.isfinite(mpp) and 0.05 <= mpp <= 5):
        raise ConfigError(f"synth: mpp must be in 0.05..5 µm/px, got {mpp!r}")

    out = Path(out_dir)
    slides_dir, xml_dir = out / "slides", out / "annotations"
    manifest_path = slides_dir / MANIFEST_NAME
    config = {
        "n_tumor": int(n_tumor),
        "n_normal": int(n_normal),
        "width": int(width),
        "height": int(height),
        "mpp": float(mpp),
        "seed": int(seed),
        "generator_version": GENERATOR_VERSION,
    }
    names = dict(slide_names(n_tumor, n_normal))
    old = _read_manifest(manifest_path, required=not overwrite)
    if old is None and not overwrite and slides_dir.is_dir():
        foreign = [n for n in names if (slides_dir / f"{n}.tif").exists()]
        if foreign:
            raise ConfigError(
                f"synth: {slides_dir} already holds {', '.join(foreign[:3])}.tif without a "
                f"{MANIFEST_NAME} (not written by synth); use another out_dir or overwrite=true"
            )
    if old is not None and not overwrite:
        before = old["config"]
        differ = sorted(k for k in set(config) | set(before) if before.get(k) != config.get(k))
        if differ:
            changes = ", ".join(f"{k}: {before.get(k)!r} -> {config.get(k)!r}" for k in differ)
            raise ConfigError(
                f"synth: {slides_dir} holds slides made with another config (differing keys: "
                f"{changes}); use another out_dir or overwrite=true"
            )
    if old is not None and overwrite:  # slides of the old set that the new one does not have
        for name in set(old["slides"]) - set(names):
            (slides_dir / f"{name}.tif").unlink(missing_ok=True)
            (xml_dir / f"{name}.xml").unlink(missing_ok=True)
    kept = {} if old is None or overwrite else old["slides"]
    manifest = {"config": config, "slides": {k: v for k, v in kept.items() if k in names}}
    slides_dir.mkdir(parents=True, exist_ok=True)
    if n_tumor:
        xml_dir.mkdir(parents=True, exist_ok=True)

    jobs = []
    for name, is_tumor in names.items():
        tif, xml = slides_dir / f"{name}.tif", xml_dir / f"{name}.xml"
        if name in manifest["slides"] and tif.exists() and (not is_tumor or xml.exists()):
            continue  # finished by an earlier run with this config
        manifest["slides"].pop(name, None)
        if not is_tumor:
            xml.unlink(missing_ok=True)  # a normal slide has no XML
        jobs.append(
            {
                "name": name,
                "path": str(tif),
                "xml": str(xml) if is_tumor else None,
                "tumor": is_tumor,
                "seed": slide_seed(seed, name),
                "width": int(width),
                "height": int(height),
                "mpp": float(mpp),
            }
        )
    _write_json(manifest_path, manifest)
    skipped = len(names) - len(jobs)
    if skipped:
        log.info("synth: %d of %d slides already in %s, skipped", skipped, len(names), slides_dir)
    if not jobs:
        return manifest

    bar = tqdm(total=len(jobs), desc="synth slides", unit="slide", disable=not progress)

    def record(job: dict, result: dict) -> None:
        manifest["slides"][job["name"]] = {
            "seed": job["seed"],
            "tumor": job["tumor"],
            "file": f"{job['name']}.tif",
            "annotation": f"../annotations/{job['name']}.xml" if job["tumor"] else None,
            **{k: v for k, v in result.items() if k != "name"},
        }
        _write_json(manifest_path, manifest)
        bar.update(1)

    try:
        if workers <= 1 or len(jobs) == 1:
            for job in jobs:
                record(job, _make_one(job))
        else:
            n = min(workers, len(jobs))
            threads = max(1, (os.cpu_count() or 1) // n)
            with ProcessPoolExecutor(
                n,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_worker_init,
                initargs=(threads,),
            ) as pool:
                futures = {pool.submit(_make_one, job): job for job in jobs}
                try:
                    for future in as_completed(futures):
                        record(futures[future], future.result())
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)  # finished slides stay
                    raise
    finally:
        bar.close()
    return manifest


def _main(cfg: Any) -> None:
    """The Hydra entry point: ``python -m lymphnode.synth [key=value ...]``."""
    t0 = time.perf_counter()
    manifest = generate_slides(
        cfg.out_dir,
        n_tumor=cfg.n_tumor,
        n_normal=cfg.n_normal,
        width=cfg.width,
        height=cfg.height,
        seed=cfg.seed,
        mpp=cfg.mpp,
        workers=cfg.workers,
        overwrite=cfg.overwrite,
    )
    slides = manifest["slides"]
    fractions = [s["tumor_fraction"] for s in slides.values() if s.get("tumor")]
    print(
        f"{len(slides)} slides in {Path(cfg.out_dir) / 'slides'} "
        f"({sum(1 for s in slides.values() if s.get('tumor'))} tumor, "
        f"tumor fraction of tissue {min(fractions, default=0):.3f}-{max(fractions, default=0):.3f}) "
        f"in {time.perf_counter() - t0:.1f} s"
    )


def main() -> None:
    """``python -m lymphnode.synth [key=value ...]`` behind the error boundary of
    :mod:`lymphnode.core.boundary` (bad input: one ``error:`` line, exit 1; a bug: traceback, 2).
    Hydra is imported here so that the slide workers do not pay for it."""
    import hydra

    from lymphnode.core.boundary import config_dir, hydra_boundary

    app = hydra_boundary(_main)
    hydra.main(version_base=None, config_path=config_dir(), config_name="synth")(app)()


__all__ = [
    "CAMELYON_MPP",
    "GENERATOR_VERSION",
    "SlideStyle",
    "SynthSlide",
    "generate_slides",
    "make_slide",
    "slide_names",
    "slide_seed",
]

if __name__ == "__main__":
    main()
