"""Lesion polygons from a tumor-probability heatmap: what ``export`` writes for QuPath and ASAP.

A lesion at threshold ``t`` is one 8-connected component of the heatmap pixels with probability
``>= t`` (the connectivity of ``evaluate``'s lesions). Its outline is traced at map resolution by
marching squares at level 0.5 on the component's own 0/1 mask (:func:`skimage.measure.find_contours`),
so the outline runs between pixel centres: rasterising it back at map resolution (pixel centres)
gives the component again. Holes of the component (background it encloses) are kept as interior
rings; a component inside such a hole is a lesion of its own. Outlines are scaled to level-0 px
(map pixel ``(i, j)`` has its centre at level-0 ``((j + 0.5) d, (i + 0.5) d)``, ``d`` the heatmap
downsample) and simplified with shapely within a tolerance given in µm.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import shapely
from scipy import ndimage
from shapely.geometry import Polygon
from shapely.geometry.polygon import orient
from skimage.measure import find_contours

from lymphnode.core import validate
from lymphnode.core.errors import ConfigError

__all__ = ["Lesion", "lesion_polygons", "validate_thresholds"]

_EIGHT = np.ones((3, 3), dtype=bool)  # 8-connectivity, as evaluation.lesions


@dataclass(frozen=True)
class Lesion:
    """One lesion outline of a heatmap.

    Attributes:
        polygon: the outline (shapely Polygon, holes as interior rings) in level-0 px ``(x, y)``.
        threshold: the probability threshold it was traced at.
        max_probability, mean_probability: over the heatmap pixels of the lesion.
        area_um2: area of ``polygon`` (after simplification) in µm².
    """

    polygon: Polygon
    threshold: float
    max_probability: float
    mean_probability: float
    area_um2: float


def validate_thresholds(thresholds: object, name: str = "thresholds") -> tuple[float, ...]:
    """A non-empty list of distinct probabilities in (0, 1], sorted ascending (ConfigError)."""
    if isinstance(thresholds, (int, float)) and not isinstance(thresholds, bool):
        thresholds = [thresholds]
    if isinstance(thresholds, str) or not isinstance(thresholds, Sequence) or not thresholds:
        raise ConfigError(
            f"{name} must be a non-empty list of probabilities in (0, 1], got {thresholds!r}"
        )
    values = [
        validate.number(f"{name}[{i}]", t, 0, 1, strict_minimum=True, unit="(probability)")
        for i, t in enumerate(thresholds)
    ]
    if len(set(values)) != len(values):
        raise ConfigError(f"{name} must not repeat a value, got {list(thresholds)!r}")
    return tuple(sorted(values))


def lesion_polygons(
    probabilities: np.ndarray,
    downsample: float,
    mpp: float,
    thresholds: Sequence[float] = (0.5,),
    *,
    tolerance_um: float = 0.0,
) -> list[Lesion]:
    """Lesion outlines of a probability map at each threshold, in level-0 px.

    Args:
        probabilities: (H, W) float in [0, 1], pixel ``(i, j)`` covering level-0
            ``[j d, (j + 1) d) x [i d, (i + 1) d)`` with ``d = downsample``.
        downsample: level-0 px per map pixel.
        mpp: µm per level-0 px (for the tolerance and the areas).
        thresholds: probabilities in (0, 1]; a pixel ``>= t`` is lesion at threshold ``t``.
        tolerance_um: simplification tolerance in µm (Douglas-Peucker, topology preserved: no
            outline crosses itself or loses a hole); 0 keeps every traced vertex.

    Returns:
        The lesions of every threshold (ascending), each threshold's lesions by decreasing area.

    Raises:
        ConfigError: a threshold outside (0, 1], a negative tolerance, a non-positive downsample or
            mpp, or a map that is not 2-D.
    """
    ts = validate_thresholds(list(thresholds))
    tolerance = validate.number("tolerance_um", tolerance_um, 0, unit="µm")
    ds = validate.number("downsample", downsample, 0, strict_minimum=True, unit="(level-0 px)")
    mpp = validate.number("mpp", mpp, 0, strict_minimum=True, unit="µm/px")
    probs = np.asarray(probabilities, dtype=np.float32)
    if probs.ndim != 2:
        raise ConfigError(f"probabilities must be a 2-D map, got shape {probs.shape}")
    tolerance_px = tolerance / mpp  # level-0 px
    out: list[Lesion] = []
    for t in ts:
        labels, _ = ndimage.label(probs >= t, structure=_EIGHT)
        found = []
        for k, box in enumerate(ndimage.find_objects(labels), start=1):
            if box is None:  # pragma: no cover - labels are consecutive
                continue
            component = labels[box] == k
            polygon = _trace(component, box[0].start, box[1].start, ds)
            if tolerance_px > 0:
                simplified = polygon.simplify(tolerance_px, preserve_topology=True)
                if not simplified.is_empty and simplified.area > 0:
                    polygon = simplified
            values = probs[box][component]
            found.append(
                Lesion(
                    polygon=polygon,
                    threshold=t,
                    max_probability=float(values.max()),
                    mean_probability=float(values.mean()),
                    area_um2=float(polygon.area * mpp * mpp),
                )
            )
        out += sorted(found, key=lambda lesion: -lesion.polygon.area)
    return out


def _trace(component: np.ndarray, row0: int, col0: int, ds: float) -> Polygon:
    """The outline of one connected component (bool crop whose top-left map pixel is
    ``(row0, col0)``) as a level-0 polygon with its holes."""
    padded = np.pad(component, 1).astype(np.float32)  # closed contours around the crop edges
    rings = find_contours(padded, 0.5, fully_connected="high")
    shapes = []
    for ring in rings:  # (N, 2) row, col in padded-crop pixel-centre coordinates
        x = (ring[:, 1] - 1 + col0 + 0.5) * ds
        y = (ring[:, 0] - 1 + row0 + 0.5) * ds
        shapes.append(np.column_stack([x, y]))
    # One component has one outer boundary (the ring of largest area); the others are its holes.
    areas = [abs(Polygon(s).area) for s in shapes]
    outer = int(np.argmax(areas))
    polygon = Polygon(shapes[outer], [s for i, s in enumerate(shapes) if i != outer])
    if not polygon.is_valid:  # pragma: no cover - marching squares rings do not cross
        polygon = shapely.make_valid(polygon)
    return orient(polygon) if isinstance(polygon, Polygon) else polygon
