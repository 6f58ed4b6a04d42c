"""The CAMELYON16 lesion-detection (FROC) and slide-classification (AUC) protocol.

Follows the challenge's official evaluation code (Evaluation_FROC.py), on maps at one resolution:

- Evaluation mask: the reference tumor mask grown by the 75 µm margin (as the official code: pixels
  whose distance to tumor is below ``75 µm / 2``), holes filled, connected lesions labeled with
  8-connectivity.
- Isolated tumor cells (ITC): lesions whose major axis is below 275 µm; a detection on them is
  neither a hit nor a false positive, and they are not counted as lesions to find.
- Detections: local maxima of the probability map above a threshold, with greedy non-maximum
  suppression within a radius; each detection is (probability, x, y) in level-0 px.
- FROC: over all slides, sensitivity (lesions whose best detection ≥ t / all non-ITC lesions) against
  the average number of false positives per slide (detections ≥ t outside every lesion / slides). As
  the official ``computeFROC``, the thresholds t are the distinct probabilities of the false
  positives and of the per-lesion best hits (0 for a missed lesion or an ITC) **without the lowest
  one**, then the point (0 FPs, sensitivity 0) closes the curve. So when every lesion is hit and
  no FP is below the weakest hit, that hit's threshold is not on the curve (a "perfect" detector of
  two lesions scores 0.5, not 1): that is the challenge's definition, kept so that scores compare.
  The score is the mean sensitivity at 0.25, 0.5, 1, 2, 4 and 8 FPs per slide, read off the curve
  by linear interpolation (``np.interp`` on the curve from 0 FPs upwards).
- Slide AUC: ROC AUC of each slide's score (the maximum probability) against tumor/normal.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

#: False-positive rates (per slide) at which CAMELYON16 averages the sensitivity.
FP_RATES: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


@dataclass(frozen=True)
class Detection:
    """One lesion detection: its probability and its position in level-0 px."""

    probability: float
    x: float
    y: float


@dataclass
class SlideFroc:
    """What one slide contributes to the FROC: probabilities of its FPs and of its lesions' best hits.

    ``lesion_probs`` has one entry per non-ITC lesion: the highest probability of a detection that
    hit it, or 0.0 when none did. ``n_itc`` counts the slide's isolated-tumor-cell lesions: they are
    no target, but the official code keeps a 0.0 for each among the probabilities whose distinct
    values make the thresholds (so an ITC makes 0.0 the lowest value, the one that is dropped).
    """

    fp_probs: list[float] = field(default_factory=list)
    lesion_probs: list[float] = field(default_factory=list)
    n_itc: int = 0


@dataclass
class FrocResult:
    """The FROC score, the sensitivity at each FP rate, and the whole curve."""

    froc: float
    sensitivities: dict[float, float]
    fps_per_slide: np.ndarray  # (T,) FPs per slide, ascending (thresholds from high to low)
    sensitivity: np.ndarray  # (T,) lesion sensitivity at the same thresholds
    n_lesions: int
    n_slides: int


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
    kept: list[tuple[int, int]] = []
    r2 = radius_px * radius_px
    for r, c in zip(rows.tolist(), cols.tolist()):
        if all((r - kr) ** 2 + (c - kc) ** 2 > r2 for kr, kc in kept):
            kept.append((r, c))
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


def froc(slides: Sequence[SlideFroc], fp_rates: Sequence[float] = FP_RATES) -> FrocResult:
    """The FROC curve over ``slides`` and its score (mean sensitivity at ``fp_rates``)."""
    n_slides = len(slides)
    fp = np.asarray([p for s in slides for p in s.fp_probs], dtype=np.float64)
    tp = np.asarray([p for s in slides for p in s.lesion_probs], dtype=np.float64)
    n_lesions = int(tp.size)
    if n_slides == 0 or n_lesions == 0:
        nan = float("nan")
        return FrocResult(
            froc=nan,
            sensitivities={r: nan for r in fp_rates},
            fps_per_slide=np.zeros(0),
            sensitivity=np.zeros(0),
            n_lesions=n_lesions,
            n_slides=n_slides,
        )
    # The official computeFROC: sorted(set(FP_probs + TP_probs))[1:], where TP_probs holds one entry
    # per lesion label, ITCs included (as 0.0).
    itc_zeros = np.zeros(1 if any(s.n_itc for s in slides) else 0)
    thresholds = np.unique(np.concatenate([fp, tp, itc_zeros]))[1:]
    fp_sorted, tp_sorted = np.sort(fp), np.sort(tp)
    n_fp = fp.size - np.searchsorted(fp_sorted, thresholds, side="left")  # detections ≥ t
    n_tp = tp.size - np.searchsorted(tp_sorted, thresholds, side="left")
    # The curve runs from the lowest kept threshold (most FPs) to "no detection at all" (0, 0).
    fps = np.append(n_fp.astype(np.float64), 0.0) / n_slides
    sens = np.append(n_tp.astype(np.float64), 0.0) / n_lesions
    # np.interp needs increasing x: thresholds increase, so FPs decrease; reverse.
    x, y = fps[::-1], sens[::-1]
    at = {float(r): float(np.interp(r, x, y)) for r in fp_rates}
    return FrocResult(
        froc=float(np.mean(list(at.values()))),
        sensitivities=at,
        fps_per_slide=x,
        sensitivity=y,
        n_lesions=n_lesions,
        n_slides=n_slides,
    )


def roc_auc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Area under the ROC curve (ties count one half); NaN when only one class is present."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    pos, neg = s[y], s[~y]
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (pos.size * neg.size))


def roc_curve(scores: Sequence[float], labels: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates over every threshold, from (0, 0) to (1, 1)."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    thresholds = np.unique(s)[::-1]
    n_pos, n_neg = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    fpr = [0.0] + [float(((s >= t) & ~y).sum() / n_neg) for t in thresholds]
    tpr = [0.0] + [float(((s >= t) & y).sum() / n_pos) for t in thresholds]
    return np.asarray(fpr), np.asarray(tpr)
