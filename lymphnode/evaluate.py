"""``python -m lymphnode.evaluate heatmaps=DIR annotations=DIR [reference=CSV] [out_dir=DIR]``

Scores whole-slide heatmaps (from ``lymphnode.infer``) against ASAP XML lesion outlines with the
CAMELYON16 protocol (:mod:`lymphnode.evaluation.froc`): FROC and the sensitivity at 0.25–8 FPs per slide, slide
AUC from each slide's maximum probability, and pixel precision/recall/F1 at map resolution (tumor
minus exclusion regions, threshold 0.5, summed over slides). Writes ``evaluation.json``,
``froc.png``, ``roc.png`` and ``detections/<slide>.csv`` (probability, x, y in level-0 px — the
CAMELYON16 submission format) into ``out_dir``.

Which slides are tumor: a slide with ``<slide>.xml`` in ``annotations`` is a tumor slide; a slide
without one must be known normal, either from ``reference`` (CAMELYON16's ``reference.csv``: name,
Tumor|Normal, ...) or from its name (``normal_*``). Anything else is an error, not a silent normal.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig

from lymphnode.core.boundary import config_dir, hydra_boundary
from lymphnode.core.errors import EvaluationError
from lymphnode.evaluation.froc import (
    FP_RATES,
    Detection,
    SlideFroc,
    detect_lesions,
    evaluation_mask,
    froc,
    isolated_tumor_cells,
    roc_auc,
    roc_curve,
    score_slide,
)
from lymphnode.inference.heatmap import HEATMAP_SUFFIX, Heatmap, read_heatmap
from lymphnode.wsi.annotations import read_asap

log = logging.getLogger(__name__)


@dataclass
class EvaluationSettings:
    """Protocol parameters (defaults: CAMELYON16).

    threshold: probability above which a pixel is tumor (pixel metrics) and a maximum is a detection.
    nms_radius_um: non-maximum-suppression radius in µm.
    margin_um: lesion margin of the evaluation mask (75 µm, applied as the official code).
    itc_um: lesions with a shorter major axis are isolated tumor cells (275 µm).
    mpp: µm per level-0 px for heatmaps whose slide had none (None: required from the heatmap).
    """

    threshold: float = 0.5
    nms_radius_um: float = 200.0
    margin_um: float = 75.0
    itc_um: float = 275.0
    mpp: float | None = None
    fp_rates: tuple[float, ...] = FP_RATES


def read_reference(path: str | Path) -> dict[str, bool]:
    """CAMELYON16 ``reference.csv`` (slide, Tumor|Normal, ...) → {slide: is_tumor}."""
    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f"reference file {path} does not exist")
    out: dict[str, bool] = {}
    with path.open(newline="") as fh:
        for lineno, row in enumerate(csv.reader(fh), start=1):
            if not row or row[0].strip().lower() in ("", "image", "slide", "name"):
                continue
            if len(row) < 2 or row[1].strip().lower() not in ("tumor", "normal"):
                raise EvaluationError(
                    f"{path}:{lineno}: expected 'slide,Tumor|Normal[,...]', got {','.join(row)!r}"
                )
            out[Path(row[0].strip()).stem] = row[1].strip().lower() == "tumor"
    return out


def _find_heatmaps(heatmaps: str | Path) -> list[Path]:
    root = Path(heatmaps)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise EvaluationError(
            f"heatmaps={root} does not exist (expected a folder of *{HEATMAP_SUFFIX})"
        )
    found = sorted(root.glob(f"*{HEATMAP_SUFFIX}"))
    if not found:
        raise EvaluationError(f"no *{HEATMAP_SUFFIX} files in heatmaps={root}")
    return found


def _slide_truth(
    slide: str, annotations_dir: Path, reference: dict[str, bool] | None
) -> Path | None:
    """The slide's XML, None for a known-normal slide; an error when neither can be established."""
    xml = annotations_dir / f"{slide}.xml"
    if xml.is_file():
        if reference is not None and slide in reference and not reference[slide]:
            raise EvaluationError(f"{xml} outlines tumor but the reference lists {slide} as Normal")
        return xml
    if reference is not None:
        if slide not in reference:
            raise EvaluationError(f"slide {slide} is neither in the reference nor has {xml}")
        if reference[slide]:
            raise EvaluationError(
                f"the reference lists {slide} as Tumor but its annotation {xml} does not exist"
            )
        return None
    if slide.lower().startswith("normal"):
        return None
    near = [p.name for p in annotations_dir.glob("*.xml") if p.stem.lower() == slide.lower()]
    hint = f" (did you mean {near[0]}? names must match exactly)" if near else ""
    raise EvaluationError(
        f"heatmap of slide {slide} has no annotation {xml}{hint}; a normal slide must be named "
        "normal_* or listed as Normal in reference=<reference.csv>"
    )


def _tumor_mask(heatmap: Heatmap, xml: Path | None) -> np.ndarray:
    shape = heatmap.probabilities.shape
    if xml is None:
        return np.zeros(shape, dtype=bool)
    annotations = read_asap(xml)
    w0, h0 = heatmap.level0_size
    mask = annotations.mask(0, 0, w0, h0, downsample=heatmap.downsample)
    if mask.shape != shape:
        raise EvaluationError(
            f"heatmap of {heatmap.slide} has shape {shape} but the slide size {w0}x{h0} at "
            f"downsample {heatmap.downsample:g} gives {mask.shape}; heatmap and slide do not match"
        )
    return mask


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
    paths = _find_heatmaps(heatmaps)

    per_slide: list[dict] = []
    froc_data: list[SlideFroc] = []
    detections: dict[str, list[Detection]] = {}
    tp = fp = fn = 0
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
                f"heatmap {path} has no µm/px (its slide had none); pass mpp=<level-0 µm/px>"
            )
        pixel_um = mpp * heatmap.downsample
        xml = _slide_truth(heatmap.slide, annotations_dir, ref)
        tumor = _tumor_mask(heatmap, xml)
        labels = evaluation_mask(tumor, pixel_um, settings.margin_um)
        itc = isolated_tumor_cells(labels, pixel_um, settings.itc_um)
        dets = detect_lesions(
            heatmap.probabilities,
            heatmap.downsample,
            threshold=settings.threshold,
            radius_px=settings.nms_radius_um / pixel_um,
        )
        detections[heatmap.slide] = dets
        scored = score_slide(dets, labels, itc, heatmap.downsample)
        froc_data.append(scored)
        predicted = heatmap.probabilities >= settings.threshold
        s_tp = int((predicted & tumor).sum())
        s_fp = int((predicted & ~tumor).sum())
        s_fn = int((~predicted & tumor).sum())
        tp, fp, fn = tp + s_tp, fp + s_fp, fn + s_fn
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
                "pixel_tp": s_tp,
                "pixel_fp": s_fp,
                "pixel_fn": s_fn,
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

    result = froc(froc_data, settings.fp_rates)
    scores = [s["score"] for s in per_slide]
    truth = [int(s["tumor"]) for s in per_slide]
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    summary = {
        "froc": _finite_or_none(result.froc),
        "sensitivity_at_fp": {
            f"{k:g}": _finite_or_none(v) for k, v in result.sensitivities.items()
        },
        "slide_auc": _finite_or_none(roc_auc(scores, truth)),
        "pixel_precision": precision,
        "pixel_recall": recall,
        "pixel_f1": f1,
        "n_slides": len(per_slide),
        "n_tumor_slides": int(sum(truth)),
        "n_lesions": result.n_lesions,
        "settings": {
            "threshold": settings.threshold,
            "nms_radius_um": settings.nms_radius_um,
            "margin_um": settings.margin_um,
            "itc_um": settings.itc_um,
            "fp_rates": list(settings.fp_rates),
        },
        "slides": per_slide,
    }
    _write_outputs(Path(out_dir), summary, detections, result, scores, truth)
    return summary


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _write_outputs(out: Path, summary: dict, detections: dict[str, list[Detection]],
                   result, scores: Sequence[float], truth: Sequence[int]) -> None:  # fmt: skip
    """Write everything into a temp folder beside ``out`` first, then move it in place."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".evaluation-"))
    try:
        (tmp / "detections").mkdir()
        for slide, dets in detections.items():
            with (tmp / "detections" / f"{slide}.csv").open("w", newline="") as fh:
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
        fig.savefig(tmp / "froc.png", dpi=110)
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
        fig.savefig(tmp / "roc.png", dpi=110)
        plt.close(fig)
        (tmp / "evaluation.json").write_text(json.dumps(summary, indent=2))
        for name in ("detections", "froc.png", "roc.png", "evaluation.json"):
            target = out / name
            if target.is_dir():
                import shutil

                shutil.rmtree(target)
            os.replace(tmp / name, target)
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="evaluate")
@hydra_boundary
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point: evaluate and print the headline figures, behind the error boundary of
    :mod:`lymphnode.core.boundary` (bad input: one ``error:`` line, exit 1)."""
    settings = EvaluationSettings(
        threshold=float(cfg.threshold),
        nms_radius_um=float(cfg.nms_radius_um),
        margin_um=float(cfg.margin_um),
        itc_um=float(cfg.itc_um),
        mpp=None if cfg.mpp is None else float(cfg.mpp),
        fp_rates=tuple(float(r) for r in cfg.fp_rates),
    )
    out_dir = cfg.out_dir or cfg.heatmaps
    summary = evaluate(
        cfg.heatmaps, cfg.annotations, out_dir, reference=cfg.reference, settings=settings
    )

    def fmt(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    print(
        f"FROC {fmt(summary['froc'])} | slide AUC {fmt(summary['slide_auc'])} | "
        f"pixel F1 {fmt(summary['pixel_f1'])} (P {fmt(summary['pixel_precision'])}, "
        f"R {fmt(summary['pixel_recall'])}) over {summary['n_slides']} slides -> "
        f"{Path(out_dir) / 'evaluation.json'}"
    )
    return summary["froc"]


if __name__ == "__main__":
    main()
