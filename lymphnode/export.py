"""``python -m lymphnode.export heatmaps=DIR slides=DIR [out_dir=DIR] [thresholds=[0.5,0.9]]``

Turns whole-slide heatmaps (from ``lymphnode.infer``) into lesion outlines that QuPath and ASAP
open beside the slide: ``<slide>.lesions.geojson`` (a QuPath FeatureCollection: drag it onto the
slide in QuPath) and ``<slide>.lesions.xml`` (ASAP XML, group ``_0``; ``<slide>.lesions.p<t>.xml``
per threshold when there are several). Outlines are traced at map resolution at each threshold,
scaled to level-0 px and simplified within ``tolerance_um``; ``evaluate``'s lesion detections go
into the GeoJSON as points. Each heatmap is checked against its slide in ``slides``. The logic
lives in :mod:`lymphnode.evaluation.export`; this module composes the config and maps errors.
See ``docs/qupath.md``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from lymphnode.core.boundary import config_dir, hydra_boundary
from lymphnode.core.errors import ConfigError
from lymphnode.evaluation.export import ExportSettings, export
from lymphnode.wsi.slide import slide_mpp_setting

log = logging.getLogger(__name__)


def _list(cfg: DictConfig, key: str) -> list:
    value = OmegaConf.to_container(cfg[key]) if OmegaConf.is_list(cfg[key]) else cfg[key]
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
        return [value]
    if not isinstance(value, list):
        raise ConfigError(f"{key} must be a list, got {value!r}")
    return value


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="export")
@hydra_boundary
def main(cfg: DictConfig) -> None:
    """Hydra entry point: export every heatmap and print one line per slide, behind the error
    boundary of :mod:`lymphnode.core.boundary` (bad input: one ``error:`` line, exit 1)."""
    settings = ExportSettings(
        thresholds=tuple(_list(cfg, "thresholds")),
        tolerance_um=cfg.tolerance_um,
        formats=tuple(_list(cfg, "formats")),
        object_type=cfg.object_type,
        detections=bool(cfg.detections),
        detection_threshold=cfg.detection_threshold,
        nms_radius_um=cfg.nms_radius_um,
        mpp=slide_mpp_setting(cfg.get("slide_mpp"), cfg.get("mpp")),
        class_name=str(cfg.class_name),
        color=tuple(_list(cfg, "color")),
    )
    out_dir = cfg.out_dir or cfg.heatmaps
    if cfg.out_dir is None and Path(cfg.heatmaps).is_file():
        out_dir = str(Path(cfg.heatmaps).parent)
    summaries = export(cfg.heatmaps, cfg.slides, out_dir, settings)
    lesions = sum(sum(s["lesions"].values()) for s in summaries)
    print(f"exported {len(summaries)} heatmaps ({lesions} lesion outlines) -> {out_dir}")


if __name__ == "__main__":
    main()
