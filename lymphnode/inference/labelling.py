"""The patches worth labelling next (what ``python -m lymphnode.select`` runs).

Given a fine-tuned checkpoint and slides:

1. candidates: per slide, the tissue tiles of the checkpoint's read level and patch size (the grid
   and tissue mask of ``infer``: :func:`lymphnode.inference.grid.plan_slide`), less those that
   overlap an already-labeled square (``exclude``);
2. each candidate is scored by the model's uncertainty (:mod:`lymphnode.inference.uncertainty`:
   ``tta``, ``entropy`` or ``tta_entropy``), the forward passes batched as in ``infer``;
3. the top ``k`` are chosen greedily, spread out and capped per slide
   (:func:`lymphnode.inference.selection.select_spread`);
4. :func:`write_selection` writes ``<out_dir>/<slide>.geojson`` per slide (a QuPath
   FeatureCollection of squares to annotate: objectType ``annotation``, class ``To label``,
   measurements ``Rank`` and ``Score``; an empty collection for a slide with none chosen) and
   ``<out_dir>/selection.csv`` (``rank, slide, x, y, size, score``).

Everything is computed before anything is written, and every file is written atomically, so bad
input (a missing slide, a checkpoint without probabilities, k too large, a slide without tissue)
leaves ``out_dir`` as it was.

Coordinates: level-0 px; ``x, y`` the square's top-left corner, ``size`` its side, as OpenSlide and
QuPath.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import shapely
import torch

from lymphnode.core import atomic, validate
from lymphnode.core.errors import (
    CheckpointError,
    ConfigError,
    LymphnodeError,
    SlideError,
    TissueError,
)
from lymphnode.inference.grid import TileDataset, plan_slide, tile_loader
from lymphnode.inference.predict import adapted_to
from lymphnode.inference.resolution import for_slide
from lymphnode.inference.selection import overlaps_any, select_spread
from lymphnode.inference.settings import InferenceSettings
from lymphnode.inference.uncertainty import SCORES, tile_scores
from lymphnode.models.preprocess import Preprocess
from lymphnode.patches.format import MANIFEST_NAME
from lymphnode.wsi.geojson import polygon_feature, read_features, write_geojson
from lymphnode.wsi.slide import Slide, open_slide
from lymphnode.wsi.tissue import tissue_mask

log = logging.getLogger(__name__)

CSV_NAME = "selection.csv"
CSV_COLUMNS = ("rank", "slide", "x", "y", "size", "score")
TO_LABEL_CLASS = "To label"
TO_LABEL_COLOR = (250, 200, 0)  # amber: stands out beside QuPath's red Tumor


@dataclass(frozen=True)
class SelectSettings:
    """What to select.

    k: patches in all (>= 1).
    score: ``tta`` | ``entropy`` | ``tta_entropy`` (:mod:`lymphnode.inference.uncertainty`).
    min_distance: level-0 px; no two chosen patches of a slide closer than this, centre to centre,
        Chebyshev (None: one patch side, i.e. chosen squares never overlap; 0: no spacing).
    per_slide_cap: at most this many patches per slide (None: no cap).
    allow_fewer: when spacing and cap leave fewer than k, write those instead of failing (k larger
        than the candidates always fails).
    class_name, color: the QuPath classification of the squares (``[r, g, b]`` 0..255).
    """

    k: int
    score: str = "tta"
    min_distance: float | None = None
    per_slide_cap: int | None = None
    allow_fewer: bool = False
    class_name: str = TO_LABEL_CLASS
    color: tuple[int, int, int] = TO_LABEL_COLOR

    def __post_init__(self) -> None:
        validate.integer("k", self.k, 1)
        validate.choice("score", self.score, SCORES)
        if self.min_distance is not None:
            validate.number("min_distance", self.min_distance, 0, unit="level-0 px (or null)")
        if self.per_slide_cap is not None:
            validate.integer("per_slide_cap", self.per_slide_cap, 1)
        rgb = list(self.color)
        if len(rgb) != 3 or not all(
            isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in rgb
        ):
            raise ConfigError(f"color must be [r, g, b] integers in 0..255, got {rgb!r}")


@dataclass(frozen=True)
class SelectedPatch:
    """One square to label: ``rank`` (1 = most uncertain), its slide (file stem), level-0
    top-left ``(x, y)`` and side ``size`` in px, and its uncertainty ``score``."""

    rank: int
    slide: str
    x: int
    y: int
    size: int
    score: float

    @property
    def square(self) -> shapely.Polygon:
        """The square in level-0 px."""
        return shapely.box(self.x, self.y, self.x + self.size, self.y + self.size)


@dataclass(frozen=True)
class Selection:
    """The chosen patches (best first), every slide that was searched (file stems, in order), how
    many candidates there were per slide, and the score used."""

    patches: list[SelectedPatch]
    slides: list[str]
    candidates: dict[str, int]
    score: str


def check_probabilities(task: torch.nn.Module, patch_size: int, checkpoint: str | Path) -> None:
    """CheckpointError unless ``task`` predicts tumour probabilities (a pretext task does not),
    tried on one blank tile of ``patch_size`` px."""
    device = next(task.parameters()).device
    try:
        with torch.inference_mode():
            task.probabilities(torch.zeros(1, 3, patch_size, patch_size, device=device))  # type: ignore[operator]
    except LymphnodeError as exc:
        raise CheckpointError(
            f"checkpoint {checkpoint} cannot rank patches: {exc} (select needs a fine-tuned "
            "checkpoint, not one of pretraining)"
        ) from exc


def excluded_regions(
    exclude: Sequence[str | Path], slide: Slide, names: Sequence[str]
) -> list[shapely.Geometry]:
    """Already-labeled areas of ``slide`` (level-0 px) from each entry of ``exclude``:

    - a patch cache (a folder with ``manifest.json``): the squares of its patches of this slide
      (patch side × the downsample of the level they were read at; patches of unknown position
      are left out, with a warning);
    - a folder of ``<slide>.geojson``: the polygons of that file's annotation objects, any class
      (e.g. a previous ``select`` output, or QuPath's export of the annotated squares);
    - a ``<slide>.geojson`` file: the same, for the slide its name names (``names``: the stems of
      all slides of the run; a file named after none of them is refused).
    """
    from lymphnode.patches.reader import PatchCache

    name = slide.path.stem
    regions: list[shapely.Geometry] = []
    for entry in exclude:
        path = Path(entry)
        if (path / MANIFEST_NAME).is_file():
            cache = PatchCache(path)
            rows = cache.index[cache.index["slide"] == name]
            unknown = int(((rows["x"] < 0) | (rows["y"] < 0)).sum())
            if unknown:
                log.warning("exclude=%s: %d patches of %s have no position", path, unknown, name)
            for x, y, level in zip(rows["x"].tolist(), rows["y"].tolist(), rows["level"].tolist()):
                if x < 0 or y < 0:
                    continue
                if level >= slide.level_count:
                    raise ConfigError(
                        f"exclude={path}: patches of {name} were read at level {level} but "
                        f"{slide.path} has levels 0-{slide.level_count - 1}"
                    )
                side = cache.patch_size * slide.level_downsamples[level]
                regions.append(shapely.box(x, y, x + side, y + side))
        elif path.is_dir():
            if (path / f"{name}.geojson").is_file():
                regions += _annotation_polygons(path / f"{name}.geojson")
        elif path.suffix.lower() == ".geojson" and path.is_file():
            stem = path.name.split(".")[0]
            if stem not in names:
                raise ConfigError(
                    f"exclude={path}: the file is named after no slide of this run "
                    f"({', '.join(names)}); expected <slide>.geojson"
                )
            if stem == name:
                regions += _annotation_polygons(path)
        else:
            raise ConfigError(
                f"exclude={path} is neither a patch cache, a folder of <slide>.geojson nor a "
                "<slide>.geojson file"
            )
    return regions


def _annotation_polygons(path: Path) -> list[shapely.Geometry]:
    return [
        f.geometry
        for f in read_features(path)
        if f.object_type == "annotation" and f.geometry.geom_type in ("Polygon", "MultiPolygon")
    ]


def candidate_tiles(
    slide: Slide,
    preprocess: Preprocess,
    settings: InferenceSettings,
    *,
    exclude: Sequence[str | Path] = (),
    names: Sequence[str] = (),
) -> tuple[np.ndarray, int]:
    """The candidate patches of ``slide``: the level-0 top-left corners (N, 2) of its tissue tiles
    (``infer``'s grid at the contract's read level, tile side ``settings.patch_size`` or the
    contract's, step ``settings.stride``, at least ``settings.min_tissue_fraction`` tissue) that
    overlap no region of :func:`excluded_regions`, and the tile side in level-0 px.

    Raises:
        TissueError: no tissue, or no tissue tile (before the exclusion).
    """
    patch_size = settings.patch_size or preprocess.patch_size
    tissue = tissue_mask(slide)  # TissueError when blank
    plan = plan_slide(
        slide, tissue, patch_size=patch_size, level=preprocess.level, settings=settings
    )
    if len(plan.corners) == 0:
        raise TissueError(
            f"slide {slide.path} has no tile of {patch_size} px with tissue fraction >= "
            f"{settings.min_tissue_fraction} (min_tissue_fraction): no candidate patch"
        )
    side = round(patch_size * plan.level_downsample)
    regions = excluded_regions(exclude, slide, names or [slide.path.stem])
    keep = ~overlaps_any(plan.corners, side, regions)
    if not keep.all():
        log.info(
            "%s: %d of %d tissue tiles already labeled (exclude)",
            slide.path.stem, int((~keep).sum()), len(keep),
        )  # fmt: skip
    return plan.corners[keep], side


def score_candidates(
    model: torch.nn.Module,
    preprocess: Preprocess,
    slide: Slide,
    corners: np.ndarray,
    *,
    score: str,
    settings: InferenceSettings,
    progress: bool = False,
) -> np.ndarray:
    """Uncertainty ``score`` (N,) of the tiles of ``slide`` at level-0 top-left ``corners``
    (N, 2), read and normalised by ``preprocess``, in batches of ``settings.batch_size``."""
    from tqdm import tqdm

    if len(corners) == 0:
        return np.empty(0, np.float64)
    patch_size = settings.patch_size or preprocess.patch_size
    dataset = TileDataset(slide, corners, preprocess, patch_size)
    bar = tqdm(total=len(dataset), desc=slide.path.stem, unit="tile", disable=not progress,
               leave=False)  # fmt: skip
    with adapted_to(model, dataset, preprocess, settings, slide.path.stem):
        _, scores = tile_scores(  # in the order of ``corners`` (the loader does not shuffle)
            model, tile_loader(dataset, settings), preprocess=preprocess, settings=settings,
            score=score, on_batch=bar.update,
        )  # fmt: skip
    bar.close()
    return scores


def select_patches(
    checkpoint: str | Path,
    slides: Sequence[str | Path],
    settings: SelectSettings,
    *,
    inference: InferenceSettings | None = None,
    exclude: Sequence[str | Path] = (),
    progress: bool = True,
    trusted_modules: Sequence[str] = (),
    slide_mpp: float | None = None,
) -> Selection:
    """Rank the tissue tiles of ``slides`` by the uncertainty of the checkpoint's model and choose
    ``settings.k`` of them (see the module docstring). Nothing is written. The candidates of every
    slide are found (and ``k`` checked against them) before any tile is scored. Each slide is read
    at the level of the µm/px the checkpoint records (:mod:`lymphnode.inference.resolution`);
    ``slide_mpp`` is the level-0 µm/px of slides that do not record it.

    Raises:
        SlideError: a slide is missing or unreadable (checked before the model is loaded).
        CheckpointError: not a lymphnode checkpoint, or one whose task predicts no probabilities.
        TissueError: a slide without tissue tiles.
        ConfigError: bad settings, ``k`` larger than the candidates, fewer reachable than ``k``
            (unless ``allow_fewer``), a bad ``exclude`` entry.

    ``trusted_modules``: modules besides lymphnode's own whose classes the checkpoint may name
    (:mod:`lymphnode.models.allowlist`).
    """
    from lymphnode.models.checkpoint import load_inference_model

    inference = inference or InferenceSettings()
    paths = [Path(p) for p in slides]
    if not paths:
        raise ConfigError("slides names no slide")
    for p in paths:
        if not p.is_file():
            raise SlideError(f"slide not found: {p} (no such file)")
    names = [p.stem for p in paths]
    model = load_inference_model(checkpoint, trusted_modules=trusted_modules)  # CheckpointError
    check_probabilities(model.task, inference.patch_size or model.patch_size, checkpoint)

    corners: list[np.ndarray] = []
    sides: list[int] = []
    for path in paths:
        with open_slide(path) as slide:
            if slide.mpp is None:  # the file's own value wins
                slide.mpp = slide_mpp
            c, side = candidate_tiles(
                slide, for_slide(model.preprocess, slide), inference, exclude=exclude, names=names
            )
        corners.append(c)
        sides.append(side)
    counts = {name: len(c) for name, c in zip(names, corners)}
    total = sum(counts.values())
    if settings.k > total:  # before the forward passes
        raise ConfigError(
            f"k={settings.k} is larger than the {total} candidate patches of {len(paths)} slide(s) "
            f"({', '.join(f'{n}: {c}' for n, c in counts.items())}); expected k <= {total}: "
            "lower k, or give more slides"
        )
    scores = []
    for path, c in zip(paths, corners):
        with open_slide(path) as slide:
            if slide.mpp is None:
                slide.mpp = slide_mpp
            s = score_candidates(
                model.task, for_slide(model.preprocess, slide), slide, c, score=settings.score,
                settings=inference, progress=progress,
            )  # fmt: skip
        scores.append(s)
        if len(s):
            log.info("%s: %d candidates, max %s %.4f", path.stem, len(s), settings.score, s.max())
    ids = np.concatenate([np.full(len(c), i, np.int64) for i, c in enumerate(corners)])
    xy = np.concatenate(corners).reshape(-1, 2)
    size = np.concatenate([np.full(len(c), side, np.int64) for c, side in zip(corners, sides)])
    score = np.concatenate(scores)
    min_distance = settings.min_distance
    if min_distance is None:  # one patch side
        min_distance = float(max(sides))
    chosen = select_spread(
        score, ids, xy + size[:, None] / 2.0, settings.k, min_distance=min_distance,
        per_slide_cap=settings.per_slide_cap, allow_fewer=settings.allow_fewer,
    )  # fmt: skip
    patches = [
        SelectedPatch(
            rank=r + 1,
            slide=names[int(ids[i])],
            x=int(xy[i, 0]),
            y=int(xy[i, 1]),
            size=int(size[i]),
            score=float(score[i]),
        )
        for r, i in enumerate(chosen.tolist())
    ]
    return Selection(patches=patches, slides=names, candidates=counts, score=settings.score)


def selection_features(
    patches: Sequence[SelectedPatch],
    *,
    score: str,
    class_name: str = TO_LABEL_CLASS,
    color: Sequence[int] = TO_LABEL_COLOR,
) -> list[dict]:
    """QuPath Features (squares, level-0 px, objectType annotation) of ``patches``."""
    return [
        polygon_feature(
            p.square,
            name=f"{class_name} #{p.rank} ({score} {p.score:.3f})",
            id_seed=f"select:{p.slide}:{p.x}:{p.y}:{p.size}",
            object_type="annotation",
            class_name=class_name,
            color=color,
            measurements={"Rank": p.rank, "Score": p.score},
        )
        for p in patches
    ]


def write_selection(
    out_dir: str | Path,
    selection: Selection,
    *,
    class_name: str = TO_LABEL_CLASS,
    color: Sequence[int] = TO_LABEL_COLOR,
) -> list[Path]:
    """Write ``<out_dir>/<slide>.geojson`` for every slide searched (empty FeatureCollection when
    none of its patches was chosen) and ``<out_dir>/selection.csv``; returns the paths. Every
    file is built in memory first and written atomically."""
    out = Path(out_dir)
    collections = {
        name: selection_features(
            [p for p in selection.patches if p.slide == name],
            score=selection.score,
            class_name=class_name,
            color=color,
        )
        for name in selection.slides
    }
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for p in selection.patches:
        writer.writerow([p.rank, p.slide, p.x, p.y, p.size, repr(p.score)])
    out.mkdir(parents=True, exist_ok=True)
    written = [write_geojson(out / f"{name}.geojson", feats) for name, feats in collections.items()]
    atomic.write_text(out / CSV_NAME, buffer.getvalue())
    return [*written, out / CSV_NAME]


def read_selection(path: str | Path) -> list[SelectedPatch]:
    """The patches of a ``selection.csv`` (what an active-learning loop hands its annotator)."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except OSError as exc:
        raise ConfigError(f"cannot read selection {path}: {exc}") from exc
    try:
        return [
            SelectedPatch(
                rank=int(r["rank"]),
                slide=r["slide"],
                x=int(r["x"]),
                y=int(r["y"]),
                size=int(r["size"]),
                score=float(r["score"]),
            )
            for r in rows
        ]
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(
            f"{path} is not a selection CSV (expected columns {', '.join(CSV_COLUMNS)}): {exc}"
        ) from exc


__all__ = [
    "CSV_COLUMNS",
    "CSV_NAME",
    "TO_LABEL_CLASS",
    "TO_LABEL_COLOR",
    "SelectSettings",
    "SelectedPatch",
    "Selection",
    "candidate_tiles",
    "check_probabilities",
    "excluded_regions",
    "read_selection",
    "score_candidates",
    "select_patches",
    "selection_features",
    "write_selection",
]
