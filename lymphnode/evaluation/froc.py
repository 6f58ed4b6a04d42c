"""The CAMELYON16 lesion-detection score: the FROC curve and its mean sensitivity.

Follows the challenge's official evaluation code (Evaluation_FROC.py, ``computeFROC``) on what each
slide contributes (:class:`SlideFroc`, from :func:`lymphnode.evaluation.lesions.score_slide`):

- FROC: over all slides, sensitivity (lesions whose best detection ≥ t / all non-ITC lesions) against
  the average number of false positives per slide (detections ≥ t outside every lesion / slides). As
  the official ``computeFROC``, the thresholds t are the distinct probabilities of the false
  positives and of the per-lesion best hits (0 for a missed lesion or an ITC) **without the lowest
  one**, then the point (0 FPs, sensitivity 0) closes the curve. So when every lesion is hit and
  no FP is below the weakest hit, that hit's threshold is not on the curve (a "perfect" detector of
  two lesions scores 0.5, not 1): that is the challenge's definition, kept so that scores compare.
  The score is the mean sensitivity at 0.25, 0.5, 1, 2, 4 and 8 FPs per slide, read off the curve
  by linear interpolation (``np.interp`` on the curve from 0 FPs upwards).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

#: False-positive rates (per slide) at which CAMELYON16 averages the sensitivity.
FP_RATES: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


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
