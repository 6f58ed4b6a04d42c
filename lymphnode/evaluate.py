"""``python -m lymphnode.evaluate heatmaps=DIR annotations=DIR [reference=CSV] [out_dir=DIR]``

Scores whole-slide heatmaps (from ``lymphnode.infer``) against ASAP XML lesion outlines with the
CAMELYON16 protocol: FROC and the sensitivity at 0.25–8 FPs per slide (detections: local maxima ≥
``detection_threshold``), slide AUC from each slide's maximum probability, and pixel
precision/recall/F1 at map resolution (tumor minus exclusion regions, pixels ≥ ``threshold``, summed
over slides). Writes ``evaluation.json``, ``froc.png``, ``roc.png`` and ``detections/<slide>.csv``
(probability, x, y in level-0 px — the CAMELYON16 submission format) into ``out_dir``. The logic
lives in :mod:`lymphnode.evaluation.camelyon16`; this module composes the config and maps errors.

Which slides are tumor: a slide with ``<slide>.xml`` in ``annotations`` is a tumor slide; a slide
without one must be known normal, either from ``reference`` (CAMELYON16's ``reference.csv``: name,
Tumor|Normal, ...) or from its name (``normal_*``). Anything else is an error, not a silent normal.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

from lymphnode.core.boundary import config_dir, hydra_boundary
from lymphnode.evaluation.camelyon16 import EvaluationSettings, evaluate
from lymphnode.wsi.slide import slide_mpp_setting

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="evaluate")
@hydra_boundary
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point: evaluate and print the headline figures, behind the error boundary of
    :mod:`lymphnode.core.boundary` (bad input: one ``error:`` line, exit 1)."""
    settings = EvaluationSettings(
        threshold=float(cfg.threshold),
        detection_threshold=float(cfg.detection_threshold),
        nms_radius_um=float(cfg.nms_radius_um),
        margin_um=float(cfg.margin_um),
        itc_um=float(cfg.itc_um),
        mpp=slide_mpp_setting(cfg.get("slide_mpp"), cfg.get("mpp")),
        fp_rates=tuple(float(r) for r in cfg.fp_rates),
        annotations_downsample=cfg.annotations_downsample,
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
