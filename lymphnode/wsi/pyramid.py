"""Pyramidal tiled TIFF writer: the one way lymphnode writes images that OpenSlide must open.

A pyramid is a TIFF whose first page is the full-resolution image (level 0) and whose every further
page halves the previous one. All pages are tiled; pages above level 0 carry ``subfiletype=1``
(reduced-resolution image), which is the layout OpenSlide reads as ``generic-tiff`` (CAMELYON16's
format). The resolution tags are written in centimetres so that OpenSlide reports
``openslide.mpp-x`` / ``openslide.mpp-y`` equal to the ``mpp`` given (µm per level-0 pixel).

Used by :mod:`lymphnode.synthetic.slide` (synthetic slides), ``python -m lymphnode.annotations to-mask``
(0/255 lesion masks) and inference (probability heatmaps).
"""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import tifffile

from lymphnode.core import atomic
from lymphnode.core.errors import ConfigError

log = logging.getLogger(__name__)

#: Compressions accepted by :func:`write_pyramid`; the lossless ones are allowed for masks.
LOSSY_COMPRESSIONS = ("jpeg",)
LOSSLESS_COMPRESSIONS = ("deflate", "zlib", "lzw", "none")
_TIFF_COMPRESSION = {"jpeg": "jpeg", "deflate": "zlib", "zlib": "zlib", "lzw": "lzw", "none": None}

_MICRONS_PER_CM = 1e4
#: Above this many uncompressed bytes the file is written as BigTIFF (classic TIFF stops at 4 GiB).
_BIGTIFF_THRESHOLD = 2**31


def pyramid_shapes(width: int, height: int, min_size: int = 256) -> list[tuple[int, int]]:
    """Level sizes ``(width, height)`` of the pyramid :func:`write_pyramid` writes.

    Level 0 is ``(width, height)``; each further level is ``ceil(side / 2)`` of the previous one,
    until both sides are below ``min_size`` (so the smallest level fits in one ``min_size`` tile).
    """
    shapes = [(int(width), int(height))]
    while max(shapes[-1]) >= min_size and max(shapes[-1]) > 1:
        w, h = shapes[-1]
        shapes.append(((w + 1) // 2, (h + 1) // 2))
    return shapes


def halve(image: np.ndarray, *, mask: bool = False) -> np.ndarray:
    """One pyramid step: ``image`` (H, W[, C]) uint8 → (ceil(H/2), ceil(W/2)[, C]).

    Images take the mean of each 2×2 block (OpenCV ``INTER_AREA``); masks take the maximum, so a
    lesion of one pixel still shows at every level. Odd sides are padded by repeating the edge.
    """
    h, w = image.shape[:2]
    if h % 2 or w % 2:
        pad = ((0, h % 2), (0, w % 2)) + ((0, 0),) * (image.ndim - 2)
        image = np.pad(image, pad, mode="edge")
        h, w = image.shape[:2]
    if mask:
        blocks = image.reshape(h // 2, 2, w // 2, 2, *image.shape[2:])
        return blocks.max(axis=(1, 3))
    return cv2.resize(np.ascontiguousarray(image), (w // 2, h // 2), interpolation=cv2.INTER_AREA)


def _check_args(
    path: Path,
    image: np.ndarray,
    mpp: float | None,
    tile_size: int,
    compression: str,
    quality: int,
    min_size: int,
    mask: bool,
) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        got = getattr(image, "dtype", type(image).__name__)
        raise ConfigError(f"write_pyramid({path}): image must be a uint8 numpy array, got {got}")
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise ConfigError(
            f"write_pyramid({path}): image must have shape (H, W) or (H, W, 3), got {image.shape}"
        )
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ConfigError(f"write_pyramid({path}): image is empty, shape {image.shape}")
    if mpp is not None and not (np.isfinite(mpp) and mpp > 0):
        raise ConfigError(
            f"write_pyramid({path}): mpp must be a positive number or None, got {mpp}"
        )
    if tile_size < 16 or tile_size % 16:
        raise ConfigError(
            f"write_pyramid({path}): tile_size must be a positive multiple of 16, got {tile_size}"
        )
    if min_size < 1:
        raise ConfigError(f"write_pyramid({path}): min_size must be >= 1, got {min_size}")
    allowed = LOSSLESS_COMPRESSIONS if mask else LOSSY_COMPRESSIONS + LOSSLESS_COMPRESSIONS
    if compression not in allowed:
        what = "mask (lossless only)" if mask else "image"
        raise ConfigError(
            f"write_pyramid({path}): compression {compression!r} is not allowed for a {what}; "
            f"expected one of {list(allowed)}"
        )
    if compression == "jpeg" and not 1 <= quality <= 100:
        raise ConfigError(f"write_pyramid({path}): quality must be in 1..100, got {quality}")


def write_pyramid(
    path: str | Path,
    image: np.ndarray,
    *,
    mpp: float | None,
    tile_size: int = 256,
    compression: str | None = None,
    quality: int = 90,
    min_size: int = 256,
    description: str | None = None,
    mask: bool = False,
) -> None:
    """Write ``image`` as a pyramidal tiled TIFF that OpenSlide opens as ``generic-tiff``.

    Args:
        path: output ``.tif``. Written to a temporary file in the same folder and renamed into
            place, so ``path`` is either the complete old file, the complete new one, or absent.
        image: (H, W, 3) RGB or (H, W) grayscale uint8, numpy array or memmap; level 0.
        mpp: µm per level-0 pixel, stored as resolution tags (pixels per cm) so that OpenSlide
            reports ``openslide.mpp-x/y``; ``None`` writes no resolution.
        tile_size: tile side in px (multiple of 16) of every level.
        compression: ``"jpeg"`` (default for images; YCbCr, ``quality`` 1..100) or a lossless
            one: ``"deflate"`` (= ``"zlib"``, the default for masks), ``"lzw"``, ``"none"``.
        quality: JPEG quality.
        min_size: levels halve until both sides are below this (px).
        description: ImageDescription of level 0 (e.g. provenance); none by default.
        mask: ``image`` holds labels (e.g. 0/255): levels take the 2×2 maximum instead of the mean
            so small lesions survive, and only lossless compression is accepted.

    Raises:
        ConfigError: bad image shape/dtype or parameter (message names the parameter and value).
        OSError: the file cannot be written (nothing is left behind).
    """
    path = Path(path)
    if compression is None:
        compression = "deflate" if mask else "jpeg"
    compression = compression.lower()
    _check_args(path, image, mpp, tile_size, compression, quality, min_size, mask)

    photometric = "rgb" if image.ndim == 3 else "minisblack"
    tiff_compression = _TIFF_COMPRESSION[compression]
    options: dict = {
        "tile": (tile_size, tile_size),
        "photometric": photometric,
        "compression": tiff_compression,
        "metadata": None,  # no tifffile JSON description: level 0 carries only `description`
    }
    if compression == "jpeg":
        options["compressionargs"] = {"level": int(quality)}
    elif tiff_compression is not None:
        options["predictor"] = True  # horizontal differencing: smaller deflate/LZW files
    if mpp is not None:
        pixels_per_cm = _MICRONS_PER_CM / float(mpp)
        options["resolution"] = (pixels_per_cm, pixels_per_cm)
        options["resolutionunit"] = "CENTIMETER"

    shapes = pyramid_shapes(image.shape[1], image.shape[0], min_size)
    bigtiff = image.nbytes * 4 // 3 > _BIGTIFF_THRESHOLD
    path.parent.mkdir(parents=True, exist_ok=True)
    # A hidden sibling in the same folder, so that the rename is atomic (core.atomic).
    with atomic.atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tif:
        level = image
        for index in range(len(shapes)):
            if index:
                level = halve(level, mask=mask)
            tif.write(
                level,
                subfiletype=1 if index else 0,
                description=description if index == 0 else None,
                **options,
            )
    log.debug("wrote %s: %d levels %s, mpp %s, %s", path, len(shapes), shapes, mpp, compression)


__all__ = ["halve", "pyramid_shapes", "write_pyramid"]
