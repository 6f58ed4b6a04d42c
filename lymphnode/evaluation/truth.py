"""Which slides are tumor, and where: the reference list, each slide's ASAP XML and tumor mask.

A slide with ``<slide>.xml`` in the annotations folder is a tumor slide; a slide without one must
be known normal, either from ``reference`` (CAMELYON16's ``reference.csv``: name, Tumor|Normal, ...)
or from its name (``normal_*``). Anything else is an error, not a silent normal.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from lymphnode.core.errors import EvaluationError
from lymphnode.inference.heatmap import Heatmap
from lymphnode.wsi.annotations import read_asap


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


def slide_truth(
    slide: str, annotations_dir: Path, reference: dict[str, bool] | None
) -> Path | None:
    """The slide's XML in ``annotations_dir``, None for a known-normal slide.

    ``reference`` is :func:`read_reference`'s {slide: is_tumor} or None; an
    :class:`~lymphnode.core.errors.EvaluationError` when the truth cannot be established or the
    reference and the annotations disagree.
    """
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


def tumor_mask(
    heatmap: Heatmap, xml: Path | None, annotations_downsample: float = 1.0
) -> np.ndarray:
    """The slide's tumor mask (bool (H, W)) on the heatmap's grid: ``xml``'s outlines (level-0 px
    after dividing by ``annotations_downsample``) minus its exclusion regions, rasterised at the
    heatmap's downsample; all False for a normal slide (``xml`` None).

    Raises AnnotationError when an outline lies outside the slide (wrong file or wrong frame),
    rather than scoring a tumor slide with no lesion."""
    shape = heatmap.probabilities.shape
    if xml is None:
        return np.zeros(shape, dtype=bool)
    annotations = read_asap(xml).scaled(annotations_downsample)
    w0, h0 = heatmap.level0_size
    annotations.validate_within(
        w0, h0, path=f"{heatmap.slide} (from its heatmap)", downsample=annotations_downsample
    )
    mask = annotations.mask(0, 0, w0, h0, downsample=heatmap.downsample)
    if mask.shape != shape:
        raise EvaluationError(
            f"heatmap of {heatmap.slide} has shape {shape} but the slide size {w0}x{h0} at "
            f"downsample {heatmap.downsample:g} gives {mask.shape}; heatmap and slide do not match"
        )
    return mask
