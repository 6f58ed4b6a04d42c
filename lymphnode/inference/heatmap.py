"""Tumor-probability heatmaps on disk: the hand-off from ``infer`` to ``evaluate``.

A heatmap is a single-channel map of tumor probability over a whole slide at a fixed downsample
(level-0 px per heatmap px, 32 by default = CAMELYON16 level 5). On disk it is a pyramidal TIFF
(``<slide>.heatmap.tif``) with probabilities quantised to uint8 0..255 (p = value / 255), lossless,
openable by OpenSlide and QuPath, and a JSON ImageDescription that carries what evaluation needs:
the slide name, the downsample, the slide's level-0 size and its µm/px, and what made it
(``source``: the checkpoint's path and SHA-256 and the settings that change the map), so that a
rerun of ``infer`` knows whether an existing heatmap is the one it would write and ``evaluate``
says which checkpoint it scores. Reading checks every field: a file from elsewhere whose slide
name is a path (``../x``) or whose downsample is missing or 0 is refused naming the field.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lymphnode.core.errors import EvaluationError

HEATMAP_SUFFIX = ".heatmap.tif"
_FORMAT = "lymphnode-heatmap/1"
# The settings of ``infer`` that change a heatmap's values (batch size, workers, device do not).
SOURCE_SETTINGS = ("patch_size", "stride", "downsample", "blend", "tta", "bf16",
                   "min_tissue_fraction", "adapt_bn", "adapt_tiles", "adapt_layers")  # fmt: skip
# adapt_bn: which BatchNorm statistics the map used (the checkpoint's, or re-estimated on up to
# adapt_tiles of the slide's own tiles: AdaBN)


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
        source: what made it (:func:`heatmap_source`: checkpoint path and SHA-256, settings), or
            None (heatmaps written before the record, or made outside ``infer``).
    """

    slide: str
    probabilities: np.ndarray
    downsample: float
    level0_size: tuple[int, int]
    mpp: float | None
    source: dict[str, Any] | None = None

    @property
    def heatmap_mpp(self) -> float | None:
        """µm per heatmap pixel (None when the slide's mpp is unknown)."""
        return None if self.mpp is None else self.mpp * self.downsample


def heatmap_path(out_dir: str | Path, slide: str) -> Path:
    """Where the heatmap of ``slide`` lives in ``out_dir``."""
    return Path(out_dir) / f"{slide}{HEATMAP_SUFFIX}"


def check_slide_name(name: object, where: str) -> str:
    """``name`` when it can name files in an output folder (a file stem: no path separator, no
    control character, not ``.``/``..``, not empty); EvaluationError naming ``where`` otherwise."""
    if (
        not isinstance(name, str)
        or name in ("", ".", "..")
        or any(sep in name for sep in ("/", "\\"))
        or any(ord(ch) < 32 or ord(ch) == 127 for ch in name)
    ):
        raise EvaluationError(
            f"{where}: slide={name!r} is not a slide name; expected a file stem (no '/', '\\', "
            "control characters, '.' or '..'), e.g. tumor_001"
        )
    return name


def heatmap_source(
    checkpoint: str | Path, checkpoint_sha256: str, settings: Mapping[str, Any]
) -> dict[str, Any]:
    """The ``source`` record of the heatmaps a checkpoint makes with ``settings`` (the keys of
    :data:`SOURCE_SETTINGS` are kept: those that change the values)."""
    return {
        "checkpoint": str(Path(checkpoint).resolve()),
        "checkpoint_sha256": str(checkpoint_sha256),
        "settings": {k: settings.get(k) for k in SOURCE_SETTINGS},
    }


def source_differences(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> list[str]:
    """What differs between two ``source`` records, one ``"key: old vs new"`` per difference
    (empty: the same checkpoint bytes and settings; the checkpoint's path may differ)."""
    if not old:
        return ["source: not recorded (a heatmap written before lymphnode recorded its checkpoint)"]
    lines = []
    if old.get("checkpoint_sha256") != new.get("checkpoint_sha256"):
        lines.append(
            f"checkpoint: {old.get('checkpoint')} (sha256 {str(old.get('checkpoint_sha256'))[:12]})"
            f" vs {new.get('checkpoint')} (sha256 {str(new.get('checkpoint_sha256'))[:12]})"
        )
    mine, theirs = old.get("settings") or {}, new.get("settings") or {}
    for key in SOURCE_SETTINGS:
        if mine.get(key) != theirs.get(key):
            lines.append(f"{key}: {mine.get(key)!r} vs {theirs.get(key)!r}")
    return lines


def read_heatmap_source(path: str | Path) -> dict[str, Any] | None:
    """The ``source`` record of the heatmap at ``path`` (its description only: the map is not
    decoded); None when it records none. EvaluationError when it is not a lymphnode heatmap."""
    meta = _read_description(Path(path))
    source = meta.get("source")
    return dict(source) if isinstance(source, Mapping) else None


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
            **({"source": heatmap.source} if heatmap.source is not None else {}),
        }
    )
    write_pyramid(
        path,
        quantised,
        mpp=heatmap.heatmap_mpp,
        mask=True,
        description=description,
    )


def _read_description(path: Path, *, data: bool = False) -> dict[str, Any]:
    """The checked JSON description of a heatmap (and ``_data``: its level 0 when ``data``)."""
    import tifffile

    if not path.is_file():
        raise EvaluationError(f"heatmap {path} does not exist")
    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            description = page.description  # type: ignore[union-attr]
            array = page.asarray() if data else None  # type: ignore[union-attr]
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
    return {**meta, "_data": array}


def _field(path: Path, key: str, value: Any, expected: str) -> EvaluationError:
    return EvaluationError(
        f"heatmap {path}: its description has {key}={value!r}; expected {expected} "
        "(a file written by `python -m lymphnode.infer`)"
    )


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def read_heatmap(path: str | Path) -> Heatmap:
    """Read a heatmap written by :func:`write_heatmap` (level 0 of the pyramid).

    Raises:
        EvaluationError: not a readable lymphnode heatmap, or a description field out of range
            (the message names the file, the field, its value and what was expected).
    """
    path = Path(path)
    meta = _read_description(path, data=True)
    data = meta["_data"]
    slide = check_slide_name(meta.get("slide"), f"heatmap {path}")
    downsample: Any = meta.get("downsample")
    if not _number(downsample) or downsample < 1:
        raise _field(path, "downsample", downsample, "a finite number >= 1 level-0 px per map px")
    size = meta.get("level0_size")
    if (
        not isinstance(size, list)
        or len(size) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in size)
    ):
        raise _field(path, "level0_size", size, "[width, height], two integers >= 1 px")
    mpp: Any = meta.get("mpp")
    if mpp is not None and (not _number(mpp) or mpp <= 0):
        raise _field(path, "mpp", mpp, "null or a finite number > 0 µm per level-0 px")
    source = meta.get("source")
    if data.ndim == 3:
        data = data[..., 0]
    if data.ndim != 2:
        raise EvaluationError(f"heatmap {path}: level 0 has shape {data.shape}; expected (H, W)")
    return Heatmap(
        slide=slide,
        probabilities=data.astype(np.float32) / 255.0,
        downsample=float(downsample),
        level0_size=(int(size[0]), int(size[1])),
        mpp=None if mpp is None else float(mpp),
        source=dict(source) if isinstance(source, Mapping) else None,
    )
