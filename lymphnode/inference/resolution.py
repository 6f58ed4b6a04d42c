"""Which pyramid level of a slide a network reads: the one at the µm/px it was trained at.

A checkpoint records the µm per patch px of its training patches (``Preprocess.mpp``, from the
cache's manifest: prepare's ``mpp=`` or ``cache import --mpp``). :func:`read_level` picks the
slide level whose µm/px is within 10 % of it; a checkpoint without a recorded mpp reads its
recorded ``level``, as before. A slide whose µm/px is unknown, or that has no level near the
network's, is refused with both figures rather than predicted at the wrong scale.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from lymphnode.core.errors import SlideError
from lymphnode.models.preprocess import Preprocess
from lymphnode.wsi.slide import Slide

TOLERANCE = 0.1  # relative µm/px difference between a level and the network's that still reads it


def read_level(preprocess: Preprocess, slide: Slide, tolerance: float = TOLERANCE) -> int:
    """The level of ``slide`` to read for a network trained at ``preprocess.mpp`` µm/px.

    Raises:
        SlideError: the network records its µm/px but the slide does not (give ``slide_mpp=``),
            or no level of the slide is within ``tolerance`` of it (the message lists both).
    """
    if preprocess.mpp is None:
        return preprocess.level
    mpps = slide.level_mpps()
    if mpps is None:
        raise SlideError(
            f"slide {slide.path} records no µm/px but the checkpoint was trained at "
            f"{preprocess.mpp:g} µm/px; give the slide's level-0 µm/px as slide_mpp=<µm/px>"
        )
    errors = [abs(m - preprocess.mpp) / preprocess.mpp for m in mpps]
    level = int(np.argmin(errors))
    if errors[level] > tolerance:
        levels = ", ".join(f"level {i}: {m:.4g}" for i, m in enumerate(mpps))
        raise SlideError(
            f"slide {slide.path}: the checkpoint was trained at {preprocess.mpp:g} µm/px but no "
            f"level of the slide is within {tolerance:.0%} of it ({levels} µm/px); predicting at "
            "another scale gives wrong maps: use a checkpoint trained at this slide's resolution, "
            "or correct slide_mpp= if the slide's µm/px is wrong"
        )
    return level


def for_slide(preprocess: Preprocess, slide: Slide) -> Preprocess:
    """``preprocess`` reading :func:`read_level` of ``slide`` (itself when that is its level)."""
    level = read_level(preprocess, slide)
    return preprocess if level == preprocess.level else dataclasses.replace(preprocess, level=level)
