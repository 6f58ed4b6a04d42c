"""Heatmaps to lesion outlines that QuPath and ASAP open beside the slide (what ``export`` runs).

For every ``<slide>.heatmap.tif`` (from ``infer``) and its slide:

- lesion outlines at each threshold (:func:`lymphnode.inference.lesions.lesion_polygons`: contours
  at map resolution, scaled to level-0 px, simplified within ``tolerance_um``, holes kept) and,
  optionally, the lesion detections of ``evaluate`` (local maxima with non-maximum suppression,
  :func:`lymphnode.evaluation.lesions.detect_lesions`, the same parameters as ``evaluate``);
- ``<slide>.lesions.geojson``: one QuPath FeatureCollection (:mod:`lymphnode.wsi.geojson`) with a
  Feature per lesion (``objectType`` annotation or detection, class ``Tumor``, measurements
  ``Threshold``, ``Max probability``, ``Mean probability``, ``Area µm^2``) and a Point per detection
  (objectType detection, class ``Tumor``, measurement ``Probability``);
- ``<slide>.lesions.xml`` (one threshold) or ``<slide>.lesions.p<t>.xml`` (each of several):
  ASAP XML, outer rings in group ``_0``, holes in group ``_2``, as CAMELYON16 and
  :func:`lymphnode.wsi.annotations.read_asap` read them.

The slide is required: a heatmap is checked against its slide's level-0 size (a heatmap of another
slide is refused) and the slide's µm/px is used when the heatmap has none. A heatmap without lesions
gives an empty FeatureCollection (and an ASAP file without annotations), said in the log.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lymphnode.core import validate
from lymphnode.core.errors import ConfigError, EvaluationError
from lymphnode.evaluation.camelyon16 import find_heatmaps
from lymphnode.evaluation.lesions import detect_lesions
from lymphnode.inference.heatmap import HEATMAP_SUFFIX, Heatmap, check_slide_name, read_heatmap
from lymphnode.inference.lesions import Lesion, lesion_polygons, validate_thresholds
from lymphnode.wsi.annotations import write_asap
from lymphnode.wsi.geojson import (
    TUMOR_COLOR,
    islands_in_holes,
    point_feature,
    polygon_feature,
    write_geojson,
)
from lymphnode.wsi.slide import SLIDE_SUFFIXES, open_slide

log = logging.getLogger(__name__)

__all__ = ["FORMATS", "ExportSettings", "export", "export_heatmap", "find_slide"]

FORMATS = ("geojson", "asap")
GEOJSON_SUFFIX = ".lesions.geojson"


@dataclass(frozen=True)
class ExportSettings:
    """What ``export`` writes (the keys of ``conf/export.yaml``).

    thresholds: probabilities in (0, 1]; lesion outlines at each.
    tolerance_um: outline simplification tolerance, µm (0: every traced vertex).
    formats: subset of ``geojson``, ``asap``.
    object_type: QuPath object type of the lesion outlines, ``annotation`` or ``detection``.
    detections: also write ``evaluate``'s lesion detections as points (GeoJSON only).
    detection_threshold, nms_radius_um: as ``evaluate``.
    mpp: µm per level-0 px when neither the heatmap nor the slide records it.
    class_name, color: the QuPath classification of every object.
    """

    thresholds: tuple[float, ...] = (0.5,)
    tolerance_um: float = 2.0
    formats: tuple[str, ...] = FORMATS
    object_type: str = "annotation"
    detections: bool = True
    detection_threshold: float = 0.5
    nms_radius_um: float = 200.0
    mpp: float | None = None
    class_name: str = "Tumor"
    color: tuple[int, ...] = field(default=TUMOR_COLOR)

    def __post_init__(self) -> None:
        object.__setattr__(self, "thresholds", validate_thresholds(list(self.thresholds)))
        validate.number("tolerance_um", self.tolerance_um, 0, unit="µm")
        formats = list(self.formats)
        if not formats or any(f not in FORMATS for f in formats):
            raise ConfigError(
                f"formats must be a non-empty subset of {list(FORMATS)}, got {formats}"
            )
        validate.choice("object_type", self.object_type, ("annotation", "detection"))
        validate.number("detection_threshold", self.detection_threshold, 0, 1, strict_minimum=True)
        validate.number("nms_radius_um", self.nms_radius_um, 0, unit="µm")
        if self.mpp is not None:
            validate.number("mpp", self.mpp, 0, strict_minimum=True, unit="µm/px (or null)")
        if len(self.color) != 3 or not all(
            isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in self.color
        ):
            raise ConfigError(f"color must be [r, g, b] integers in 0..255, got {list(self.color)}")


def find_slide(slides: str | Path, name: str, heatmap: Path) -> Path:
    """The slide file named ``name`` in the folder ``slides`` (or ``slides`` itself, a file).

    Raises:
        EvaluationError: no such slide (the message names the heatmap, the slide and the folder).
    """
    root = Path(slides)
    if root.is_file():
        if root.stem != name:
            raise EvaluationError(
                f"heatmap {heatmap} belongs to slide {name!r}, but slides={root} is another slide"
            )
        return root
    if not root.is_dir():
        raise EvaluationError(
            f"slides={root} does not exist (expected the folder of the heatmaps' slides)"
        )
    for suffix in SLIDE_SUFFIXES:
        for candidate in (root / f"{name}{suffix}", root / f"{name}{suffix.upper()}"):
            if candidate.is_file():
                return candidate
    raise EvaluationError(
        f"heatmap {heatmap} has no slide: no {name}.{{{','.join(s[1:] for s in SLIDE_SUFFIXES)}}} "
        f"in slides={root}"
    )


def _xml_path(out_dir: Path, slide: str, threshold: float, several: bool) -> Path:
    if not several:
        return out_dir / f"{slide}.lesions.xml"
    return out_dir / f"{slide}.lesions.p{threshold:g}.xml"


def lesion_features(
    slide: str, lesions: Sequence[Lesion], settings: ExportSettings
) -> list[dict[str, Any]]:
    """The QuPath Features of a slide's lesions (names ``Tumor p>=<t> #<k>``, largest first)."""
    features = []
    counts: dict[float, int] = {}
    for lesion in lesions:
        k = counts.get(lesion.threshold, 0) + 1
        counts[lesion.threshold] = k
        name = f"{settings.class_name} p>={lesion.threshold:g} #{k}"
        features.append(
            polygon_feature(
                lesion.polygon,
                name=name,
                id_seed=f"{slide}/lesion/{lesion.threshold:g}/{k}",
                object_type=settings.object_type,
                class_name=settings.class_name,
                color=settings.color,
                measurements={
                    "Threshold": lesion.threshold,
                    "Max probability": lesion.max_probability,
                    "Mean probability": lesion.mean_probability,
                    "Area µm^2": lesion.area_um2,
                },
            )
        )
    return features


def export_heatmap(
    heatmap: Heatmap, out_dir: str | Path, settings: ExportSettings, *, source: str = ""
) -> dict[str, Any]:
    """Write the lesion files of one heatmap (its ``mpp`` must be known); returns a summary
    ``{slide, lesions: {threshold: n}, detections, files}``. The output names are the slide's
    name, a plain file stem (:func:`check_slide_name`: no path leaves ``out_dir``)."""
    out_dir = Path(out_dir)
    check_slide_name(heatmap.slide, f"heatmap {source or heatmap.slide!r}")
    if heatmap.mpp is None:
        raise EvaluationError(
            f"heatmap {source or heatmap.slide} has no µm/px; pass slide_mpp=<level-0 µm/px>"
        )
    lesions = lesion_polygons(
        heatmap.probabilities,
        heatmap.downsample,
        heatmap.mpp,
        settings.thresholds,
        tolerance_um=settings.tolerance_um,
    )
    per_threshold = {t: sum(le.threshold == t for le in lesions) for t in settings.thresholds}
    if not lesions:
        log.info(
            "%s: no lesion at thresholds %s (max probability %.3f); writing empty files",
            heatmap.slide,
            list(settings.thresholds),
            float(np.max(heatmap.probabilities)) if heatmap.probabilities.size else 0.0,
        )
    detections = []
    if settings.detections:
        detections = detect_lesions(
            heatmap.probabilities,
            heatmap.downsample,
            threshold=settings.detection_threshold,
            radius_px=settings.nms_radius_um / (heatmap.mpp * heatmap.downsample),
        )
    files: list[str] = []
    if "geojson" in settings.formats:
        features = lesion_features(heatmap.slide, lesions, settings)
        for k, d in enumerate(detections, start=1):
            features.append(
                point_feature(
                    d.x,
                    d.y,
                    name=f"detection #{k}",
                    id_seed=f"{heatmap.slide}/detection/{k}",
                    class_name=settings.class_name,
                    color=settings.color,
                    measurements={"Probability": d.probability},
                )
            )
        path = write_geojson(out_dir / f"{heatmap.slide}{GEOJSON_SUFFIX}", features)
        files.append(str(path))
    if "asap" in settings.formats:
        several = len(settings.thresholds) > 1
        for t in settings.thresholds:
            polygons = [le.polygon for le in lesions if le.threshold == t]
            tumor = [np.asarray(p.exterior.coords)[:-1] for p in polygons]
            holes = [np.asarray(r.coords)[:-1] for p in polygons for r in p.interiors]
            path = _xml_path(out_dir, heatmap.slide, t, several)
            lost = islands_in_holes(polygons)
            if lost:
                log.warning(
                    "%s: %d lesion(s) at p>=%g lie inside holes of other lesions; ASAP XML "
                    "(tumor minus exclusion) cannot hold them, so %s leaves them out (the GeoJSON "
                    "has them)",
                    heatmap.slide,
                    lost,
                    t,
                    path.name,
                )
            write_asap(path, tumor, holes)
            files.append(str(path))
    log.info(
        "%s: %s lesions, %d detections -> %s",
        heatmap.slide,
        ", ".join(f"{n} at p>={t:g}" for t, n in per_threshold.items()),
        len(detections),
        ", ".join(files),
    )
    return {
        "slide": heatmap.slide,
        "lesions": {f"{t:g}": n for t, n in per_threshold.items()},
        "detections": len(detections),
        "files": files,
    }


def export(
    heatmaps: str | Path,
    slides: str | Path,
    out_dir: str | Path,
    settings: ExportSettings | None = None,
) -> list[dict[str, Any]]:
    """Export every heatmap of ``heatmaps`` (a folder of ``*.heatmap.tif`` or one file) whose slide
    is in ``slides`` (a folder, or the one slide file); returns one summary per heatmap.

    Every heatmap is checked before anything is written, so a bad one leaves no file behind.

    Raises:
        EvaluationError: no heatmap, a heatmap that is not one, a heatmap without its slide, one
            whose level-0 size differs from its slide's, or no µm/px anywhere.
        ConfigError: bad settings.
    """
    settings = settings or ExportSettings()
    jobs: list[tuple[Path, float]] = []  # (heatmap, level-0 µm/px): every one checked first
    for path in find_heatmaps(heatmaps):
        heatmap = read_heatmap(path)
        jobs.append((path, _check_against_slide(path, heatmap, slides, settings.mpp)))
        del heatmap  # memory: one heatmap at a time, whatever their number
    out = []
    for path, mpp in jobs:
        heatmap = read_heatmap(path)
        heatmap.mpp = mpp
        out.append(export_heatmap(heatmap, out_dir, settings, source=str(path)))
    return out


def _check_against_slide(
    path: Path, heatmap: Heatmap, slides: str | Path, mpp: float | None
) -> float:
    """The level-0 µm/px of a heatmap after checking it against its slide (EvaluationError).
    The heatmap's file name and the slide it records must agree: output names come from them."""
    stem = path.name[: -len(HEATMAP_SUFFIX)] if path.name.endswith(HEATMAP_SUFFIX) else path.stem
    if heatmap.slide != stem:
        raise EvaluationError(
            f"{path} holds the heatmap of slide {heatmap.slide!r}, not {stem!r}; file and slide "
            "names must match"
        )
    slide_path = find_slide(slides, heatmap.slide, path)
    with open_slide(slide_path) as slide:
        size, slide_mpp = tuple(slide.dimensions), slide.mpp
    if tuple(heatmap.level0_size) != size:
        raise EvaluationError(
            f"heatmap {path} covers a {heatmap.level0_size[0]} x {heatmap.level0_size[1]} px "
            f"slide, but {slide_path} is {size[0]} x {size[1]} px; is it the heatmap of "
            "another slide?"
        )
    found = heatmap.mpp or slide_mpp or mpp
    if found is None:
        raise EvaluationError(
            f"heatmap {path} and slide {slide_path} record no µm/px; pass slide_mpp=<level-0 µm/px>"
        )
    return float(found)
