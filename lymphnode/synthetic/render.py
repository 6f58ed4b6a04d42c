"""Rendering a synthetic slide's layout to RGB: stain concentrations to optical density
(Beer–Lambert) to RGB, in horizontal strips, then scanner blur."""

from __future__ import annotations

import cv2
import numpy as np

from lymphnode.synthetic.fields import (
    GRID,
    SHIFT,
    Texture,
    oriented,
    periodic_noise,
    upsample,
)
from lymphnode.synthetic.layout import (
    CENTROBLAST,
    COL_ANGLE,
    COL_FILL,
    COL_KIND,
    COL_P2,
    COL_RIM,
    COL_RX,
    COL_RY,
    COL_X,
    COL_Y,
    HISTIOCYTE,
    TUMOR,
    Layout,
    draw_vacuoles,
    nucleus_polygons,
)
from lymphnode.synthetic.style import SlideStyle
from lymphnode.wsi.annotations import Annotations

_STRIP = 128  # rows rendered at a time (a multiple of GRID; small strips stay in cache)

__all__ = ["render"]


def render(rng: np.random.Generator, layout: Layout, style: SlideStyle) -> np.ndarray:
    """The level-0 RGB image (H, W, 3) uint8, rendered in strips of _STRIP rows."""
    w, h, um = layout.width, layout.height, layout.um
    rgb = np.empty((h, w, 3), np.uint8)
    fibre_tile = periodic_noise(rng, 512, 1.0) / 3
    grain = Texture(periodic_noise(rng, 1024, 0.45 * um), rng)  # chromatin granules
    cyto = Texture(periodic_noise(rng, 1024, 1.5 * um), rng)  # tumour cytoplasm
    sensor = Texture(rng.standard_normal((1024, 1024), dtype=np.float32), rng)
    annotations = Annotations(tumor=layout.tumor, exclusion=layout.exclusion)
    minus_h = [-float(v) for v in style.stain_h]
    minus_e = [-float(v) for v in style.stain_e]
    minus_bg = [-float(v) for v in style.background_od]
    f = 1 << SHIFT

    nuclei = layout.nuclei
    kinds = nuclei[:, COL_KIND]
    polygons = nucleus_polygons(nuclei)  # (N, V, 2), level-0 px * f
    reach = float(np.abs(polygons[..., 1] - polygons[..., 1].mean(1, keepdims=True)).max()) / f
    reach = reach + 2 if len(nuclei) else 0.0
    ny = nuclei[:, COL_Y]
    fills = nuclei[:, COL_FILL].tolist()
    rim_levels = np.round(nuclei[:, COL_RIM] * 10) / 10  # rims drawn in batches of equal value
    rim_width = max(1, round(0.45 * um))
    # nucleoli: tumour (large) and germinal-centre (small) cells, off-centre
    has_nucleolus = np.flatnonzero(np.isin(kinds, (TUMOR, CENTROBLAST)))
    sub = nuclei[has_nucleolus]
    off = 0.3 * np.minimum(sub[:, COL_RX], sub[:, COL_RY]) * np.sign(sub[:, COL_P2] - np.pi)
    nucleoli_y = sub[:, COL_Y]
    nucleoli = np.stack(
        [
            np.round((sub[:, COL_X] + off * np.cos(sub[:, COL_ANGLE])) * f),
            np.round((sub[:, COL_Y] + off * np.sin(sub[:, COL_ANGLE])) * f),
            np.maximum(1, np.round(np.where(sub[:, COL_KIND] == TUMOR, 0.75, 0.45) * um * f)),
        ],
        axis=1,
    ).astype(int)
    nucleoli_value = (1.2 * sub[:, COL_RIM]).tolist()
    # histiocytes: a halo of pink cytoplasm
    histiocytes = np.flatnonzero(kinds == HISTIOCYTE)
    halos = nucleus_polygons(nuclei[histiocytes], scale=2.7)
    halo_y = ny[histiocytes]
    halo_reach = 3 * reach

    a1, a2 = layout.fibre_angles
    half = GRID // 2
    for y0 in range(0, h, _STRIP):
        sh = min(_STRIP, h - y0)
        hh, hw = -(-sh // 2), -(-w // 2)
        # smooth fields at half resolution: tissue, fibre orientation blend, eosin amount
        fields = upsample(layout.fields, half, y0 // 2, hw, hh)
        f1 = oriented(fibre_tile, a1, 6 * um, 0.6 * um, y0 // 2, hw, hh)
        f2 = oriented(fibre_tile, a2, 6 * um, 0.6 * um, y0 // 2, hw, hh)
        fibres = f2 + (f1 - f2) * fields[..., 1]
        eosin_half = fields[..., 2] * (0.22 + 0.14 * fibres)
        full = cv2.resize(np.dstack([fields[..., 0], eosin_half]), (2 * hw, 2 * hh))
        tissue = (full[:sh, :w, 0] > 0.5).astype(np.uint8)
        eosin = np.ascontiguousarray(full[:sh, :w, 1])
        holes = np.zeros((sh, w), np.uint8)
        draw_vacuoles(holes, layout.vacuoles, y0)
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
            cv2.fillConvexPoly(eosin, poly, 0.4, cv2.LINE_8, SHIFT)
        lo, hi = np.searchsorted(ny, (y0 - reach, y0 + sh + reach))
        pts = polygons[lo:hi] - shift
        for poly, value in zip(pts, fills[lo:hi]):
            cv2.fillConvexPoly(hema, poly, value, cv2.LINE_8, SHIFT)
        levels = rim_levels[lo:hi]
        for value in np.unique(levels[levels > 0.3]).tolist():  # vesicular: chromatin at the rim
            cv2.polylines(
                hema, list(pts[levels == value]), True, value, rim_width, cv2.LINE_8, SHIFT
            )
        lo, hi = np.searchsorted(nucleoli_y, (y0 - reach, y0 + sh + reach))
        for (x, y, r), value in zip(nucleoli[lo:hi].tolist(), nucleoli_value[lo:hi]):
            cv2.circle(hema, (x, y - y0 * f), r, value, -1, cv2.LINE_8, SHIFT)

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
