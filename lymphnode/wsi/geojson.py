"""QuPath GeoJSON: lesion outlines out to QuPath, pathologists' annotations back in.

QuPath (0.2-0.5) writes its objects as GeoJSON Features in level-0 pixel coordinates, origin at
the top-left corner of the full-resolution image (the frame of OpenSlide and of lymphnode). File >
Export objects as GeoJSON writes either a ``FeatureCollection`` or a bare JSON array of Features
(or one Feature); each Feature carries its QuPath metadata in ``properties``::

    {"type": "Feature", "id": "<uuid>",
     "geometry": {"type": "Polygon", "coordinates": [[[x, y], ...], [hole ...]]},
     "properties": {"objectType": "annotation", "name": "...",
                    "classification": {"name": "Tumor", "color": [200, 0, 0]},
                    "isLocked": false, "measurements": {"Max probability": 0.97}}}

QuPath 0.2 writes ``"id": "PathAnnotationObject"``, a ``colorRGB`` integer instead of ``color`` and
measurements as a list of ``{"name", "value"}``; both layouts are read. Geometries are read with
shapely (``shapely.geometry.shape``).

- :func:`write_geojson` writes a FeatureCollection (QuPath imports it by drag-and-drop);
  :func:`polygon_feature` / :func:`point_feature` build its Features.
- :func:`read_features` reads any of QuPath's layouts into :class:`QupathFeature` (class name,
  object type, shapely geometry).
- :func:`read_qupath` turns a file into :class:`~lymphnode.wsi.annotations.Annotations` (tumor and
  exclusion polygons) for ``prepare``, mapping classification names to tumor / exclusion / ignored
  with :class:`QupathClasses`; a class in none of the three lists is refused.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from shapely.geometry import mapping, shape
from shapely.geometry.base import BaseGeometry

from lymphnode.core import atomic
from lymphnode.core.errors import AnnotationError, ConfigError
from lymphnode.wsi.annotations import Annotations

log = logging.getLogger(__name__)

__all__ = [
    "EXCLUSION_CLASSES",
    "IGNORED_CLASSES",
    "TUMOR_CLASSES",
    "UNCLASSIFIED",
    "QupathClasses",
    "QupathFeature",
    "islands_in_holes",
    "point_feature",
    "polygon_feature",
    "read_features",
    "read_qupath",
    "write_geojson",
]

UNCLASSIFIED = "Unclassified"  # the class name of a Feature without a classification (QuPath's UI)
TUMOR_CLASSES: tuple[str, ...] = ("Tumor",)  # QuPath's built-in tumour class
# Non-tumour tissue of QuPath's built-in classes: inside a tumour outline it cuts the tumour out.
EXCLUSION_CLASSES: tuple[str, ...] = ("Exclusion", "Stroma", "Necrosis", "Immune cells", "Other")
# say nothing about tumour; "To label": the squares `select` asks a pathologist to annotate
IGNORED_CLASSES: tuple[str, ...] = ("Region*", "Ignore*", "To label")
AREA_OBJECT_TYPES = frozenset({"annotation"})  # what prepare reads; detections/cells/tiles skipped
# QuPath 0.2 names the object type in the Feature's id instead of properties.objectType.
_V02_TYPES = {
    "PathAnnotationObject": "annotation",
    "PathDetectionObject": "detection",
    "PathCellObject": "cell",
    "PathTileObject": "tile",
    "TMACoreObject": "tma_core",
}
TUMOR_COLOR = (200, 0, 0)  # QuPath's default colour of "Tumor"


# --------------------------------------------------------------------------------------------------
# Writing


def _feature_id(seed: str) -> str:
    """A UUID derived from ``seed``: the same export gives the same bytes."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"lymphnode:{seed}"))


def _classification(name: str, color: Sequence[int]) -> dict[str, Any]:
    rgb = [int(c) for c in color]
    if len(rgb) != 3 or not all(0 <= c <= 255 for c in rgb):
        raise ConfigError(f"classification color must be [r, g, b] in 0..255, got {list(color)!r}")
    return {"name": str(name), "color": rgb}


def polygon_feature(
    geometry: BaseGeometry,
    *,
    name: str,
    id_seed: str,
    object_type: str = "annotation",
    class_name: str = "Tumor",
    color: Sequence[int] = TUMOR_COLOR,
    measurements: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """A QuPath Feature of a (Multi)Polygon in level-0 px.

    Args:
        geometry: shapely Polygon or MultiPolygon, level-0 px ``(x, y)``; holes are kept.
        name: the object's name in QuPath's object list.
        id_seed: a string unique within the file; the Feature's UUID is derived from it.
        object_type: ``annotation`` (editable in QuPath) or ``detection`` (read-only, lighter).
        class_name, color: the classification, colour as ``[r, g, b]`` 0..255.
        measurements: shown in QuPath's measurement table (finite floats).
    """
    if object_type not in ("annotation", "detection"):
        raise ConfigError(f"object_type must be one of annotation, detection, got {object_type!r}")
    return {
        "type": "Feature",
        "id": _feature_id(id_seed),
        "geometry": mapping(geometry),
        "properties": {
            "objectType": object_type,
            "name": name,
            "classification": _classification(class_name, color),
            "isLocked": False,
            "measurements": {k: float(v) for k, v in (measurements or {}).items()},
        },
    }


def point_feature(
    x: float,
    y: float,
    *,
    name: str,
    id_seed: str,
    object_type: str = "detection",
    class_name: str = "Tumor",
    color: Sequence[int] = TUMOR_COLOR,
    measurements: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """A QuPath Feature of one point at level-0 px ``(x, y)`` (e.g. an ``evaluate`` detection)."""
    return polygon_feature(
        shapely.Point(x, y),
        name=name,
        id_seed=id_seed,
        object_type=object_type,
        class_name=class_name,
        color=color,
        measurements=measurements,
    )


def write_geojson(path: str | Path, features: Iterable[Mapping[str, Any]]) -> Path:
    """Write ``features`` as one GeoJSON FeatureCollection (atomic: never half-written).

    An empty list gives a valid empty FeatureCollection (QuPath imports it as no objects).
    """
    path = Path(path)
    collection = {"type": "FeatureCollection", "features": list(features)}
    text = json.dumps(collection, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_text(path, text + "\n")
    except OSError as e:
        raise AnnotationError(f"{path}: cannot write GeoJSON: {e}") from e
    return path


# --------------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class QupathFeature:
    """One Feature of a QuPath GeoJSON file.

    Attributes:
        name: its ``properties.name``, or ``#<index>`` when it has none.
        class_name: ``properties.classification.name``, :data:`UNCLASSIFIED` when absent.
        object_type: ``properties.objectType``; QuPath 0.2's id (``PathDetectionObject`` ...)
            when absent; ``annotation`` when neither says.
        geometry: shapely geometry in level-0 px.
        measurements: its measurements (both of QuPath's layouts), name -> value.
    """

    name: str
    class_name: str
    object_type: str
    geometry: BaseGeometry
    measurements: dict[str, float]


def _load(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise AnnotationError(f"{path}: annotation file not found") from e
    except (OSError, UnicodeDecodeError) as e:
        raise AnnotationError(f"{path}: cannot read GeoJSON: {e}") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise AnnotationError(f"{path}: not valid JSON: {e}") from e
    except RecursionError as e:  # e.g. 200000 nested arrays: no GeoJSON is that deep
        raise AnnotationError(
            f"{path}: nested deeper than Python's JSON reader goes; expected a GeoJSON "
            "FeatureCollection (polygon coordinates are 3-4 levels deep)"
        ) from e


def _features_of(data: Any, path: Path) -> list[Any]:
    if isinstance(data, list):
        return data
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features = data.get("features")
        if not isinstance(features, list):
            raise AnnotationError(f"{path}: FeatureCollection without a 'features' list")
        return features
    if isinstance(data, dict) and data.get("type") == "Feature":
        return [data]
    kind = data.get("type") if isinstance(data, dict) else type(data).__name__
    raise AnnotationError(
        f"{path}: top-level GeoJSON is {kind!r}; expected a FeatureCollection, a Feature or a "
        "list of Features (as QuPath's File > Export objects as GeoJSON writes)"
    )


def _measurements(raw: Any) -> dict[str, float]:
    if isinstance(raw, dict):  # QuPath >= 0.3
        items: list[tuple[Any, Any]] = list(raw.items())
    elif isinstance(raw, list):  # QuPath 0.2: [{"name": ..., "value": ...}]
        items = [(m.get("name"), m.get("value")) for m in raw if isinstance(m, dict)]
    else:
        return {}
    out = {}
    for k, v in items:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[str(k)] = float(v)
    return out


def read_features(path: str | Path) -> list[QupathFeature]:
    """Every Feature of a QuPath GeoJSON file (any of QuPath's layouts).

    Raises:
        AnnotationError: the file is missing, not JSON, not GeoJSON Features, or a Feature has no
            geometry, an invalid one or non-finite coordinates. The message names the file and the
            Feature.
    """
    path = Path(path)
    out = []
    for k, raw in enumerate(_features_of(_load(path), path)):
        if not isinstance(raw, dict) or raw.get("type") != "Feature":
            raise AnnotationError(f"{path}: item #{k} is not a GeoJSON Feature: {str(raw)[:80]}")
        props = raw.get("properties") or {}
        if not isinstance(props, dict):
            raise AnnotationError(f"{path}: Feature #{k} has properties that are not an object")
        name = str(props.get("name") or f"#{k}")
        cls = props.get("classification")
        class_name = UNCLASSIFIED
        if isinstance(cls, dict) and cls.get("name"):
            class_name = str(cls["name"])
        elif isinstance(cls, str) and cls:
            class_name = cls
        geometry = raw.get("geometry")
        if not isinstance(geometry, dict) or "type" not in geometry:
            raise AnnotationError(f"{path}: Feature {name!r} has no geometry")
        try:
            geom = shape(geometry)
        except Exception as e:  # shapely raises several types for malformed coordinates
            raise AnnotationError(
                f"{path}: Feature {name!r} has an unreadable {geometry.get('type')} geometry: {e}"
            ) from e
        coords = shapely.get_coordinates(geom)
        if not np.isfinite(coords).all():
            raise AnnotationError(f"{path}: Feature {name!r} has non-finite coordinates")
        out.append(
            QupathFeature(
                name=name,
                class_name=class_name,
                object_type=str(
                    props.get("objectType") or _V02_TYPES.get(str(raw.get("id")), "annotation")
                ),
                geometry=geom,
                measurements=_measurements(props.get("measurements")),
            )
        )
    return out


@dataclass(frozen=True)
class QupathClasses:
    """How QuPath classification names map to tumor / exclusion / ignored (the ``qupath.*`` keys of
    ``conf/prepare.yaml``). A Feature without a classification has class :data:`UNCLASSIFIED`."""

    tumor: tuple[str, ...] = TUMOR_CLASSES
    exclusion: tuple[str, ...] = EXCLUSION_CLASSES
    ignored: tuple[str, ...] = IGNORED_CLASSES
    key: str = "qupath"  # the config prefix named in messages

    def __post_init__(self) -> None:
        groups = {"tumor_classes": self.tumor, "exclusion_classes": self.exclusion}
        groups["ignored_classes"] = self.ignored
        for name, values in groups.items():
            if isinstance(values, str) or not all(isinstance(v, str) for v in values):
                raise ConfigError(
                    f"{self.key}.{name} must be a list of class names, got {values!r}"
                )
        seen: dict[str, str] = {}
        for name, values in groups.items():
            for v in values:
                if v in seen and seen[v] != name:
                    raise ConfigError(
                        f"class {v!r} is in both {self.key}.{seen[v]} and {self.key}.{name}"
                    )
                seen[v] = name

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None, key: str = "qupath") -> QupathClasses:
        """From a ``{tumor_classes, exclusion_classes, ignored_classes}`` mapping (defaults for
        missing keys; unknown keys refused)."""
        cfg = dict(cfg or {})
        known = ("tumor_classes", "exclusion_classes", "ignored_classes")
        extra = sorted(set(cfg) - set(known))
        if extra:
            raise ConfigError(f"{key} has unknown keys {extra} (expected {list(known)})")

        def names(k: str, default: tuple[str, ...]) -> tuple[str, ...]:
            v = cfg.get(k, default)
            if v is None:
                return ()
            if isinstance(v, str) or not isinstance(v, Sequence):
                raise ConfigError(f"{key}.{k} must be a list of class names, got {v!r}")
            return tuple(v)

        return cls(
            tumor=names("tumor_classes", TUMOR_CLASSES),
            exclusion=names("exclusion_classes", EXCLUSION_CLASSES),
            ignored=names("ignored_classes", IGNORED_CLASSES),
            key=key,
        )


def _polygons(geom: BaseGeometry) -> list[shapely.Polygon]:
    """The polygons of a geometry (MultiPolygon and GeometryCollection parts); points and lines
    enclose no area and give none."""
    if isinstance(geom, shapely.Polygon):
        return [] if geom.is_empty else [geom]
    if isinstance(geom, (shapely.MultiPolygon, shapely.GeometryCollection)):
        return [p for g in geom.geoms for p in _polygons(g)]
    return []


def read_qupath(
    path: str | Path, classes: QupathClasses | None = None, *, slide: str | Path | None = None
) -> Annotations:
    """Read a QuPath GeoJSON file into tumor and exclusion polygons (level-0 px).

    Args:
        path: the GeoJSON file (FeatureCollection, list of Features or one Feature).
        classes: the class mapping (default :class:`QupathClasses`).
        slide: the slide it belongs to, named in messages.

    Only ``annotation`` objects count (detections, cells and tiles are skipped with one warning).
    Polygon and MultiPolygon geometries (and the polygons of a GeometryCollection) give area; points
    and lines are skipped (counted in a debug log). The result is the union of the tumor-class
    polygons (holes kept) minus the union of the exclusion-class polygons, given as tumor polygons
    (the outer rings) and exclusion polygons (the holes) so that :meth:`Annotations.mask` draws it
    exactly; overlapping or self-touching outlines are repaired with ``shapely.make_valid``.

    Raises:
        AnnotationError: an unreadable file (:func:`read_features`), or area annotations whose class
            is in none of the three lists: the message names the slide, the file, the unknown
            classes with their counts and the config keys to add them to.
    """
    path = Path(path)
    classes = classes or QupathClasses()
    features = read_features(path)
    tumor_set, exclusion_set, ignored_set = (
        set(classes.tumor),
        set(classes.exclusion),
        set(classes.ignored),
    )
    skipped_types: Counter[str] = Counter()
    no_area: Counter[str] = Counter()
    unknown: Counter[str] = Counter()
    tumor_parts: list[BaseGeometry] = []
    exclusion_parts: list[BaseGeometry] = []
    names: list[str] = []
    for f in features:
        if f.object_type not in AREA_OBJECT_TYPES:
            skipped_types[f.object_type] += 1
            continue
        polygons = _polygons(f.geometry)
        if not polygons:
            no_area[f.geometry.geom_type] += 1
            continue
        if f.class_name in tumor_set:
            tumor_parts += polygons
            names.append(f.name)
        elif f.class_name in exclusion_set:
            exclusion_parts += polygons
        elif f.class_name not in ignored_set:
            unknown[f.class_name] += 1
    where = f"slide {str(slide)!r}: " if slide is not None else ""
    if unknown:
        found = ", ".join(f"{c!r} ({n})" for c, n in sorted(unknown.items()))
        k = classes.key
        raise AnnotationError(
            f"{where}{path}: annotations of unknown QuPath classes {found}; add each to "
            f"{k}.tumor_classes {list(classes.tumor)}, {k}.exclusion_classes "
            f"{list(classes.exclusion)} or {k}.ignored_classes {list(classes.ignored)}"
        )
    if skipped_types:
        log.warning(
            "%s%s: skipped %d object(s) that are not annotations: %s",
            where,
            path,
            sum(skipped_types.values()),
            dict(sorted(skipped_types.items())),
        )
    if no_area:
        log.debug("%s: skipped features that enclose no area: %s", path, dict(no_area))
    region = shapely.union_all([shapely.make_valid(p) for p in tumor_parts])
    if exclusion_parts:
        region = region.difference(
            shapely.union_all([shapely.make_valid(p) for p in exclusion_parts])
        )
    parts = sorted(_polygons(region), key=lambda p: -p.area)
    tumor = [np.asarray(p.exterior.coords)[:-1] for p in parts]
    holes = [np.asarray(r.coords)[:-1] for p in parts for r in p.interiors]
    lost = islands_in_holes(parts)
    if lost:
        log.warning(
            "%s%s: %d tumor region(s) lie inside holes of other tumor regions; the tumor-minus-"
            "exclusion mask cannot hold them and leaves them out",
            where,
            path,
            lost,
        )
    ann = Annotations(
        tumor=[t for t in tumor if len(t) >= 3],
        exclusion=[h for h in holes if len(h) >= 3],
        path=path,
        tumor_names=[f"tumor region {i} (of {', '.join(names[:3])})" for i in range(len(tumor))],
        exclusion_names=[f"hole {i}" for i in range(len(holes))],
    )
    log.debug("%s", ann)
    return ann


def islands_in_holes(parts: Sequence[shapely.Polygon]) -> int:
    """How many of ``parts`` lie inside a hole of another part: the polygons that a tumor-minus-
    exclusion model (ASAP XML, :class:`~lymphnode.wsi.annotations.Annotations`) cannot hold."""
    holes = [shapely.Polygon(r) for p in parts for r in p.interiors]
    if not holes:
        return 0
    tree = shapely.STRtree(holes)
    points = [p.representative_point() for p in parts]
    hits = tree.query(points, predicate="within")
    return len(set(hits[0].tolist())) if hits.size else 0
