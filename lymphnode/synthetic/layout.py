"""The layout of a synthetic slide, decided before rendering: tissue lobes, zones, lesions and
normal islands, fat vacuoles and the table of nuclei (level-0 px unless noted)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

from lymphnode.core.errors import ConfigError
from lymphnode.synthetic.fields import (
    FINE,
    GRID,
    SHIFT,
    fill_polygons,
    smooth_noise,
    star_polygon,
)
from lymphnode.wsi.annotations import Annotations

log = logging.getLogger(__name__)

# nucleus kinds
LYMPHOCYTE, CENTROBLAST, HISTIOCYTE, SPINDLE, TUMOR = range(5)
# columns of the nuclei table (level-0 px, radians)
(
    COL_X,
    COL_Y,
    COL_RX,
    COL_RY,
    COL_ANGLE,
    COL_KIND,
    COL_FILL,
    COL_RIM,
    COL_A2,
    COL_A3,
    COL_P2,
    COL_P3,
) = range(12)
VERTICES = 12  # polygon vertices per nucleus


@dataclass
class Layout:
    """Everything drawn on a slide, decided before rendering (level-0 px unless noted)."""

    width: int
    height: int
    um: float  # level-0 px per µm
    fields: np.ndarray  # (gh, gw, 3) float32 at GRID: tissue (> 0.5), fibre blend, eosin amount
    fibre_angles: tuple[float, float]  # radians
    tumor: list[np.ndarray]
    exclusion: list[np.ndarray]
    vacuoles: np.ndarray  # (V, 5): x, y, rx, ry, angle (degrees), sorted by y
    nuclei: np.ndarray  # (N, 12) columns COL_X.._P3, sorted by y
    fine_tumor: np.ndarray  # bool at FINE: tumor minus exclusion
    fine_tissue: np.ndarray  # bool at FINE


def _tissue_field(rng: np.random.Generator, gw: int, gh: int) -> np.ndarray:
    """Low-resolution field whose > 0.5 region is one to three irregular tissue lobes."""
    lobes = np.zeros((gh, gw), np.uint8)
    n_lobes = int(rng.choice([1, 1, 2, 2, 3]))
    side = min(gw, gh)
    for i in range(n_lobes):
        radius = side * rng.uniform(0.26, 0.36) / (1 + 0.35 * i)
        cx = rng.uniform(0.3, 0.7) * gw if i == 0 else rng.uniform(0.18, 0.82) * gw
        cy = rng.uniform(0.3, 0.7) * gh if i == 0 else rng.uniform(0.18, 0.82) * gh
        poly = star_polygon(
            rng, (cx, cy), radius, roughness=0.35, aspect=rng.uniform(0.6, 1.0), n_vertices=96
        )
        cv2.fillPoly(lobes, [np.round(poly * 16).astype(np.int32)], 1, cv2.LINE_8, SHIFT)
    field_: np.ndarray = cv2.GaussianBlur(lobes.astype(np.float32), (0, 0), max(1.0, side / 60))
    field_ += 0.12 * smooth_noise(rng, (gh, gw), max(1.0, side / 40))
    field_ += 0.04 * smooth_noise(rng, (gh, gw), max(0.7, side / 150))
    # keep the tissue off the slide border, as on a glass slide
    yy, xx = np.mgrid[0:gh, 0:gw]
    border = np.minimum.reduce([xx + 0.5, yy + 0.5, gw - xx - 0.5, gh - yy - 0.5]) / (0.04 * side)
    return (field_ * np.clip(border, 0, 1)).astype(np.float32)


def _place_lesions(
    rng: np.random.Generator, tissue: np.ndarray, um: float
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Lesion outlines (and normal islands inside some) within ``tissue`` (bool at GRID)."""
    # distance (level-0 px) from each cell to the tissue edge: a lesion of radius r fits where >= r
    inside = cv2.distanceTransform(tissue.astype(np.uint8), cv2.DIST_L2, 5) * GRID
    tissue_area = float(tissue.sum()) * GRID**2
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
            shape = star_polygon(rng, (0.0, 0.0), r, roughness=0.45, aspect=rng.uniform(0.6, 1))
            shape *= r * math.sqrt(math.pi / max(_polygon_area(shape), 1e-9))  # area = pi r^2
            reach = float(np.hypot(shape[:, 0], shape[:, 1]).max()) + GRID
            ys, xs = np.nonzero(inside >= reach)
            if len(xs) == 0:
                r *= 0.85
                continue
            k = int(rng.integers(len(xs)))
            cx = (xs[k] + rng.uniform()) * GRID
            cy = (ys[k] + rng.uniform()) * GRID
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
        island = star_polygon(rng, (center[0] + off[0], center[1] + off[1]), r, roughness=0.3)
        margin = [cv2.pointPolygonTest(contour, (float(x), float(y)), True) for x, y in island]
        if min(margin) > 0.1 * radius:
            return island
    return None


def _fat_vacuoles(rng: np.random.Generator, where: np.ndarray, um: float) -> np.ndarray:
    """Adipocytes (round empty holes) packed where ``where`` (float 0..1 at FINE) is high.

    Returns (V, 5): x, y, rx, ry, angle (level-0 px, degrees), sorted by y.
    """
    fw = where.shape[1]
    weights = where.ravel().astype(np.float64)
    if weights.sum() <= 0:
        return np.zeros((0, 5))
    mean_r = 30 * um
    n_candidates = int(8 * weights.sum() * FINE**2 / (math.pi * mean_r**2)) + 1
    cells = rng.choice(len(weights), n_candidates, p=weights / weights.sum())
    xs = (cells % fw + rng.uniform(size=n_candidates)) * FINE
    ys = (cells // fw + rng.uniform(size=n_candidates)) * FINE
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


def draw_vacuoles(img: np.ndarray, vacuoles: np.ndarray, y0: int, scale: int = 1) -> None:
    """Stamp vacuoles (level-0 px, sorted by y) as 1 onto ``img``: row 0 is level-0 row ``y0``."""
    f = (1 << SHIFT) / scale
    reach = float(vacuoles[:, 2].max()) if len(vacuoles) else 0.0
    lo = np.searchsorted(vacuoles[:, 1], y0 - reach)
    hi = np.searchsorted(vacuoles[:, 1], y0 + img.shape[0] * scale + reach)
    for x, y, rx, ry, angle in vacuoles[lo:hi].tolist():
        center = (round(x * f), round((y - y0) * f))
        axes = (round(rx * f), round(ry * f))
        cv2.ellipse(img, center, axes, angle, 0, 360, 1, -1, cv2.LINE_8, SHIFT)


def _nuclei(
    rng: np.random.Generator,
    width: int,
    height: int,
    um: float,
    fine_tumor: np.ndarray,
    usable: np.ndarray,
    zones: dict[str, np.ndarray],
) -> np.ndarray:
    """All nuclei of the slide, (N, 12) with columns COL_X.._P3, sorted by y (level-0 px)."""
    parts = []

    def scatter(density: np.ndarray, per_um2: float) -> tuple[np.ndarray, np.ndarray]:
        """Poisson points with intensity ``per_um2 * density`` (density 0..1 at FINE)."""
        n = rng.poisson(per_um2 * width * height / um**2)
        xs = rng.uniform(0, width, n)
        ys = rng.uniform(0, height, n)
        d = density[(ys // FINE).astype(int), (xs // FINE).astype(int)]
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
        table[:, COL_X], table[:, COL_Y] = xs, ys
        table[:, COL_RX] = radius_um(n) * um
        table[:, COL_RY] = table[:, COL_RX] * rng.uniform(aspect[0], aspect[1], n)
        table[:, COL_ANGLE] = rng.uniform(0, np.pi, n)
        table[:, COL_KIND] = kind
        table[:, COL_FILL] = rng.uniform(fill[0], fill[1], n)
        table[:, COL_RIM] = rng.uniform(rim[0], rim[1], n)
        table[:, COL_A2] = rng.uniform(0, irregular, n)
        table[:, COL_A3] = rng.uniform(0, irregular * 0.8, n)
        table[:, COL_P2:] = rng.uniform(0, 2 * np.pi, (n, 2))
        parts.append(table)

    def normal_r(mean: float, sd: float) -> Callable[[int], np.ndarray]:
        return lambda n: np.clip(rng.normal(mean, sd, n), 0.5 * mean, 2 * mean)

    normal = usable * ~fine_tumor
    centre, sinus, capsule, fat = (zones[k] for k in ("centre", "sinus", "capsule", "fat"))
    # lymphocytes: small, round, dark, densely packed; fewer in sinuses, capsule, germinal centres
    dens = normal * zones["cellularity"] * (1 - 0.75 * sinus) * (1 - 0.85 * capsule)
    dens *= (1 - 0.6 * centre) * (1 - 0.9 * fat)
    xs, ys = scatter(dens, 0.045)
    add(xs, ys, LYMPHOCYTE, normal_r(2.6, 0.3), (0.8, 1.0), (0.95, 1.35), (0.0, 0.0), 0.05)
    # germinal-centre cells: larger, paler, vesicular (a confounder for metastases)
    xs, ys = scatter(normal * centre * 0.8, 0.009)
    add(xs, ys, CENTROBLAST, normal_r(3.6, 0.5), (0.7, 1.0), (0.55, 0.85), (0.8, 1.1), 0.08)
    # sinus histiocytes: sparse, large, pale, oval, in pink cytoplasm (a confounder)
    xs, ys = scatter(normal * sinus * 0.7, 0.004)
    add(xs, ys, HISTIOCYTE, normal_r(4.0, 0.6), (0.5, 0.8), (0.4, 0.6), (0.7, 1.0), 0.12)
    # stromal / endothelial spindles, mostly in the capsule, septa and between fat cells
    xs, ys = scatter(normal * (0.15 + 0.85 * np.maximum(capsule, fat)) * 0.5, 0.0012)
    add(xs, ys, SPINDLE, normal_r(4.5, 0.8), (0.22, 0.35), (0.9, 1.2), (0.0, 0.0), 0.03)
    # metastatic carcinoma: crowded, large, pleomorphic (log-normal sizes, irregular), vesicular
    xs, ys = scatter(fine_tumor * usable * np.clip(zones["nest"], 0.5, 1.0), 0.024)
    tumor_r = lambda n: np.exp(rng.normal(math.log(5.0), 0.22, n))  # noqa: E731
    add(xs, ys, TUMOR, tumor_r, (0.55, 1.0), (0.3, 0.5), (0.75, 1.0), 0.14)

    nuclei = np.concatenate(parts)
    nuclei = nuclei[rng.permutation(len(nuclei))]  # random stacking order of overlaps ...
    return nuclei[
        np.argsort(nuclei[:, COL_Y], kind="stable")
    ]  # ... then by row for strip rendering


def nucleus_polygons(nuclei: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """(N, VERTICES, 2) int32 outlines in level-0 px * 2**SHIFT (irregular ellipses)."""
    theta = np.linspace(0, 2 * np.pi, VERTICES, endpoint=False)[None, :]
    r = (
        1
        + nuclei[:, COL_A2, None] * np.cos(2 * theta + nuclei[:, COL_P2, None])
        + nuclei[:, COL_A3, None] * np.cos(3 * theta + nuclei[:, COL_P3, None])
    ) * scale
    px = r * nuclei[:, COL_RX, None] * np.cos(theta)
    py = r * nuclei[:, COL_RY, None] * np.sin(theta)
    c, s = np.cos(nuclei[:, COL_ANGLE, None]), np.sin(nuclei[:, COL_ANGLE, None])
    x = nuclei[:, COL_X, None] + px * c - py * s
    y = nuclei[:, COL_Y, None] + px * s + py * c
    return np.round(np.stack([x, y], axis=2) * (1 << SHIFT)).astype(np.int32)


def make_layout(
    rng: np.random.Generator, width: int, height: int, mpp: float, tumor: bool
) -> Layout:
    um = 1.0 / mpp
    gw, gh = -(-width // GRID), -(-height // GRID)
    fw, fh = gw * (GRID // FINE), gh * (GRID // FINE)

    def to_fine(grid: np.ndarray) -> np.ndarray:
        return cv2.resize(grid.astype(np.float32), (fw, fh), interpolation=cv2.INTER_LINEAR)

    def zone(sigma_um: float, threshold: float) -> np.ndarray:
        """Soft patches (0..1 at FINE) of low-frequency noise above ``threshold`` sd."""
        n = smooth_noise(rng, (gh, gw), max(0.8, sigma_um * um / GRID))
        return to_fine(np.clip((n - threshold) / 0.5, 0, 1))

    tissue_field = _tissue_field(rng, gw, gh)
    lesions, islands = _place_lesions(rng, tissue_field > 0.5, um) if tumor else ([], [])
    if tumor and not lesions:
        raise ConfigError(
            f"synthetic slide {width}x{height}: no room for a lesion; use a larger width/height"
        )
    fine_tumor = Annotations(tumor=lesions, exclusion=islands).mask(
        0, 0, fw * FINE, fh * FINE, FINE
    )
    fine_tissue = to_fine(tissue_field) > 0.5
    fine_outline = fill_polygons((fh, fw), lesions, FINE).astype(bool)  # lesions with their islands

    # follicles: round dense lymphoid nodules; germinal centres are their paler cores
    follicle: np.ndarray = np.zeros((fh, fw), np.float32)
    centre: np.ndarray = np.zeros((fh, fw), np.float32)
    ys, xs = np.nonzero(fine_tissue & ~fine_outline)
    n_follicles = rng.poisson(len(xs) * FINE**2 / (600 * um) ** 2 * 1.5)
    for _ in range(min(n_follicles, 40) if len(xs) else 0):
        k = int(rng.integers(len(xs)))
        r = rng.uniform(90, 200) * um / FINE
        box = ((float(xs[k]), float(ys[k])), (2 * r, 2 * r * rng.uniform(0.7, 1.0)))
        angle = rng.uniform(0, 180)
        cv2.ellipse(follicle, (*box, angle), 1.0, -1)
        if rng.uniform() < 0.7:
            cv2.ellipse(centre, (box[0], (0.6 * box[1][0], 0.6 * box[1][1]), angle), 1.0, -1)
    follicle = cv2.GaussianBlur(follicle, (0, 0), 8 * um / FINE)
    centre = cv2.GaussianBlur(centre, (0, 0), 8 * um / FINE)
    sinus = zone(60, 0.9) * (1 - follicle)
    edge = np.clip((tissue_field - 0.5) / 0.07, 0, 1)  # 0 at the tissue edge, 1 inside
    capsule = to_fine(1 - edge) * fine_tissue
    cellularity = 0.8 + 0.2 * to_fine(smooth_noise(rng, (gh, gw), max(0.8, 150 * um / GRID)))
    cellularity = np.clip(cellularity + 0.3 * follicle, 0.3, 1.0)
    # fat: patches and the periphery (hilum, around the capsule); never inside a lesion
    fat = np.maximum(zone(200, rng.uniform(0.5, 1.6)), capsule * zone(80, rng.uniform(0.0, 1.0)))
    fat *= fine_tissue * ~fine_outline
    nest = 0.6 + 0.4 * to_fine(smooth_noise(rng, (gh, gw), max(0.6, 20 * um / GRID)))
    vacuoles = _fat_vacuoles(rng, fat, um)
    scattered = fine_tissue & ~fine_outline & (rng.uniform(size=(fh, fw)) < 2e-4)
    if scattered.any():  # a few lone fat cells / small vessels anywhere in the node
        sy, sx = np.nonzero(scattered)
        lone_r = rng.uniform(10, 25, len(sx)) * um
        aspect = rng.uniform(0.6, 1, len(sx))
        lone = np.stack(
            [sx * FINE + 4.0, sy * FINE + 4.0, lone_r, lone_r * aspect, 0 * lone_r], axis=1
        )
        vacuoles = np.concatenate([vacuoles, lone])
        vacuoles = vacuoles[np.argsort(vacuoles[:, 1], kind="stable")]
    if lesions and len(vacuoles):  # no fat cell reaches into a lesion
        clearance = cv2.distanceTransform((~fine_outline).view(np.uint8), cv2.DIST_L2, 5) * FINE
        cy = np.clip((vacuoles[:, 1] // FINE).astype(int), 0, fh - 1)
        cx = np.clip((vacuoles[:, 0] // FINE).astype(int), 0, fw - 1)
        vacuoles = vacuoles[clearance[cy, cx] > vacuoles[:, 2] + 2 * FINE]
    holes = np.zeros((fh, fw), np.uint8)
    draw_vacuoles(holes, vacuoles, 0, scale=FINE)
    zones = {"centre": centre, "sinus": sinus, "capsule": capsule, "fat": fat}
    zones |= {"cellularity": cellularity, "nest": nest}
    usable = (fine_tissue & (holes == 0)).astype(np.float32)
    nuclei = _nuclei(rng, width, height, um, fine_tumor, usable, zones)

    # eosin amount: patchy; sinuses (histiocyte cytoplasm) and capsule (collagen) are pinker
    eosin = 1.0 + 0.18 * smooth_noise(rng, (gh, gw), max(0.8, 40 * um / GRID))
    sinus_grid = cv2.resize(sinus, (gw, gh), interpolation=cv2.INTER_AREA)
    eosin *= 1 + 0.35 * sinus_grid + 0.6 * (1 - edge)
    blend = np.clip(0.5 + 0.5 * smooth_noise(rng, (gh, gw), max(0.8, 80 * um / GRID)), 0, 1)
    return Layout(
        width=width,
        height=height,
        um=um,
        fields=np.dstack([tissue_field, blend, eosin]).astype(np.float32),
        fibre_angles=(float(rng.uniform(0, np.pi)), float(rng.uniform(0, np.pi))),
        tumor=lesions,
        exclusion=islands,
        vacuoles=vacuoles,
        nuclei=nuclei,
        fine_tumor=fine_tumor[: -(-height // FINE), : -(-width // FINE)],
        fine_tissue=fine_tissue[: -(-height // FINE), : -(-width // FINE)],
    )
