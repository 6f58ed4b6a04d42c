"""Tumor-probability heatmaps on disk: the hand-off from ``infer`` to ``evaluate``.

A heatmap is a single-channel map of tumor probability over a whole slide at a fixed downsample
(level-0 px per heatmap px, 32 by default = CAMELYON16 level 5). On disk it is a pyramidal TIFF
(``<slide>.heatmap.tif``) with probabilities quantised to uint8 0..255 (p = value / 255), lossless,
openable by OpenSlide and QuPath, and a JSON ImageDescription that carries what evaluation needs:
the slide name, the downsample, the slide's level-0 size and its µm/px.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lymphnode.core.errors import EvaluationError

HEATMAP_SUFFIX = ".heatmap.tif"
_FORMAT = "lymphnode-heatmap/1"


@dataclass
class Heatmap:
    """Tumor probability over a slide.

    Attributes:
        slide: slide name (file stem, e.g. ``tumor_001``).
        probabilities: float32 (H, W) in [0, 1]; pixel (i, j) covers the level-0 region
            ``[j * downsample, (j + 1) * downsample) × [i * downsample, (i + 1) * downsample)``.
        downsample: level-0 px per heatmap px.
        level0_size: the slide's level-0 (width, height) in px.
        mpp: the slide's µm per level-0 px, or None when unknown.
    """

    slide: str
    probabilities: np.ndarray
    downsample: float
    level0_size: tuple[int, int]
    mpp: float | None

    @property
    def heatmap_mpp(self) -> float | None:
        """µm per heatmap pixel (None when the slide's mpp is unknown)."""
        return None if self.mpp is None else self.mpp * self.downsample


def heatmap_path(out_dir: str | Path, slide: str) -> Path:
    """Where the heatmap of ``slide`` lives in ``out_dir``."""
    return Path(out_dir) / f"{slide}{HEATMAP_SUFFIX}"


def write_heatmap(path: str | Path, heatmap: Heatmap) -> None:
    """Write ``heatmap`` as a pyramidal 0..255 TIFF with its metadata (atomic: never half-written)."""
    from lymphnode.wsi.pyramid import write_pyramid

    probs = np.asarray(heatmap.probabilities, dtype=np.float32)
    if probs.ndim != 2:
        raise EvaluationError(f"heatmap of {heatmap.slide}: expected a 2-D map, got {probs.shape}")
    quantised = np.clip(np.rint(probs * 255.0), 0, 255).astype(np.uint8)
    description = json.dumps(
        {
            "format": _FORMAT,
            "slide": heatmap.slide,
            "downsample": float(heatmap.downsample),
            "level0_size": [int(v) for v in heatmap.level0_size],
            "mpp": heatmap.mpp,
        }
    )
    write_pyramid(
        path,
        quantised,
        mpp=heatmap.heatmap_mpp,
        mask=True,
        description=description,
    )


def read_heatmap(path: str | Path) -> Heatmap:
    """Read a heatmap written by :func:`write_heatmap` (level 0 of the pyramid)."""
    import tifffile

    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f"heatmap {path} does not exist")
    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            description = page.description  # type: ignore[union-attr]
            data = page.asarray()  # type: ignore[union-attr]
    except Exception as exc:  # tifffile raises several types for bad files
        raise EvaluationError(f"heatmap {path} is not a readable TIFF ({exc})") from exc
    try:
        meta = json.loads(description)
    except (TypeError, json.JSONDecodeError):
        meta = {}
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        raise EvaluationError(
            f"{path} is not a lymphnode heatmap (its ImageDescription lacks format {_FORMAT!r}); "
            "expected a file written by `python -m lymphnode.infer`"
        )
    if data.ndim == 3:
        data = data[..., 0]
    return Heatmap(
        slide=str(meta["slide"]),
        probabilities=data.astype(np.float32) / 255.0,
        downsample=float(meta["downsample"]),
        level0_size=(int(meta["level0_size"][0]), int(meta["level0_size"][1])),
        mpp=None if meta.get("mpp") is None else float(meta["mpp"]),
    )
