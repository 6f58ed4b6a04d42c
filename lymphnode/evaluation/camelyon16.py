"""The CAMELYON16 evaluation of a folder of whole-slide heatmaps (what ``lymphnode.evaluate`` runs).

Scores heatmaps (from ``lymphnode.infer``) against ASAP XML lesion outlines: FROC and the
sensitivity at 0.25–8 FPs per slide (:mod:`~lymphnode.evaluation.lesions`,
:mod:`~lymphnode.evaluation.froc`), slide AUC from each slide's maximum probability
(:mod:`~lymphnode.evaluation.slides`), and pixel precision/recall/F1 at map resolution (tumor minus
exclusion regions, summed over slides; :mod:`~lymphnode.evaluation.pixels`). Writes
``evaluation.json``, ``froc.png``, ``roc.png`` and ``detections/<slide>.csv`` (probability, x, y in
level-0 px — the CAMELYON16 submission format) into ``out_dir``. Which slides are tumor:
:mod:`~lymphnode.evaluation.truth`.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lymphnode.core import atomic
from lymphnode.core.errors import ConfigError, EvaluationError
from lymphnode.evaluation.froc import FP_RATES, FrocResult, SlideFroc, froc
from lymphnode.evaluation.lesions import (
    Detection,
    detect_lesions,
    evaluation_mask,
    isolated_tumor_cells,
    score_slide,
)
from lymphnode.evaluation.pixels import PixelCounts
from lymphnode.evaluation.slides import roc_auc, roc_curve
from lymphnode.evaluation.truth import read_reference, slide_truth, tumor_mask
from lymphnode.inference.heatmap import HEATMAP_SUFFIX, read_heatmap
from lymphnode.wsi.annotations import read_downsample

log = logging.getLogger(__name__)


@dataclass
class EvaluationSettings:
    """Protocol parameters (defaults: CAMELYON16).

    threshold: probability at or above which a pixel is tumor (pixel metrics only).
    detection_threshold: local maxima at or above it are lesion detections. The FROC sweeps every
        detection's probability, so this is only the floor of the curve: kept low (0.1) so that the
        curve reaches below the pixel threshold and out to the higher FP rates; it must be > 0, as a
        zero floor would make every pixel of a flat background a detection.
    nms_radius_um: non-maximum-suppression radius in µm.
    margin_um: lesion margin of the evaluation mask (75 µm, applied as the official code).
    itc_um: lesions with a shorter major axis are isolated tumor cells (275 µm).
    mpp: µm per level-0 px for heatmaps whose slide had none (None: required from the heatmap).
    annotations_downsample: the XML's px per level-0 px of the slide file the heatmap was made
        from; coordinates are divided by it (32: CAMELYON16 level-0 XML on a level-5 page).
    """

    threshold: float = 0.5
    detection_threshold: float = 0.1
    nms_radius_um: float = 200.0
    margin_um: float = 75.0
    itc_um: float = 275.0
    mpp: float | None = None
    fp_rates: tuple[float, ...] = FP_RATES
    annotations_downsample: float = 1.0

    def __post_init__(self) -> None:
        self.annotations_downsample = read_downsample(self.annotations_downsample)
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"threshold={self.threshold} must be a probability in [0, 1]")
        if not 0.0 < self.detection_threshold <= 1.0:
            raise ConfigError(
                f"detection_threshold={self.detection_threshold} must be in (0, 1] (a probability "
                "above 0: at 0 every background pixel is a local maximum)"
            )
        rates = self.fp_rates
        if (
            isinstance(rates, str)
            or not rates
            or not all(
                isinstance(r, int | float)
                and not isinstance(r, bool)
                and math.isfinite(r)
                and r > 0
                for r in rates
            )
        ):
            raise ConfigError(
                f"fp_rates={list(rates) if not isinstance(rates, str) else rates!r} must be a "
                "non-empty list of positive false positives per slide (CAMELYON16: [0.25, 0.5, "
                "1, 2, 4, 8]); the FROC score is the mean sensitivity at them"
            )


def find_heatmaps(heatmaps: str | Path) -> list[Path]:
    """``heatmaps`` itself when it is a file, else every ``*.heatmap.tif`` in the folder."""
    root = Path(heatmaps)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise EvaluationError(
            f"heatmaps={root} does not exist (expected a folder of *{HEATMAP_SUFFIX} or one file)"
        )
    found = sorted(root.glob(f"*{HEATMAP_SUFFIX}"))
    if not found:
        raise EvaluationError(f"no *{HEATMAP_SUFFIX} files in heatmaps={root}")
    return found


def evaluate(
    heatmaps: str | Path,
    annotations: str | Path,
    out_dir: str | Path,
    *,
    reference: str | Path | None = None,
    settings: EvaluationSettings | None = None,
) -> dict:
    """Score every heatmap in ``heatmaps``; writes the outputs into ``out_dir`` and returns the dict
    saved as ``evaluation.json``."""
    settings = settings or EvaluationSettings()
    annotations_dir = Path(annotations)
    if not annotations_dir.is_dir():
        raise EvaluationError(f"annotations={annotations_dir} is not a folder of ASAP XML files")
    ref = read_reference(reference) if reference else None
    paths = find_heatmaps(heatmaps)

    per_slide: list[dict] = []
    froc_data: list[SlideFroc] = []
    detections: dict[str, list[Detection]] = {}
    pixels = PixelCounts()
    for path in paths:
        heatmap = read_heatmap(path)
        stem = path.name[: -len(HEATMAP_SUFFIX)]
        if heatmap.slide != stem:
            raise EvaluationError(
                f"{path} holds the heatmap of slide {heatmap.slide!r}, not {stem!r}; "
                "file and slide names must match"
            )
        mpp = heatmap.mpp if heatmap.mpp is not None else settings.mpp
        if mpp is None:
            raise EvaluationError(
                f"heatmap {path} has no µm/px (its slide had none); pass slide_mpp=<level-0 µm/px>"
            )
        pixel_um = mpp * heatmap.downsample
        xml = slide_truth(heatmap.slide, annotations_dir, ref)
        tumor = tumor_mask(heatmap, xml, settings.annotations_downsample)
        labels = evaluation_mask(tumor, pixel_um, settings.margin_um)
        itc = isolated_tumor_cells(labels, pixel_um, settings.itc_um)
        dets = detect_lesions(
            heatmap.probabilities,
            heatmap.downsample,
            threshold=settings.detection_threshold,
            radius_px=settings.nms_radius_um / pixel_um,
        )
        detections[heatmap.slide] = dets
        scored = score_slide(dets, labels, itc, heatmap.downsample)
        froc_data.append(scored)
        counts = PixelCounts.of(heatmap.probabilities, tumor, settings.threshold)
        pixels = pixels + counts
        per_slide.append(
            {
                "slide": heatmap.slide,
                "tumor": xml is not None,
                "score": float(heatmap.probabilities.max()),
                "detections": len(dets),
                "false_positives": len(scored.fp_probs),
                "lesions": len(scored.lesion_probs),
                "isolated_tumor_cells": len(itc),
                "lesions_hit": int(sum(p > 0 for p in scored.lesion_probs)),
                "pixel_tp": counts.tp,
                "pixel_fp": counts.fp,
                "pixel_fn": counts.fn,
                # what made the heatmap (None: a heatmap written before infer recorded it)
                "checkpoint": (heatmap.source or {}).get("checkpoint"),
                "checkpoint_sha256": (heatmap.source or {}).get("checkpoint_sha256"),
            }
        )
        log.info(
            "%s: %s, max p %.3f, %d detections, %d/%d lesions hit",
            heatmap.slide,
            "tumor" if xml else "normal",
            per_slide[-1]["score"],
            len(dets),
            per_slide[-1]["lesions_hit"],
            len(scored.lesion_probs),
        )

    checkpoints = _checkpoints_of(per_slide)
    result = froc(froc_data, settings.fp_rates)
    scores = [s["score"] for s in per_slide]
    truth = [int(s["tumor"]) for s in per_slide]
    summary = {
        "froc": _finite_or_none(result.froc),
        "sensitivity_at_fp": {
            f"{k:g}": _finite_or_none(v) for k, v in result.sensitivities.items()
        },
        "slide_auc": _finite_or_none(roc_auc(scores, truth)),
        "pixel_precision": pixels.precision,
        "pixel_recall": pixels.recall,
        "pixel_f1": pixels.f1,
        "n_slides": len(per_slide),
        "n_tumor_slides": int(sum(truth)),
        "n_lesions": result.n_lesions,
        "checkpoints": checkpoints,
        "settings": {
            "threshold": settings.threshold,
            "detection_threshold": settings.detection_threshold,
            "nms_radius_um": settings.nms_radius_um,
            "margin_um": settings.margin_um,
            "itc_um": settings.itc_um,
            "fp_rates": list(settings.fp_rates),
            "annotations_downsample": settings.annotations_downsample,
        },
        "slides": per_slide,
    }
    _write_outputs(Path(out_dir), summary, detections, result, scores, truth)
    return summary


def _checkpoints_of(per_slide: list[dict]) -> list[dict]:
    """The checkpoints that made the heatmaps (``{checkpoint, checkpoint_sha256, slides}``, one
    per SHA-256; unrecorded ones under None), with a warning when there are several: the figures
    then mix models."""
    found: dict[str | None, dict] = {}
    for entry in per_slide:
        sha = entry["checkpoint_sha256"]
        record = found.setdefault(
            sha, {"checkpoint": entry["checkpoint"], "checkpoint_sha256": sha, "slides": []}
        )
        record["slides"].append(entry["slide"])
    out = list(found.values())
    if len(out) > 1:
        log.warning(
            "the heatmaps were made by %d different checkpoints (or record none): %s; the "
            "figures mix them",
            len(out),
            "; ".join(
                f"{r['checkpoint'] or 'unrecorded'} (sha256 {str(r['checkpoint_sha256'])[:12]}): "
                f"{', '.join(r['slides'])}"
                for r in out
            ),
        )
    return out


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _write_outputs(
    out: Path,
    summary: dict,
    detections: dict[str, list[Detection]],
    result: FrocResult,
    scores: Sequence[float],
    truth: Sequence[int],
) -> None:
    """Write every output into a temp beside its target first (core.atomic), then move them all in
    place: a failure leaves the previous outputs untouched."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        tmp = {
            name: stack.enter_context(atomic.atomic_path(out / name))
            for name in ("detections", "froc.png", "roc.png", "evaluation.json")
        }
        tmp["detections"].mkdir()
        for slide, dets in detections.items():
            with (tmp["detections"] / f"{slide}.csv").open("w", newline="") as fh:
                writer = csv.writer(fh)
                writer.writerow(["probability", "x", "y"])
                for d in dets:
                    writer.writerow([f"{d.probability:.6f}", f"{d.x:.1f}", f"{d.y:.1f}"])
        fig, ax = plt.subplots(figsize=(5, 4))
        if result.fps_per_slide.size:
            ax.plot(result.fps_per_slide, result.sensitivity, drawstyle="steps-post")
            for rate, sens in result.sensitivities.items():
                ax.plot([rate], [sens], "o", color="tab:red")
        ax.set_xscale("symlog", linthresh=0.25)
        ax.set_xlim(0, max(8.0, float(result.fps_per_slide.max(initial=0))))
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("average false positives per slide")
        ax.set_ylabel("lesion sensitivity")
        froc_value = summary["froc"]
        ax.set_title(f"FROC = {froc_value:.3f}" if froc_value is not None else "FROC (no lesions)")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(tmp["froc.png"], dpi=110, format="png")
        plt.close(fig)
        fig, ax = plt.subplots(figsize=(4, 4))
        fpr, tpr = roc_curve(scores, truth)
        ax.plot(fpr, tpr, drawstyle="steps-post")
        ax.plot([0, 1], [0, 1], linestyle=":", color="gray")
        auc = summary["slide_auc"]
        ax.set_title(f"slide AUC = {auc:.3f}" if auc is not None else "slide AUC (one class)")
        ax.set_xlabel("false-positive rate")
        ax.set_ylabel("true-positive rate")
        fig.tight_layout()
        fig.savefig(tmp["roc.png"], dpi=110, format="png")
        plt.close(fig)
        tmp["evaluation.json"].write_text(json.dumps(summary, indent=2))
        if (out / "detections").is_dir():  # a folder is replaced only once the old one is gone
            shutil.rmtree(out / "detections")
