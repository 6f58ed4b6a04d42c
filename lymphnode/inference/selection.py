"""Which scored patches to label: greedy by score, spread out, capped per slide.

Patches are squares in level-0 px, ``(x, y)`` top-left and side ``size``. Distance between two
patches is the **Chebyshev** distance between their centres, ``max(|dx|, |dy|)``, and counts only
within one slide: two squares of side ``s`` overlap exactly when it is below ``s``, so the default
``min_distance`` of one patch side means "no two chosen squares overlap" (grid neighbours that
share an edge are allowed; ``2 × side`` keeps a patch of tissue between any two).

:func:`select_spread` walks the candidates from the highest score down (ties: the order given) and
takes one unless its slide already holds ``per_slide_cap`` chosen patches or a chosen patch of its
slide lies closer than ``min_distance``; it stops at ``k``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import shapely

from lymphnode.core import validate
from lymphnode.core.errors import ConfigError

log = logging.getLogger(__name__)


def select_spread(
    scores: np.ndarray,
    slide_ids: np.ndarray,
    centres: np.ndarray,
    k: int,
    *,
    min_distance: float,
    per_slide_cap: int | None = None,
    allow_fewer: bool = False,
) -> np.ndarray:
    """Indices of the chosen candidates, best first (see the module docstring).

    Args:
        scores: (N,) uncertainty per candidate (higher = more worth labelling); finite.
        slide_ids: (N,) int, the candidate's slide (distances count within a slide only).
        centres: (N, 2) level-0 px ``(x, y)`` of the candidates' centres.
        k: how many to choose (>= 1).
        min_distance: level-0 px; no two chosen of one slide closer than this (Chebyshev, centre
            to centre); 0 turns spacing off.
        per_slide_cap: at most this many per slide (None: no cap).
        allow_fewer: when spacing and the cap leave fewer than ``k``, return those (with a
            warning) instead of raising.

    Raises:
        ConfigError: bad ``k`` / ``min_distance`` / ``per_slide_cap``; ``k`` larger than the
            number of candidates (always); fewer than ``k`` reachable under spacing and cap
            (unless ``allow_fewer``). Messages name the values and what to change.
    """
    scores = np.asarray(scores, np.float64)
    slide_ids = np.asarray(slide_ids, np.int64)
    centres = np.asarray(centres, np.float64).reshape(-1, 2)
    n = len(scores)
    if not (len(slide_ids) == n == len(centres)):
        raise ConfigError(
            f"select_spread: scores ({n}), slide_ids ({len(slide_ids)}) and centres "
            f"({len(centres)}) must have one row per candidate"
        )
    if not np.isfinite(scores).all():
        raise ConfigError(f"select_spread: {int((~np.isfinite(scores)).sum())} scores not finite")
    k = validate.integer("k", k, 1)
    min_distance = validate.number("min_distance", min_distance, 0, unit="level-0 px")
    if per_slide_cap is not None:
        per_slide_cap = validate.integer("per_slide_cap", per_slide_cap, 1)
    if n == 0:
        raise ConfigError("no candidate patches to select from (no tissue tile left)")
    if k > n:
        raise ConfigError(
            f"k={k} is larger than the {n} candidate patches (tissue tiles not excluded); "
            f"expected k <= {n}: lower k, or give more slides"
        )
    order = np.argsort(-scores, kind="stable")  # best first; ties keep the given order
    chosen: list[int] = []
    taken: dict[int, list[np.ndarray]] = {}  # slide -> centres chosen there
    for i in order.tolist():
        mine = taken.setdefault(int(slide_ids[i]), [])
        if per_slide_cap is not None and len(mine) >= per_slide_cap:
            continue
        if min_distance > 0 and mine:
            d = np.abs(np.asarray(mine) - centres[i]).max(axis=1)  # Chebyshev
            if (d < min_distance).any():
                continue
        mine.append(centres[i])
        chosen.append(i)
        if len(chosen) == k:
            break
    if len(chosen) < k:
        why = (
            f"only {len(chosen)} of the {n} candidates can be chosen with min_distance="
            f"{min_distance:g} level-0 px and per_slide_cap={per_slide_cap}, k={k} were asked"
        )
        if not allow_fewer:
            raise ConfigError(
                f"{why}; lower k, min_distance or raise per_slide_cap (or allow_fewer=true)"
            )
        log.warning("%s; allow_fewer=true: returning %d", why, len(chosen))
    return np.asarray(chosen, np.int64)


def squares(corners: np.ndarray, size: float | np.ndarray) -> np.ndarray:
    """shapely Polygons (N,) of squares with level-0 top-left ``corners`` (N, 2) and side
    ``size`` (scalar or (N,)), in level-0 px."""
    corners = np.asarray(corners, np.float64).reshape(-1, 2)
    side = np.broadcast_to(np.asarray(size, np.float64), (len(corners),))
    return shapely.box(
        corners[:, 0], corners[:, 1], corners[:, 0] + side, corners[:, 1] + side
    ).reshape(-1)


def overlaps_any(
    corners: np.ndarray, size: float, regions: Sequence[shapely.Geometry]
) -> np.ndarray:
    """(N,) bool: whether each square (level-0 top-left ``corners`` (N, 2), side ``size``)
    overlaps one of ``regions`` (level-0 px) with positive area; touching edges do not count."""
    n = len(corners)
    if not regions or n == 0:
        return np.zeros(n, bool)
    boxes = squares(corners, size)
    tree = shapely.STRtree(list(regions))
    hit = np.zeros(n, bool)
    pairs = tree.query(boxes, predicate="intersects")  # (2, M): box index, region index
    for b, r in zip(*pairs.tolist()):
        if not hit[b] and boxes[b].intersection(regions[r]).area > 0:
            hit[b] = True
    return hit


__all__ = ["overlaps_any", "select_spread", "squares"]
