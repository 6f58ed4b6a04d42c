"""One synthetic slide: :func:`make_slide` draws it and writes the pyramidal TIFF (+ ASAP XML)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lymphnode.core import validate
from lymphnode.core.errors import ConfigError
from lymphnode.synthetic.layout import make_layout
from lymphnode.synthetic.render import render
from lymphnode.synthetic.style import CAMELYON_MPP, SlideStyle
from lymphnode.wsi.annotations import write_asap
from lymphnode.wsi.pyramid import write_pyramid

log = logging.getLogger(__name__)

#: Bump when the rendering changes, so that a rerun over slides made by an older generator refuses.
GENERATOR_VERSION = 1
MIN_SIDE = 512  # px; smaller slides leave no room for lobes, fat and lesions

__all__ = ["GENERATOR_VERSION", "MIN_SIDE", "SynthSlide", "make_slide"]


@dataclass
class SynthSlide:
    """What :func:`make_slide` wrote.

    Attributes:
        path: the pyramidal TIFF.
        annotation_path: the ASAP XML (tumor slides), else None.
        size: level-0 ``(width, height)`` px.
        seed: the seed it was drawn from.
        tumor: lesion outlines, ``(N, 2)`` float64 ``(x, y)`` level-0 px.
        exclusion: normal islands inside lesions, same format.
        style: the slide's stain and scanner.
        tissue_fraction: tissue area / slide area.
        tumor_fraction: tumor (minus exclusion) area / tissue area.
        seconds: wall time to make it.
    """

    path: Path
    annotation_path: Path | None
    size: tuple[int, int]
    seed: int
    tumor: list[np.ndarray]
    exclusion: list[np.ndarray]
    style: SlideStyle
    tissue_fraction: float
    tumor_fraction: float
    seconds: float = field(default=0.0)


def _resolve_size(
    size: tuple[int, int] | None, width: int | None, height: int | None
) -> tuple[int, int]:
    if size is not None and (width is not None or height is not None):
        raise ConfigError("make_slide: give either size=(width, height) or width= and height=")
    if size is None:
        if width is None or height is None:
            raise ConfigError("make_slide: size=(width, height) or both width= and height= needed")
        size = (width, height)
    w, h = size
    where = "make_slide: "
    return (
        validate.integer("width", w, minimum=MIN_SIDE, unit="px", where=where),
        validate.integer("height", h, minimum=MIN_SIDE, unit="px", where=where),
    )


def make_slide(
    path: str | Path,
    *,
    seed: int,
    tumor: bool,
    size: tuple[int, int] | None = None,
    width: int | None = None,
    height: int | None = None,
    mpp: float = CAMELYON_MPP,
    annotation_path: str | Path | None = None,
    style: SlideStyle | None = None,
    tile_size: int = 256,
) -> SynthSlide:
    """Draw one synthetic H&E lymph-node slide and write it as a pyramidal TIFF (+ ASAP XML).

    Args:
        path: the ``.tif`` to write (atomically; parent folders are created).
        seed: everything is drawn from it; the same arguments give the same bytes.
        tumor: draw metastases and write their outlines to ``annotation_path``.
        size: level-0 ``(width, height)`` px; or give ``width`` and ``height``. At least 512 px.
        mpp: µm per level-0 pixel (CAMELYON16: 0.243); nuclei and fat keep their size in µm.
        annotation_path: the ASAP XML of a tumor slide; default ``path`` with suffix ``.xml``.
        style: stain/scanner appearance; default drawn from ``seed``.
        tile_size: TIFF tile side in px.

    Returns:
        :class:`SynthSlide` with the outlines (level-0 px), style and tissue/tumor fractions.

    Raises:
        ConfigError: bad size, mpp or seed.
    """
    t0 = time.perf_counter()
    path = Path(path)
    w, h = _resolve_size(size, width, height)
    mpp = validate.number("mpp", mpp, 0.05, 5, unit="µm/px", where="make_slide: ")
    seed = validate.integer("seed", seed, minimum=0, where="make_slide: ")
    style_seed, layout_seed = np.random.SeedSequence(seed).spawn(2)
    rng = np.random.default_rng(layout_seed)  # the layout does not depend on the style given
    style = style if style is not None else SlideStyle.sample(np.random.default_rng(style_seed))
    layout = make_layout(rng, w, h, float(mpp), tumor)
    rgb = render(rng, layout, style)
    description = (
        f"lymphnode synthetic slide seed={seed} tumor={tumor} generator={GENERATOR_VERSION}"
    )
    write_pyramid(
        path,
        rgb,
        mpp=float(mpp),
        tile_size=tile_size,
        compression="jpeg",
        quality=style.jpeg_quality,
        description=description,
    )
    xml_path = None
    if tumor:
        xml_path = (
            Path(annotation_path) if annotation_path is not None else path.with_suffix(".xml")
        )
        write_asap(xml_path, layout.tumor, layout.exclusion)
    tissue = float(layout.fine_tissue.mean())
    lesion = float(
        (layout.fine_tumor & layout.fine_tissue).sum() / max(1, layout.fine_tissue.sum())
    )
    seconds = time.perf_counter() - t0
    log.debug("%s: %dx%d, %.1f s, tumor fraction %.3f", path.name, w, h, seconds, lesion)
    return SynthSlide(
        path=path,
        annotation_path=xml_path,
        size=(w, h),
        seed=int(seed),
        tumor=layout.tumor,
        exclusion=layout.exclusion,
        style=style,
        tissue_fraction=tissue,
        tumor_fraction=lesion,
        seconds=seconds,
    )
