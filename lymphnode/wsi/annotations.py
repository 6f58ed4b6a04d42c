"""CAMELYON16/17 lesion outlines (ASAP XML) as tumor and exclusion polygons, and their masks.

An ASAP file lists annotations, each with a type, a group (``PartOfGroup``) and vertices in level-0
pixels. CAMELYON16 puts tumor outlines in the groups ``Tumor``, ``_0`` or ``_1`` and regions inside a
tumor outline that are not tumor in ``_2`` (``Exclusion`` in some derived files).

- :func:`read_asap` turns a file into :class:`Annotations`: lists of ``(N, 2)`` float64 ``(x, y)``
  vertex arrays in level-0 pixels. XML comes from outside, so it is parsed with defusedxml (entity
  declarations and external references are refused).
- :meth:`Annotations.mask` rasterizes tumor minus exclusion for any level-0 region at any downsample.
- :func:`write_asap` writes polygons back as ASAP XML (used by the synthetic slides).
- QuPath GeoJSON is read into the same :class:`Annotations` by
  :func:`lymphnode.wsi.geojson.read_qupath` (``prepare`` takes ``<slide>.geojson`` beside XML).
- :func:`to_mask` (``python -m lymphnode.annotations to-mask SLIDE XML OUT.tif``) writes a pyramidal 0/255
  mask TIFF that OpenSlide opens, the conversion CAMELYON users otherwise do with ASAP.

Coordinates everywhere are level-0 pixels, ``(x, y)`` with the origin at the top-left corner of the
slide, as OpenSlide.
"""

from __future__ import annotations

import logging
import math
import tempfile
import xml.etree.ElementTree as StdET
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import defusedxml
import defusedxml.ElementTree as SafeET
import numpy as np

from lymphnode.core import atomic, validate
from lymphnode.core.errors import AnnotationError, ConfigError, SlideError

log = logging.getLogger(__name__)

TUMOR_GROUPS: tuple[str, ...] = ("Tumor", "_0", "_1")  # CAMELYON16/17 tumor groups
EXCLUSION_GROUPS: tuple[str, ...] = ("_2", "Exclusion")  # non-tumor holes inside tumor outlines
AREA_TYPES = frozenset({"polygon", "rectangle", "spline"})  # ASAP types that enclose an area
POINT_TYPES = frozenset({"dot", "measurement", "pointset", "none"})  # ASAP types that do not
WRITE_TUMOR_GROUP = "_0"
WRITE_EXCLUSION_GROUP = "_2"
ANNOTATIONS_DOWNSAMPLE_KEY = "annotations_downsample"  # the config key of every stage
BAND_PIXELS = 1 << 24  # to-mask rasterizes about this many mask pixels per band (16 MiB of uint8)


# --------------------------------------------------------------------------------------------------
# The polygons and their masks


@dataclass(frozen=True)
class _EdgeIndex:
    """Edges of a set of polygons, flattened, with per-polygon bounding boxes (level-0 px)."""

    bboxes: np.ndarray  # (P, 4) float64: x0, y0, x1, y1 of each polygon
    starts: np.ndarray  # (P + 1,) int64: polygon p owns edges starts[p]:starts[p + 1]
    edges: np.ndarray  # (E, 4) float64: xa, ya, xb, yb of each edge (closed polygons)
    owner: np.ndarray  # (E,) int64: polygon index of each edge

    @classmethod
    def build(cls, polygons: Sequence[np.ndarray]) -> _EdgeIndex:
        if not polygons:
            empty = np.zeros((0, 4))
            return cls(empty, np.zeros(1, np.int64), empty, np.zeros(0, np.int64))
        bboxes = np.array([[*p.min(axis=0), *p.max(axis=0)] for p in polygons], dtype=np.float64)
        counts = np.array([len(p) for p in polygons], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(counts)])
        a = np.concatenate(polygons).astype(np.float64, copy=False)
        b = np.concatenate([np.roll(p, -1, axis=0) for p in polygons]).astype(np.float64)
        owner = np.repeat(np.arange(len(polygons), dtype=np.int64), counts)
        return cls(bboxes, starts, np.hstack([a, b]), owner)

    def select(self, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
        """Indices of the polygons whose bounding box meets the level-0 box [x0, x1] x [y0, y1]."""
        b = self.bboxes
        hit = (b[:, 0] <= x1) & (b[:, 2] >= x0) & (b[:, 1] <= y1) & (b[:, 3] >= y0)
        return np.flatnonzero(hit)

    def edges_of(self, polygons: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(edges, owner) of the given polygon indices."""
        if len(polygons) == len(self.bboxes):
            return self.edges, self.owner
        idx = _concat_ranges(self.starts[polygons], self.starts[polygons + 1])
        return self.edges[idx], self.owner[idx]


def _concat_ranges(starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
    """np.concatenate([np.arange(a, b) for a, b in zip(starts, stops)]) without the Python loop."""
    lengths = stops - starts
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    offsets = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    return np.arange(total, dtype=np.int64) + offsets


def _scanline_fill(
    edges: np.ndarray, owner: np.ndarray, x: float, y: float, ds: float, rows: int, cols: int
) -> np.ndarray:
    """Union of the polygons' interiors sampled at pixel centres (non-zero winding per polygon).

    Pixel (i, j) of the (rows, cols) grid has its centre at level-0 (x + (j + 0.5) ds,
    y + (i + 0.5) ds). A centre exactly on an edge counts as inside on left and top edges and as
    outside on right and bottom edges, so polygons that share an edge never both claim a pixel and
    a rectangle [x0, x1) x [y0, y1) holds exactly the pixels whose centres it contains.
    """
    out = np.zeros((rows, cols), dtype=bool)
    if len(edges) == 0 or rows == 0 or cols == 0:
        return out
    # Grid coordinates: pixel centre (i, j) sits at (u, v) = (j, i).
    u_a = (edges[:, 0] - x) / ds - 0.5
    v_a = (edges[:, 1] - y) / ds - 0.5
    u_b = (edges[:, 2] - x) / ds - 0.5
    v_b = (edges[:, 3] - y) / ds - 0.5
    v_lo = np.minimum(v_a, v_b)
    v_hi = np.maximum(v_a, v_b)
    # An edge crosses row i when v_lo <= i < v_hi (half-open: vertices are never counted twice).
    r0 = np.maximum(np.ceil(v_lo), 0).astype(np.int64)
    r1 = np.minimum(np.ceil(v_hi), rows).astype(np.int64)
    n = np.maximum(r1 - r0, 0)
    keep = np.flatnonzero(n)
    if len(keep) == 0:
        return out
    n = n[keep]
    e = np.repeat(keep, n)
    row = _concat_ranges(r0[keep], r0[keep] + n)
    xs = u_a[e] + (row - v_a[e]) * (u_b[e] - u_a[e]) / (v_b[e] - v_a[e])
    winding = np.where(v_b[e] > v_a[e], 1, -1)
    order = np.lexsort((xs, row, owner[e]))
    xs, row, winding = xs[order], row[order], winding[order]
    # Crossings of one polygon on one row sum to zero, so a global running sum is each polygon's
    # winding number just right of each crossing; the interval up to the next crossing is inside
    # when it is non-zero (and the next crossing then belongs to the same polygon and row).
    inside = np.flatnonzero(np.cumsum(winding)[:-1] != 0)
    start = np.clip(np.ceil(xs[inside]), 0, cols).astype(np.int64)  # first centre j >= x_left
    stop = np.clip(np.ceil(xs[inside + 1]), 0, cols).astype(np.int64)  # first centre j >= x_right
    span = start < stop
    if not span.any():
        return out
    row, start, stop = row[inside][span], start[span], stop[span]
    diff = np.zeros((rows, cols + 1), dtype=np.int32)
    np.add.at(diff, (row, start), 1)
    np.add.at(diff, (row, stop), -1)
    np.cumsum(diff[:, :cols], axis=1, out=diff[:, :cols])
    return diff[:, :cols] > 0


@dataclass(eq=False)  # identity equality: lists of arrays have no truth value
class Annotations:
    """Tumor and exclusion polygons of one slide, in level-0 pixels.

    ``tumor`` and ``exclusion`` hold one ``(N, 2)`` float64 array of ``(x, y)`` vertices per
    polygon (closed implicitly: the last vertex joins the first). Tumor is the union of the tumor
    polygons minus the union of the exclusion polygons. Treat the lists as read-only once masks are
    drawn (a bounding-box index is built on first use and rebuilt only when the lists change).
    ``tumor_names`` / ``exclusion_names`` are the annotation names from the file, for messages.
    """

    tumor: list[np.ndarray]
    exclusion: list[np.ndarray] = field(default_factory=list)
    path: Path | None = None
    tumor_names: list[str] = field(default_factory=list)
    exclusion_names: list[str] = field(default_factory=list)
    _index: tuple[tuple[int, ...], _EdgeIndex, _EdgeIndex] | None = field(
        default=None, init=False, repr=False
    )

    def __post_init__(self) -> None:
        self.tumor = [_as_polygon(p, f"tumor polygon {i}") for i, p in enumerate(self.tumor)]
        self.exclusion = [
            _as_polygon(p, f"exclusion polygon {i}") for i, p in enumerate(self.exclusion)
        ]
        if self.path is not None:
            self.path = Path(self.path)

    def __repr__(self) -> str:
        n_tumor = sum(len(p) for p in self.tumor)
        return (
            f"Annotations(path={str(self.path)!r}, tumor={len(self.tumor)} polygons/{n_tumor} "
            f"vertices, exclusion={len(self.exclusion)} polygons, bounds={self.bounds()})"
        )

    @property
    def is_empty(self) -> bool:
        """True when there is no tumor polygon (every mask is all False)."""
        return not self.tumor

    def bounds(self) -> tuple[float, float, float, float] | None:
        """Bounding box ``(x0, y0, x1, y1)`` of the tumor polygons in level-0 px; None if empty.

        Only tumor polygons count: no mask pixel outside this box can be True.
        """
        if not self.tumor:
            return None
        b = self._edge_index()[1].bboxes
        return (
            float(b[:, 0].min()),
            float(b[:, 1].min()),
            float(b[:, 2].max()),
            float(b[:, 3].max()),
        )

    def mask(self, x: int, y: int, w: int, h: int, downsample: float = 1.0) -> np.ndarray:
        """Tumor-minus-exclusion mask of the level-0 region ``(x, y, w, h)`` at ``downsample``.

        Args:
            x, y: top-left corner of the region, level-0 px.
            w, h: size of the region, level-0 px.
            downsample: level-0 px per mask px (e.g. 32 for CAMELYON16 level 5).

        Returns:
            bool array of shape ``(ceil(h / downsample), ceil(w / downsample))``. Pixel ``(i, j)``
            is True when its centre, level-0 ``(x + (j + 0.5) * downsample,
            y + (i + 0.5) * downsample)``, lies inside a tumor polygon and inside no exclusion
            polygon (non-zero winding rule per polygon, as ASAP's own mask converter). A centre
            exactly on a polygon's left or top edge is inside, on its right or bottom edge outside.
        """
        for name, value in (("x", x), ("y", y), ("w", w), ("h", h)):
            validate.integer(
                name, value, unit="(level-0 px)", where="mask(): ", error=AnnotationError
            )
        if w <= 0 or h <= 0:
            raise AnnotationError(f"mask(): w and h must be positive (level-0 px), got {w} x {h}")
        ds = validate.number(
            "downsample",
            downsample,
            0,
            strict_minimum=True,
            where="mask(): ",
            error=AnnotationError,
        )
        return self._raster(float(x), float(y), math.ceil(h / ds), math.ceil(w / ds), ds)

    def _raster(self, x: float, y: float, rows: int, cols: int, ds: float) -> np.ndarray:
        """Mask of the grid of (rows, cols) pixels of size ds whose top-left corner is (x, y)."""
        _, tumor, exclusion = self._edge_index()
        out = np.zeros((rows, cols), dtype=bool)
        hit = tumor.select(x, y, x + cols * ds, y + rows * ds)
        if len(hit) == 0:
            return out
        # Draw only inside the window the selected tumor polygons can reach.
        b = tumor.bboxes[hit]
        c0 = max(0, math.floor((b[:, 0].min() - x) / ds))
        r0 = max(0, math.floor((b[:, 1].min() - y) / ds))
        c1 = min(cols, math.ceil((b[:, 2].max() - x) / ds) + 1)
        r1 = min(rows, math.ceil((b[:, 3].max() - y) / ds) + 1)
        if c0 >= c1 or r0 >= r1:
            return out
        wx, wy, wr, wc = x + c0 * ds, y + r0 * ds, r1 - r0, c1 - c0
        window = _scanline_fill(*tumor.edges_of(hit), wx, wy, ds, wr, wc)
        holes = exclusion.select(wx, wy, wx + wc * ds, wy + wr * ds)
        if len(holes) and window.any():
            window &= ~_scanline_fill(*exclusion.edges_of(holes), wx, wy, ds, wr, wc)
        out[r0:r1, c0:c1] = window
        return out

    def scaled(self, downsample: float) -> Annotations:
        """These polygons with every coordinate divided by ``downsample`` (a new object).

        ``downsample`` is the annotation frame's px per px of the slide file: 32 for CAMELYON16
        level-0 XML drawn on a file that holds only the level-5 page. 1 returns ``self``.
        """
        ds = validate.number(
            ANNOTATIONS_DOWNSAMPLE_KEY,
            downsample,
            0,
            strict_minimum=True,
            unit="(annotation px per slide px)",
            error=ConfigError,
        )
        if ds == 1:
            return self
        return Annotations(
            tumor=[p / ds for p in self.tumor],
            exclusion=[p / ds for p in self.exclusion],
            path=self.path,
            tumor_names=list(self.tumor_names),
            exclusion_names=list(self.exclusion_names),
        )

    def validate_within(
        self,
        width: int,
        height: int,
        path: str | Path | None = None,
        *,
        tolerance: float = 0.0,
        downsample: float = 1.0,
        key: str = ANNOTATIONS_DOWNSAMPLE_KEY,
    ) -> None:
        """Raise AnnotationError when a polygon reaches outside a ``width`` x ``height`` slide.

        Args:
            width, height: level-0 size of the slide, px.
            path: the slide, named in the message.
            tolerance: level-0 px a vertex may lie beyond the slide edge before it counts.
            downsample: the ``annotations_downsample`` these polygons were already divided by
                (named in the message).
            key: how the caller spells that setting (``--annotations-downsample`` on argparse).

        A polygon outside its slide usually means the XML belongs to another slide, or that its
        coordinates are in another frame (level-0 outlines on a file holding a lower level).
        """
        for kind, polygons, names in (
            ("tumor", self.tumor, self.tumor_names),
            ("exclusion", self.exclusion, self.exclusion_names),
        ):
            for i, p in enumerate(polygons):
                x0, y0 = p.min(axis=0)
                x1, y1 = p.max(axis=0)
                if (
                    x0 < -tolerance
                    or y0 < -tolerance
                    or x1 > width + tolerance
                    or y1 > height + tolerance
                ):
                    name = names[i] if i < len(names) else f"{kind} polygon {i}"
                    slide = f"slide {str(path)!r}" if path is not None else "the slide"
                    raise AnnotationError(
                        f"{self._where()}: {kind} annotation {name!r} has bounding box "
                        f"x {x0:g}..{x1:g}, y {y0:g}..{y1:g} (slide px, {key}={downsample:g}), "
                        f"outside {slide} of {width} x {height} px; is this the annotation file "
                        f"of another slide, or are its coordinates in another frame (level-0 "
                        f"outlines on a lower-level page: set {key} to annotation px per slide "
                        f"px, e.g. {key}={_suggest(x1 / max(width, 1), y1 / max(height, 1))})?"
                    )

    def _where(self) -> str:
        return str(self.path) if self.path is not None else "annotations"

    def _edge_index(self) -> tuple[tuple[int, ...], _EdgeIndex, _EdgeIndex]:
        key = (len(self.tumor), *map(id, self.tumor), -1, *map(id, self.exclusion))
        if self._index is None or self._index[0] != key:
            self._index = (key, _EdgeIndex.build(self.tumor), _EdgeIndex.build(self.exclusion))
        return self._index


def _suggest(over_x: float, over_y: float) -> str:
    """A power of two that brings a box ``over`` times the slide size inside it (message hint)."""
    over = max(over_x, over_y, 1.0)
    return f"{2 ** math.ceil(math.log2(over)):g}"


def read_downsample(value: object, key: str = "annotations_downsample") -> float:
    """Validate an ``annotations_downsample`` setting (> 0; None means 1); ConfigError names ``key``."""
    if value is None:
        return 1.0
    return float(
        validate.number(
            key,
            value,
            0,
            strict_minimum=True,
            unit="(annotation px per slide px)",
            error=ConfigError,
        )
    )


def _as_polygon(p: np.ndarray, name: str) -> np.ndarray:
    """A validated (N >= 3, 2) float64 array of finite level-0 (x, y) vertices."""
    a = np.asarray(p, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] != 2 or a.shape[0] < 3:
        raise AnnotationError(
            f"{name}: expected an (N, 2) array of (x, y) vertices with N >= 3, got shape {a.shape}"
        )
    if not np.isfinite(a).all():
        raise AnnotationError(f"{name}: vertices must be finite numbers, got {a[~np.isfinite(a)]}")
    return np.ascontiguousarray(a)


# --------------------------------------------------------------------------------------------------
# Reading and writing ASAP XML

ASAP_GROUP_KEYS = ("tumor_groups", "exclusion_groups", "ignored_groups")


@dataclass(frozen=True)
class AsapGroups:
    """How ASAP ``PartOfGroup`` names map to tumor / exclusion / ignored (the ``asap.*`` keys of
    ``conf/prepare.yaml``). With it, :func:`read_asap` refuses a group in none of the three
    (``ignored`` may be empty: every group must then be tumor or exclusion)."""

    tumor: tuple[str, ...] = TUMOR_GROUPS
    exclusion: tuple[str, ...] = EXCLUSION_GROUPS
    ignored: tuple[str, ...] = ()
    key: str = "asap"  # the config prefix named in messages

    def __post_init__(self) -> None:
        seen: dict[str, str] = {}
        for name, values in zip(ASAP_GROUP_KEYS, (self.tumor, self.exclusion, self.ignored)):
            if isinstance(values, str) or not all(isinstance(v, str) for v in values):
                raise ConfigError(
                    f"{self.key}.{name} must be a list of group names, got {values!r}"
                )
            for v in values:
                if v in seen and seen[v] != name:
                    raise ConfigError(
                        f"group {v!r} is in both {self.key}.{seen[v]} and {self.key}.{name}"
                    )
                seen[v] = name

    @classmethod
    def from_config(cls, cfg: Mapping[str, object] | None, key: str = "asap") -> AsapGroups:
        """From a ``{tumor_groups, exclusion_groups, ignored_groups}`` mapping (defaults for
        missing keys, null = none; unknown keys refused)."""
        cfg = dict(cfg or {})
        extra = sorted(set(cfg) - set(ASAP_GROUP_KEYS))
        if extra:
            raise ConfigError(f"{key} has unknown keys {extra} (expected {list(ASAP_GROUP_KEYS)})")

        def names(k: str, default: tuple[str, ...]) -> tuple[str, ...]:
            v = cfg.get(k, default)
            if v is None:
                return ()
            if isinstance(v, str) or not isinstance(v, Sequence):
                raise ConfigError(f"{key}.{k} must be a list of group names, got {v!r}")
            return tuple(v)  # type: ignore[arg-type]

        return cls(
            tumor=names("tumor_groups", TUMOR_GROUPS),
            exclusion=names("exclusion_groups", EXCLUSION_GROUPS),
            ignored=names("ignored_groups", ()),
            key=key,
        )

    @property
    def is_default(self) -> bool:
        """Whether this is the CAMELYON mapping (nothing ignored)."""
        return (self.tumor, self.exclusion, self.ignored) == (TUMOR_GROUPS, EXCLUSION_GROUPS, ())


def read_asap(
    path: str | Path,
    tumor_groups: Sequence[str] = TUMOR_GROUPS,
    exclusion_groups: Sequence[str] = EXCLUSION_GROUPS,
    *,
    groups: AsapGroups | None = None,
    slide: str | Path | None = None,
) -> Annotations:
    """Read an ASAP XML annotation file (CAMELYON16/17) into tumor and exclusion polygons.

    Args:
        path: the XML file.
        tumor_groups: ``PartOfGroup`` values whose annotations are tumor.
        exclusion_groups: ``PartOfGroup`` values whose annotations are cut out of the tumor.
        groups: the strict mapping (``prepare``'s ``asap.*`` keys; replaces ``tumor_groups``
            and ``exclusion_groups``): a group in none of its lists is an error, since its
            tumour would otherwise be labelled non-tumour.
        slide: the slide the file annotates, named in the messages.

    Polygon, Rectangle and Spline annotations enclose an area and become polygons. A Spline is
    taken as the polygon through its vertices, without curve interpolation, as ASAP's own
    annotation-to-mask converter does (CAMELYON's reference masks were made that way). Dot,
    Measurement and PointSet annotations enclose no area and are skipped (counted in a debug log).
    Without ``groups``, annotations of other groups are skipped with one warning that names
    those groups; with ``groups``, those of ``groups.ignored`` are skipped. Vertices are
    sorted by their ``Order`` attribute; a decimal comma (``"12,5"``, written by some ASAP builds)
    is accepted.

    Raises:
        AnnotationError: the file is missing or unreadable, is not XML, declares entities or
            external references (refused: billion-laughs and XXE), has no ``Annotations`` element,
            or an area annotation has a non-numeric coordinate, an unknown type or fewer than 3
            vertices; with ``groups``, a group it does not map. The message names the file and
            the annotation (or the slide, the groups found and the config keys).
    """
    path = Path(path)
    if groups is not None:
        tumor_groups, exclusion_groups = groups.tumor, groups.exclusion
    tumor_set, exclusion_set = set(tumor_groups), set(exclusion_groups)
    both = tumor_set & exclusion_set
    if both:
        raise AnnotationError(
            f"read_asap({str(path)!r}): groups {sorted(both)} are in both tumor_groups "
            f"{tuple(tumor_groups)} and exclusion_groups {tuple(exclusion_groups)}"
        )
    root = _parse_xml(path)
    container = root if root.tag == "Annotations" else root.find("Annotations")
    if container is None:
        raise AnnotationError(
            f"{path}: no <Annotations> element under <{root.tag}>; "
            "expected an ASAP file <ASAP_Annotations><Annotations><Annotation ...>"
        )
    ann = Annotations(tumor=[], exclusion=[], path=path)
    other_groups: Counter[str] = Counter()
    pointlike: Counter[str] = Counter()
    for k, element in enumerate(container.iter("Annotation")):
        name = element.get("Name") or f"#{k}"
        group = element.get("PartOfGroup") or "None"
        if group in tumor_set:
            polygons, names = ann.tumor, ann.tumor_names
        elif group in exclusion_set:
            polygons, names = ann.exclusion, ann.exclusion_names
        else:
            other_groups[group] += 1
            continue
        kind = (element.get("Type") or "").strip()
        if kind.lower() in POINT_TYPES:
            pointlike[kind] += 1
            continue
        if kind.lower() not in AREA_TYPES:
            raise AnnotationError(
                f"{path}: annotation {name!r} has Type={kind!r}; expected one of Polygon, "
                "Rectangle, Spline (areas) or Dot, Measurement, PointSet (skipped)"
            )
        polygons.append(_read_vertices(element, path, name))
        names.append(name)
    if other_groups and groups is not None:
        unknown = sorted(set(other_groups) - set(groups.ignored))
        if unknown:
            found = Counter(e.get("PartOfGroup") or "None" for e in container.iter("Annotation"))
            prefix = groups.key
            raise AnnotationError(
                f"{path}" + (f" (slide {slide})" if slide is not None else "")
                + f": annotation group(s) {unknown} are not mapped; groups found: "
                + ", ".join(f"{g!r} ({n})" for g, n in sorted(found.items()))
                + f". Map each group with {prefix}.tumor_groups {list(groups.tumor)}, "
                f"{prefix}.exclusion_groups {list(groups.exclusion)} or {prefix}.ignored_groups "
                f"{list(groups.ignored)} (conf/prepare.yaml; e.g. {prefix}.tumor_groups="
                f"[{','.join([*groups.tumor, unknown[0]])}])"
            )  # fmt: skip
    elif other_groups:
        listed = ", ".join(f"{g!r} ({n})" for g, n in sorted(other_groups.items()))
        log.warning(
            "%s: ignored %d annotation(s) in groups that are neither tumor %s nor exclusion %s: %s",
            path,
            sum(other_groups.values()),
            tuple(tumor_groups),
            tuple(exclusion_groups),
            listed,
        )
    if pointlike:
        log.debug(
            "%s: skipped annotations that enclose no area: %s",
            path,
            dict(sorted(pointlike.items())),
        )
    log.debug("%s", ann)
    return ann


def _parse_xml(path: Path) -> StdET.Element:
    try:
        return SafeET.parse(path).getroot()
    except FileNotFoundError as e:
        raise AnnotationError(f"{path}: annotation file not found") from e
    except OSError as e:
        raise AnnotationError(f"{path}: cannot read annotation file: {e}") from e
    except defusedxml.DefusedXmlException as e:
        raise AnnotationError(
            f"{path}: refused unsafe XML ({type(e).__name__}: {e}); ASAP files declare no "
            "entities, DTDs or external references"
        ) from e
    except StdET.ParseError as e:
        raise AnnotationError(f"{path}: not well-formed XML: {e}") from e


def _read_vertices(element: StdET.Element, path: Path, name: str) -> np.ndarray:
    """(N, 2) float64 vertices of one area annotation, sorted by Order."""
    vertices: list[tuple[float, float, float]] = []
    for k, c in enumerate(element.iter("Coordinate")):
        order_text = c.get("Order")
        order = _number(order_text, path, name, "Order") if order_text is not None else float(k)
        vertices.append(
            (order, _number(c.get("X"), path, name, "X"), _number(c.get("Y"), path, name, "Y"))
        )
    if len(vertices) < 3:
        raise AnnotationError(
            f"{path}: annotation {name!r} ({element.get('Type')}) has {len(vertices)} vertices; "
            "an area annotation needs at least 3"
        )
    vertices.sort(key=lambda v: v[0])  # stable: equal orders keep file order
    return np.array([v[1:] for v in vertices], dtype=np.float64)


def _number(text: str | None, path: Path, name: str, attribute: str) -> float:
    if text is None:
        raise AnnotationError(f"{path}: annotation {name!r} has a Coordinate without {attribute}")
    s = text.strip()
    if "," in s and "." not in s:
        s = s.replace(",", ".")  # decimal comma, as some ASAP builds write under some locales
    try:
        value = float(s)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise AnnotationError(
            f"{path}: annotation {name!r} has {attribute}={text!r}; expected a finite number"
        )
    return value


def write_asap(
    path: str | Path, tumor: Sequence[np.ndarray], exclusion: Sequence[np.ndarray] = ()
) -> None:
    """Write polygons as an ASAP XML file: tumor in group ``_0``, exclusion in group ``_2``.

    Args:
        path: the XML file to write (parent folders are created). Written to a temporary file in
            the same folder and renamed, so a reader never sees a half-written file.
        tumor: ``(N, 2)`` arrays of ``(x, y)`` vertices in level-0 px, N >= 3.
        exclusion: same, for regions inside tumor outlines that are not tumor.

    Annotations are named ``Annotation 0``, ``Annotation 1``, ... (tumor first); coordinates are
    written exactly (shortest round-trip decimal), so :func:`read_asap` gives back the same arrays.
    """
    path = Path(path)
    polygons = [
        (_as_polygon(p, f"tumor polygon {i}"), WRITE_TUMOR_GROUP) for i, p in enumerate(tumor)
    ]
    polygons += [
        (_as_polygon(p, f"exclusion polygon {i}"), WRITE_EXCLUSION_GROUP)
        for i, p in enumerate(exclusion)
    ]
    root = StdET.Element("ASAP_Annotations")
    annotations = StdET.SubElement(root, "Annotations")
    for k, (polygon, group) in enumerate(polygons):
        a = StdET.SubElement(
            annotations,
            "Annotation",
            Name=f"Annotation {k}",
            Type="Polygon",
            PartOfGroup=group,
            Color="#F4FA58",
        )
        coordinates = StdET.SubElement(a, "Coordinates")
        for order, (vx, vy) in enumerate(polygon):
            StdET.SubElement(coordinates, "Coordinate", Order=str(order), X=_fmt(vx), Y=_fmt(vy))
    groups = StdET.SubElement(root, "AnnotationGroups")
    for group, color in ((WRITE_TUMOR_GROUP, "#FF0000"), (WRITE_EXCLUSION_GROUP, "#00FF00")):
        g = StdET.SubElement(groups, "Group", Name=group, PartOfGroup="None", Color=color)
        StdET.SubElement(g, "Attributes")
    StdET.indent(root, space="\t")
    data = b'<?xml version="1.0"?>\n' + StdET.tostring(root, encoding="utf-8") + b"\n"
    _atomic_write(path, data)


def _fmt(v: float) -> str:
    return np.format_float_positional(float(v), trim="-")


def _atomic_write(path: Path, data: bytes) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_bytes(path, data)
    except OSError as e:
        raise AnnotationError(f"{path}: cannot write annotation file: {e}") from e


# --------------------------------------------------------------------------------------------------
# Command line: XML -> pyramidal mask TIFF


def to_mask(
    slide_path: str | Path,
    xml_path: str | Path,
    out_path: str | Path,
    level: int = 0,
    *,
    band_pixels: int = BAND_PIXELS,
    annotations_downsample: float = 1.0,
    downsample_key: str = ANNOTATIONS_DOWNSAMPLE_KEY,
) -> Path:
    """Write the tumor mask of a slide's annotations as a pyramidal 0/255 TIFF.

    Args:
        slide_path: the slide (any format :func:`lymphnode.wsi.slide.open_slide` opens).
        xml_path: its ASAP XML annotations (default CAMELYON groups).
        out_path: the mask TIFF; level 0 of the mask has the size of ``level`` of the slide and
            mpp = slide mpp x that level's downsample (no mpp when the slide has none).
        level: slide level whose pixel grid the mask uses.
        band_pixels: mask pixels rasterized at a time; the mask itself goes to a memory-mapped
            temporary file beside ``out_path``, so memory stays bounded for level-0 masks.
        annotations_downsample: the XML's px per px of this slide file; its coordinates are
            divided by it (32 for CAMELYON16 level-0 XML on a file holding the level-5 page).
        downsample_key: how the caller spells that setting, named in the bounds error.

    Mask pixel ``(i, j)`` is 255 when its centre, level-0 ``((j + 0.5) d, (i + 0.5) d)`` with ``d``
    the level downsample, is tumor (see :meth:`Annotations.mask`). Returns ``out_path``.

    Raises:
        AnnotationError: malformed XML or an annotation outside the slide.
        SlideError: the slide cannot be opened or has no such level.
    """
    from lymphnode.wsi.pyramid import write_pyramid  # pyramid and slide pull in tifffile/openslide
    from lymphnode.wsi.slide import open_slide

    out_path = Path(out_path)
    ds_annotations = read_downsample(annotations_downsample, downsample_key)
    annotations = read_asap(xml_path).scaled(ds_annotations)
    with open_slide(slide_path) as slide:
        if isinstance(level, bool) or not 0 <= level < slide.level_count:
            raise SlideError(
                f"{slide_path}: level {level!r} requested, the slide has levels "
                f"0-{slide.level_count - 1}"
            )
        width, height = slide.level_dimensions[level]
        ds = float(slide.level_downsamples[level])
        slide_width, slide_height = slide.dimensions
        annotations.validate_within(
            slide_width, slide_height, slide_path, downsample=ds_annotations, key=downsample_key
        )
        mpp = slide.mpp * ds if slide.mpp is not None else None
    if annotations.is_empty:
        log.warning("%s: no tumor annotation; the mask of %s is empty", xml_path, slide_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    rows_per_band = max(1, band_pixels // max(width, 1))
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=f".{out_path.name}.") as tmp:
        pixels = np.memmap(Path(tmp) / "mask.u8", dtype=np.uint8, mode="w+", shape=(height, width))
        for r in range(0, height, rows_per_band):
            n = min(rows_per_band, height - r)
            band = annotations._raster(0.0, r * ds, n, width, ds)  # (n, width) bool
            pixels[r : r + n] = band.view(np.uint8) * np.uint8(255)
        pixels.flush()
        write_pyramid(
            out_path,
            pixels,
            mpp=mpp,
            mask=True,
            description=f"lymphnode tumor mask of {Path(slide_path).name} from "
            f"{Path(xml_path).name}, slide level {level} (downsample {ds:g})",
        )
        del pixels
    log.info(
        "wrote %s: %d x %d px mask (slide level %d, downsample %g, mpp %s)",
        out_path,
        width,
        height,
        level,
        ds,
        mpp,
    )
    return out_path
