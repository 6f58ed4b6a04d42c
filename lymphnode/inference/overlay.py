"""Overlay thumbnails: the slide with its heatmap and annotation outlines, for a human to look at,
and the PNG file they are written to."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lymphnode.core import atomic
from lymphnode.inference.heatmap import Heatmap
from lymphnode.wsi.slide import Slide


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


def write_overlay(path: str | Path, rgb: np.ndarray) -> None:
    """Write an RGB (H, W, 3) uint8 overlay as a PNG at ``path``, atomically (core.atomic)."""
    import cv2

    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]))  # OpenCV is BGR
    if not ok:
        raise OSError(f"could not encode the overlay for {path} as PNG")
    atomic.write_bytes(path, encoded.tobytes())


__all__ = ["render_overlay", "write_overlay"]
