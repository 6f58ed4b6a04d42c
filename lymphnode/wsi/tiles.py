"""Direct reads of tiled JPEG TIFFs (OpenSlide's generic-tiff, CAMELYON16's format).

:class:`TileReader` decodes only the tiles that cover a region, with imagecodecs: the same
libjpeg-turbo decode as OpenSlide, pixel for pixel, without its compositing, which makes patch
reads several times faster. It sits behind :class:`lymphnode.wsi.slide.Slide` (which decides when
to use it and falls back to OpenSlide); nothing else calls it. Decoded tiles are kept in a
per-process LRU of :data:`TILE_CACHE_BYTES`. Coordinates are pixels of the level read.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path

import imagecodecs
import numpy as np
import tifffile

log = logging.getLogger(__name__)

#: Bytes of decoded tiles kept per process by the tile reader (OpenSlide's default cache size).
TILE_CACHE_BYTES = 32 * 2**20
_PHOTOMETRIC_YCBCR = 6
_COMPRESSION_JPEG = 7

__all__ = ["TILE_CACHE_BYTES", "TileReader", "tile_pages"]


class TileReader:
    """Direct reader of a tiled JPEG (YCbCr) TIFF's levels: decodes only the covering tiles.

    Built per process from the page indices found at open (see :func:`tile_pages`). ``read`` returns
    ``None`` when it cannot serve a region (a missing tile), and raises on a damaged tile; the
    caller then reads through OpenSlide, which reports the damage.
    """

    _tokens = itertools.count()

    def __init__(self, path: Path, pages: dict[int, int]) -> None:
        self.token = next(self._tokens)  # cache key part: unique, unlike id()
        self.levels: dict[int, tuple] = {}
        with tifffile.TiffFile(path) as tif:
            for level, index in pages.items():
                page = tif.pages[index]
                if not isinstance(page, tifffile.TiffPage):
                    raise ValueError(f"page {index} is not a full TIFF page")
                self.levels[level] = (
                    int(page.imagewidth),
                    int(page.imagelength),
                    int(page.tilewidth),
                    int(page.tilelength),
                    np.asarray(page.dataoffsets, np.int64),
                    np.asarray(page.databytecounts, np.int64),
                    page.jpegtables,
                )
        self.file = path.open("rb", buffering=0)  # closed by GC with the reader

    def _tile(self, level: int, index: int) -> np.ndarray | None:
        key = (self.token, level, index)
        with _tiles_lock:
            tile = _tiles.get(key)
            if tile is not None:
                _tiles.move_to_end(key)
                return tile
        _, _, tw, th, offsets, counts, tables = self.levels[level]
        count = int(counts[index])
        if count == 0:
            return None  # tile not written: OpenSlide shows it transparent
        data = os.pread(self.file.fileno(), count, int(offsets[index]))
        tile = imagecodecs.jpeg8_decode(data, tables=tables, outcolorspace="RGB")
        if tile.shape != (th, tw, 3):
            raise ValueError(f"tile {index} of level {level} decoded to {tile.shape}")
        _cache_tile(key, tile)
        return tile

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray | None:
        """Region (x, y, w, h in px of ``level``) as (h, w, 3) RGB, white outside the level."""
        width, height, tw, th, *_ = self.levels[level]
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, width), min(y + h, height)
        out = np.full((h, w, 3), 255, np.uint8)
        tiles_across = -(-width // tw)
        for ty in range(y0 // th, (y1 - 1) // th + 1):
            for tx in range(x0 // tw, (x1 - 1) // tw + 1):
                tile = self._tile(level, ty * tiles_across + tx)
                if tile is None:
                    return None
                left, top = tx * tw, ty * th
                sx0, sx1 = max(x0, left), min(x1, left + tw)
                sy0, sy1 = max(y0, top), min(y1, top + th)
                out[sy0 - y : sy1 - y, sx0 - x : sx1 - x] = tile[
                    sy0 - top : sy1 - top, sx0 - left : sx1 - left
                ]
        return out


_tiles: OrderedDict[tuple[int, int, int], np.ndarray] = OrderedDict()
_tiles_bytes = 0
_tiles_lock = threading.Lock()


def _cache_tile(key: tuple[int, int, int], tile: np.ndarray) -> None:
    global _tiles_bytes
    with _tiles_lock:
        if key in _tiles:
            return
        _tiles[key] = tile
        _tiles_bytes += tile.nbytes
        while _tiles_bytes > TILE_CACHE_BYTES and _tiles:
            _tiles_bytes -= _tiles.popitem(last=False)[1].nbytes


def tile_pages(path: Path, level_dimensions: tuple[tuple[int, int], ...]) -> dict[int, int]:
    """OpenSlide level → TIFF page index, for the levels the tile reader can decode exactly:
    tiled, JPEG, YCbCr, 8-bit RGB, one page of exactly the level's size."""
    pages: dict[int, int] = {}
    try:
        with tifffile.TiffFile(path) as tif:
            found: dict[tuple[int, int], list[int]] = {}
            for index, page in enumerate(tif.pages):
                if isinstance(page, tifffile.TiffPage) and page.is_tiled:
                    found.setdefault((page.imagewidth, page.imagelength), []).append(index)
            for level, size in enumerate(level_dimensions):
                indices = found.get(size, [])
                if len(indices) != 1:
                    continue
                page = tif.pages[indices[0]]
                if (
                    isinstance(page, tifffile.TiffPage)
                    and page.compression == _COMPRESSION_JPEG
                    and page.photometric == _PHOTOMETRIC_YCBCR
                    and page.samplesperpixel == 3
                    and page.bitspersample == 8
                    and page.planarconfig == 1
                    and not page.extrasamples
                    and page.imagedepth == 1
                    and page.tiledepth == 1
                ):
                    pages[level] = indices[0]
    except Exception as e:  # whatever tifffile dislikes is read through OpenSlide
        log.debug("%s: no direct tile reads (%s)", path, e)
        return {}
    return pages


def _after_fork_in_child() -> None:
    """A forked child starts with an empty cache and a fresh lock (the parent's may be held)."""
    global _tiles_lock, _tiles_bytes
    _tiles.clear()
    _tiles_bytes = 0
    _tiles_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
