"""CAMELYON16 lesions: the evaluation mask, isolated tumor cells, detections and their hits.

As the challenge's official evaluation code (Evaluation_FROC.py), on maps at one resolution:

- Evaluation mask: the reference tumor mask grown by the 75 µm margin (as the official code: pixels
  whose distance to tumor is below ``75 µm / 2``), holes filled, connected lesions labeled with
  8-connectivity.
- Isolated tumor cells (ITC): lesions whose major axis is below 275 µm; a detection on them is
  neither a hit nor a false positive, and they are not counted as lesions to find.
- Detections: local maxima of the probability map above a threshold, with greedy non-maximum
  suppression within a radius; each detection is (probability, x, y) in level-0 px.
- Scoring a slide: a detection inside a lesion is a hit (a lesion keeps its best hit), one outside
  every lesion a false positive (:class:`~lymphnode.evaluation.froc.SlideFroc`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from lymphnode.evaluation.froc import SlideFroc


@dataclass(frozen=True)
class Detection:
    """One lesion detection: its probability and its position in level-0 px."""

    probability: float
    x: float
    y: float


def evaluation_mask(tumor: np.ndarray, pixel_um: float, margin_um: float = 75.0) -> np.ndarray:
    """Labeled lesions (int32 (H, W), 0 = background) from a boolean tumor mask.

    ``pixel_um`` is the mask's µm per pixel (level-0 mpp × downsample). As the official code, a pixel
    belongs to a lesion when its Euclidean distance to a tumor pixel is below ``margin_um / 2``.
    """
    tumor = np.asarray(tumor, dtype=bool)
    if not tumor.any():
        return np.zeros(tumor.shape, dtype=np.int32)
    distance = ndimage.distance_transform_edt(~tumor)  # px to the nearest tumor pixel
    grown = distance < margin_um / (pixel_um * 2.0)
    filled = ndimage.binary_fill_holes(grown)
    labels, _ = ndimage.label(filled, structure=np.ones((3, 3), dtype=bool))
    return labels.astype(np.int32)


def isolated_tumor_cells(labels: np.ndarray, pixel_um: float, itc_um: float = 275.0) -> set[int]:
    """Labels of lesions whose major axis (of the equivalent ellipse) is below ``itc_um``."""
    from skimage.measure import regionprops

    threshold_px = itc_um / pixel_um
    return {int(p.label) for p in regionprops(labels) if p.axis_major_length < threshold_px}


def detect_lesions(
    probabilities: np.ndarray,
    downsample: float,
    *,
    threshold: float = 0.5,
    radius_px: float = 3.0,
) -> list[Detection]:
    """Local maxima of a probability map with greedy non-maximum suppression.

    Args:
        probabilities: (H, W) float in [0, 1] at ``downsample`` level-0 px per pixel.
        downsample: level-0 px per map pixel; detections are reported at pixel centres in level-0 px.
        threshold: maxima below it are not detections.
        radius_px: suppression radius in map pixels: a maximum within it of a stronger accepted
            detection is dropped; also the neighbourhood used to find local maxima.

    Returns:
        Detections sorted by decreasing probability.
    """
    probs = np.asarray(probabilities, dtype=np.float32)
    size = max(1, int(2 * np.ceil(radius_px) + 1))
    peaks = (probs == ndimage.maximum_filter(probs, size=size, mode="constant")) & (
        probs >= threshold
    )
    rows, cols = np.nonzero(peaks)
    if rows.size == 0:
        return []
    order = np.argsort(-probs[rows, cols], kind="stable")
    rows, cols = rows[order], cols[order]
    # Greedy NMS, strongest first: an accepted maximum suppresses every weaker one within
    # radius_px (distance ≤ radius). A k-d tree, queried only around accepted maxima, keeps time
    # and memory near O(n log n): a plateau of equal probabilities (tumor at p = 1) makes every
    # one of its pixels a local maximum.
    points = np.stack([rows, cols], axis=1).astype(np.float64)  # (N, 2) row, col
    tree = cKDTree(points)
    suppressed = np.zeros(rows.size, dtype=bool)
    kept: list[tuple[int, int]] = []
    for i in range(rows.size):
        if suppressed[i]:
            continue
        kept.append((int(rows[i]), int(cols[i])))
        suppressed[tree.query_ball_point(points[i], r=radius_px)] = True
    return [
        Detection(
            probability=float(probs[r, c]),
            x=(c + 0.5) * downsample,
            y=(r + 0.5) * downsample,
        )
        for r, c in kept
    ]


def score_slide(
    detections: Sequence[Detection],
    labels: np.ndarray | None,
    itc: set[int],
    downsample: float,
) -> SlideFroc:
    """Split a slide's detections into false positives and per-lesion hits.

    Args:
        detections: level-0 positions and probabilities.
        labels: the slide's evaluation mask at ``downsample`` (None or all-zero for a normal slide).
        itc: labels of isolated-tumor-cell lesions (ignored: neither hit nor FP).
        downsample: level-0 px per ``labels`` pixel.
    """
    result = SlideFroc(n_itc=len(itc))
    if labels is None or not labels.any():
        result.fp_probs = [d.probability for d in detections]
        return result
    n_labels = int(labels.max())
    best = np.zeros(n_labels + 1, dtype=np.float64)
    h, w = labels.shape
    for d in detections:
        r = min(max(int(d.y // downsample), 0), h - 1)
        c = min(max(int(d.x // downsample), 0), w - 1)
        hit = int(labels[r, c])
        if hit == 0:
            result.fp_probs.append(d.probability)
        elif hit not in itc:
            best[hit] = max(best[hit], d.probability)
    result.lesion_probs = [float(best[i]) for i in range(1, n_labels + 1) if i not in itc]
    return result
