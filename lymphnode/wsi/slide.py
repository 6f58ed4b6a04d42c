"""Whole-slide images: open, pick a level, read regions as RGB uint8.

This is the only module that imports :mod:`openslide`; every OpenSlide error is turned into a
:class:`~lymphnode.core.errors.SlideError` here, with a message that names the file and the case.

Coordinates follow OpenSlide: ``(x, y)`` is the top-left corner in level-0 pixels, ``(w, h)`` a
size in pixels of the level being read. :meth:`Slide.read` returns ``(h, w, 3)`` uint8 RGB with
transparent pixels (and any part of the region outside the slide) composited on white.

A :class:`Slide` holds only metadata; the OpenSlide handle lives in a small per-process LRU
(:data:`MAX_OPEN_HANDLES`) and is opened lazily by the process that reads. A ``Slide`` can
therefore be pickled into DataLoader or process-pool workers, and a worker that touches hundreds
of slides keeps only a bounded number of files open.
"""

from __future__ import annotations

import ctypes
import logging
import math
import operator
import os
import sys
import threading
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any

import cv2
import numpy as np
import openslide
import tifffile
from openslide import lowlevel as _lowlevel

from lymphnode.core import validate
from lymphnode.core.errors import SlideError
from lymphnode.wsi.tiles import TileReader, tile_pages

log = logging.getLogger(__name__)

#: OpenSlide property names used here (OpenSlide's own constants).
PROPERTY_MPP_X = openslide.PROPERTY_NAME_MPP_X
PROPERTY_VENDOR = openslide.PROPERTY_NAME_VENDOR

#: File suffixes of the whole-slide formats OpenSlide reads (for finding slides in a folder).
SLIDE_SUFFIXES = (".tif", ".tiff", ".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".bif", ".svslide")
#: Open OpenSlide handles kept per process (least recently used ones are dropped first).
MAX_OPEN_HANDLES = 16
#: Largest region :meth:`Slide.read` allocates (pixels); 2**28 px is 1 GiB as RGBA.
MAX_READ_PIXELS = 2**28
#: Relative slack of :meth:`Slide.best_level`: level downsamples such as 2.0005 (odd level sizes)
#: still count as 2.
_DOWNSAMPLE_SLACK = 0.01
_TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
#: Read straight into a numpy buffer through OpenSlide's C call (premultiplied BGRA bytes on
#: little-endian machines). It skips openslide-python's un-premultiply pass and PIL, which makes
#: :meth:`Slide.read` as fast as a bare ``OpenSlide.read_region``; where openslide-python's
#: internals differ, reads fall back to its public ``read_region``.
_DIRECT_READ = sys.byteorder == "little" and callable(getattr(_lowlevel, "_read_region", None))
#: Read tiled JPEG TIFFs (OpenSlide's generic-tiff, CAMELYON16's format) by decoding the covering
#: tiles directly (:mod:`lymphnode.wsi.tiles`): the same libjpeg-turbo decode as OpenSlide, pixel
#: for pixel, without its compositing. ``LYMPHNODE_TILE_READER=0`` turns it off (every read goes through OpenSlide).
TILE_READER = os.environ.get("LYMPHNODE_TILE_READER", "1") != "0"

# ---------------------------------------------------------------------------------------------
# Per-process LRU of open handles, keyed by (pid, file identity).
# An evicted handle is only dropped from the LRU: OpenSlide closes it when the last reference goes,
# so a read in progress in another thread keeps its handle alive until it finishes.
# ---------------------------------------------------------------------------------------------
_FileId = tuple[int, int, int, int]  # st_dev, st_ino, st_size, st_mtime_ns


class _Handle:
    """One process's open slide: the OpenSlide handle and, for tiled JPEG TIFFs, a tile reader."""

    __slots__ = ("osr", "tiles")

    def __init__(self, osr: openslide.OpenSlide, tiles: TileReader | None) -> None:
        self.osr = osr
        self.tiles = tiles


_handles: OrderedDict[tuple[int, _FileId], _Handle] = OrderedDict()
_handles_lock = threading.Lock()
# Handles inherited through fork() belong to the parent; the child never calls into them.
_inherited: list[_Handle] = []


def _after_fork_in_child() -> None:
    global _handles_lock
    _inherited.extend(_handles.values())
    _handles.clear()
    _handles_lock = threading.Lock()  # the parent's lock may have been held by another thread


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def open_handle_count() -> int:
    """Number of OpenSlide handles this process keeps open (at most :data:`MAX_OPEN_HANDLES`)."""
    with _handles_lock:
        return len(_handles)


def _file_id(path: Path) -> _FileId:
    st = path.stat()
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _check_file(path: Path) -> _FileId:
    """Stat ``path``; SlideError when it is missing or not a regular file."""
    if not path.exists():
        raise SlideError(f"slide not found: {path} (no such file)")
    if path.is_dir():
        raise SlideError(f"slide {path} is a directory, expected a slide file (e.g. .tif, .svs)")
    if not path.is_file():
        raise SlideError(f"slide {path} is not a regular file")
    return _file_id(path)


def _describe_unsupported(path: Path) -> str:
    """Why OpenSlide refused ``path``: a stripped TIFF, a truncated TIFF, or not a slide at all."""
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    expected = (
        "expected a format OpenSlide reads (tiled pyramidal TIFF, Aperio .svs, Hamamatsu, "
        "MIRAX, Philips TIFF, ...)"
    )
    if magic not in _TIFF_MAGICS:
        return f"is not a slide format OpenSlide recognises ({magic!r}...); {expected}"

    try:
        size = path.stat().st_size
        with tifffile.TiffFile(path) as tif:
            page = tif.pages.first
            if not page.is_tiled:
                return (
                    "is a stripped (non-tiled) TIFF; OpenSlide needs a tiled pyramidal TIFF "
                    "(write one with lymphnode.wsi.pyramid.write_pyramid or "
                    "`vips tiffsave in.tif out.tif --tile --pyramid`)"
                )
            end = max((o + c for o, c in zip(page.dataoffsets, page.databytecounts)), default=0)
            if end > size:
                return (
                    f"is truncated: its tile data ends at byte {end} but the file has {size} "
                    "bytes (incomplete copy or download?)"
                )
    except Exception as e:  # tifffile cannot parse it either: damaged
        return f"is a damaged TIFF ({type(e).__name__}: {e})"
    return f"is a TIFF that OpenSlide cannot read; {expected}"


def _open_openslide(path: Path) -> openslide.OpenSlide:
    """``openslide.OpenSlide(path)`` with its errors turned into SlideError naming the case."""
    try:
        return openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError:
        raise SlideError(f"cannot open slide {path}: it {_describe_unsupported(path)}") from None
    except openslide.OpenSlideError as e:
        raise SlideError(
            f"cannot open slide {path}: OpenSlide failed ({e}); the file is damaged or truncated"
        ) from None
    except OSError as e:
        raise SlideError(f"cannot open slide {path}: {e.strerror or e}") from None


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """(H, W, 4) uint8 non-premultiplied RGBA → (H, W, 3) uint8 RGB over a white background.

    openslide-python's ``read_region`` un-premultiplies OpenSlide's output, so fully transparent
    pixels (outside the slide or its scanned area) arrive as (0, 0, 0, 0) and must become white.
    """
    alpha = rgba[..., 3]
    if alpha.min() == 255:  # the usual case: opaque everywhere
        return cv2.cvtColor(rgba, cv2.COLOR_RGBA2RGB)
    a = alpha[..., None].astype(np.uint16)
    rgb = rgba[..., :3].astype(np.uint16)
    return ((rgb * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)


def _premultiplied_bgra_on_white(bgra: np.ndarray) -> np.ndarray:
    """(H, W, 4) uint8 premultiplied BGRA (OpenSlide's native output) → (H, W, 3) RGB on white.

    Premultiplied colour over white is ``C + (255 - A)``: exact, and transparent (0, 0, 0, 0)
    becomes (255, 255, 255). ``C <= A`` so the sum never overflows.
    """
    rgb = cv2.cvtColor(bgra, cv2.COLOR_BGRA2RGB)
    alpha = bgra[..., 3]
    if alpha.min() != 255:
        rgb += (255 - alpha)[..., None]
    return rgb


def _read_region_rgb(
    osr: openslide.OpenSlide, x: int, y: int, level: int, w: int, h: int
) -> np.ndarray:
    """OpenSlide region (x, y level-0 px; w, h px of ``level``) as (h, w, 3) RGB on white."""
    if _DIRECT_READ:
        lowlevel_handle = getattr(osr, "_osr", None)
        if lowlevel_handle is not None:
            bgra = np.empty((h, w, 4), np.uint8)
            pointer = bgra.ctypes.data_as(ctypes.POINTER(ctypes.c_uint32))
            _lowlevel._read_region(lowlevel_handle, pointer, x, y, level, w, h)
            return _premultiplied_bgra_on_white(bgra)
    return _composite_on_white(np.asarray(osr.read_region((x, y), level, (w, h))))


def _as_int(name: str, value: Any, path: Path) -> int:
    try:
        return operator.index(value)
    except TypeError:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise SlideError(
            f"slide {path}: {name} must be an integer number of pixels, got {value!r}"
        ) from None


class Slide:
    """A whole-slide image opened for reading; see :func:`open_slide`.

    Metadata is read once at open. The OpenSlide handle is not part of the object: it opens
    lazily in the process that reads and sits in a per-process LRU, so a ``Slide`` pickles cheaply.

    Attributes:
        path: the slide file.
        dimensions: level-0 ``(width, height)`` in px.
        level_count: number of pyramid levels.
        level_dimensions: ``(width, height)`` of every level, level 0 first.
        level_downsamples: level-0 px per level px, ``1.0`` first, increasing.
        mpp: µm per level-0 pixel (OpenSlide's ``openslide.mpp-x``, or the override given to
            :func:`open_slide`); ``None`` when unknown.
    """

    def __init__(self, path: str | Path, mpp: float | None = None) -> None:
        self.path = Path(path)
        self._file_id = _check_file(self.path)
        if mpp is not None:
            try:
                mpp = float(mpp)
            except (TypeError, ValueError):
                raise SlideError(f"slide {self.path}: mpp must be a number, got {mpp!r}") from None
            if not (math.isfinite(mpp) and mpp > 0):
                raise SlideError(f"slide {self.path}: mpp must be a positive number, got {mpp}")
        osr = _open_openslide(self.path)
        self.dimensions: tuple[int, int] = tuple(int(v) for v in osr.dimensions)  # type: ignore[assignment]
        self.level_count: int = int(osr.level_count)
        self.level_dimensions: tuple[tuple[int, int], ...] = tuple(
            (int(w), int(h)) for w, h in osr.level_dimensions
        )
        self.level_downsamples: tuple[float, ...] = tuple(float(d) for d in osr.level_downsamples)
        self._properties: dict[str, str] = dict(osr.properties)
        self.mpp: float | None = mpp if mpp is not None else self._mpp_from_properties()
        self._closed = False
        # Levels the tile reader serves (generic-tiff only: other vendors' TIFFs have their own
        # layouts, and OpenSlide stays the general path).
        self._tile_pages: dict[int, int] = (
            tile_pages(self.path, self.level_dimensions)
            if self.vendor == "generic-tiff" and TILE_READER
            else {}
        )
        self._remember(osr)
        log.debug("opened %r", self)

    # -- metadata -------------------------------------------------------------------------------

    def _mpp_from_properties(self) -> float | None:
        raw = self._properties.get(PROPERTY_MPP_X)
        if raw is None:
            return None
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value > 0):
            log.warning("slide %s: ignoring invalid %s=%r", self.path, PROPERTY_MPP_X, raw)
            return None
        return value

    @property
    def properties(self) -> Mapping[str, str]:
        """OpenSlide properties (read-only), e.g. ``openslide.vendor``, ``openslide.mpp-x``."""
        return MappingProxyType(self._properties)

    @property
    def vendor(self) -> str | None:
        """OpenSlide's format name, e.g. ``"generic-tiff"`` or ``"aperio"``."""
        return self._properties.get(PROPERTY_VENDOR)

    @property
    def closed(self) -> bool:
        """True after :meth:`close`; reads then raise SlideError."""
        return self._closed

    def __repr__(self) -> str:
        w, h = self.dimensions
        mpp = "None" if self.mpp is None else f"{self.mpp:.4g}"
        downsamples = ", ".join(f"{d:.4g}" for d in self.level_downsamples)
        closed = ", closed" if self._closed else ""
        return (
            f"Slide({str(self.path)!r}, dimensions={w}x{h}, levels={self.level_count} "
            f"(downsamples {downsamples}), mpp={mpp}{closed})"
        )

    # -- levels ---------------------------------------------------------------------------------

    def _check_level(self, level: Any) -> int:
        level = _as_int("level", level, self.path)
        if not 0 <= level < self.level_count:
            raise SlideError(
                f"slide {self.path}: level {level} is out of range; the slide has levels "
                f"0-{self.level_count - 1}"
            )
        return level

    def best_level(self, downsample: float) -> int:
        """The level with the largest downsample <= ``downsample`` (level 0 for anything <= 1).

        Level downsamples within 1 % above the request count (odd level sizes make 2.0005 of a 2).
        """
        downsample = validate.number(
            "downsample",
            downsample,
            0,
            strict_minimum=True,
            where=f"slide {self.path}: ",
            error=SlideError,
        )
        limit = downsample * (1 + _DOWNSAMPLE_SLACK)
        best = 0
        for level, d in enumerate(self.level_downsamples):
            if d <= limit:
                best = level
        return best

    def level_mpps(self) -> tuple[float, ...] | None:
        """µm per pixel of every level, or ``None`` when the slide's mpp is unknown."""
        if self.mpp is None:
            return None
        return tuple(self.mpp * d for d in self.level_downsamples)

    def level_for_mpp(self, mpp: float, tolerance: float = 0.1) -> int:
        """The level whose µm/px is nearest ``mpp``, within relative ``tolerance`` (0.1 = 10 %).

        Raises:
            SlideError: the slide has no mpp (the CLI key ``slide_mpp=``; ``open_slide(path,
                mpp=...)`` in Python), or no level is
                within tolerance (the message lists every level's µm/px).
        """
        where = f"slide {self.path}: "
        mpp = validate.number(
            "mpp", mpp, 0, strict_minimum=True, unit="µm/px", where=where, error=SlideError
        )
        tolerance = validate.number("tolerance", tolerance, 0, where=where, error=SlideError)
        mpps = self.level_mpps()
        if mpps is None:
            raise SlideError(
                f"slide {self.path} has no mpp (no {PROPERTY_MPP_X} property), so the level at "
                f"{mpp} µm/px cannot be chosen; give the slide's level-0 µm/px as "
                "slide_mpp=<µm/px> (e.g. slide_mpp=0.243 for CAMELYON16 level 0) or choose the "
                "level with level= instead"
            )
        errors = [abs(m - mpp) / mpp for m in mpps]
        level = int(np.argmin(errors))
        if errors[level] > tolerance:
            available = ", ".join(f"level {i}: {m:.4g}" for i, m in enumerate(mpps))
            raise SlideError(
                f"slide {self.path}: no level at {mpp} µm/px (tolerance {tolerance:.0%}); "
                f"available µm/px: {available}"
            )
        return level

    # -- reading --------------------------------------------------------------------------------

    def _key(self) -> tuple[int, _FileId]:
        return (os.getpid(), self._file_id)

    def _remember(self, osr: openslide.OpenSlide) -> _Handle:
        """Put ``osr`` in this process's LRU (or return the handle another thread put there)."""
        key = self._key()
        with _handles_lock:
            existing = _handles.get(key)
            if existing is not None:
                _handles.move_to_end(key)
                return existing
        tiles = None
        if self._tile_pages and TILE_READER:
            try:
                tiles = TileReader(self.path, self._tile_pages)
            except Exception as e:
                log.debug("%s: no direct tile reads (%s)", self.path, e)
        handle = _Handle(osr, tiles)
        with _handles_lock:
            existing = _handles.get(key)
            if existing is not None:
                return existing
            _handles[key] = handle
            while len(_handles) > max(1, MAX_OPEN_HANDLES):
                _handles.popitem(last=False)
        return handle

    def _forget(self, handle: _Handle | None = None) -> None:
        """Drop this slide's handle from the LRU (only ``handle`` if given: it may be replaced)."""
        key = self._key()
        with _handles_lock:
            if handle is None or _handles.get(key) is handle:
                _handles.pop(key, None)

    def _handle(self) -> _Handle:
        if self._closed:
            raise SlideError(f"slide {self.path} is closed; open it again with open_slide()")
        key = self._key()
        with _handles_lock:
            handle = _handles.get(key)
            if handle is not None:
                _handles.move_to_end(key)
                return handle
        # Opening is slow: outside the lock. Refuse a file that changed since open_slide().
        if _check_file(self.path) != self._file_id:
            raise SlideError(
                f"slide {self.path} changed on disk since it was opened; open it again"
            )
        return self._remember(_open_openslide(self.path))

    def _read_tiles(
        self, handle: _Handle, x: int, y: int, w: int, h: int, level: int
    ) -> np.ndarray | None:
        """The region through the tile reader, or None where OpenSlide must read it."""
        if handle.tiles is None or level not in self._tile_pages:
            return None
        ds = self.level_downsamples[level]
        # OpenSlide reads a level at (x / ds, y / ds); a fractional position is resampled.
        lx, ly = x / ds, y / ds
        if not (lx.is_integer() and ly.is_integer()):
            return None
        try:
            return handle.tiles.read(level, int(lx), int(ly), w, h)
        except Exception as e:  # a damaged tile: OpenSlide reads it and reports the damage
            log.debug("%s: tile reader failed (%s); reading through OpenSlide", self.path, e)
            return None

    def read(self, x: int, y: int, w: int, h: int, level: int = 0) -> np.ndarray:
        """Read a region as ``(h, w, 3)`` uint8 RGB.

        Args:
            x, y: top-left corner in level-0 pixels (may be negative).
            w, h: region size in pixels of ``level``.
            level: pyramid level, ``0 <= level < level_count``.

        Transparent pixels and any part of the region outside the slide come back white. A
        region wholly outside the slide is an error, not a white image.

        Raises:
            SlideError: closed slide, bad level/size, region outside the slide, or a read that
                fails inside the file (damaged or truncated slide).
        """
        x = _as_int("x", x, self.path)
        y = _as_int("y", y, self.path)
        w = _as_int("w", w, self.path)
        h = _as_int("h", h, self.path)
        level = self._check_level(level)
        if w <= 0 or h <= 0:
            raise SlideError(
                f"slide {self.path}: region size must be positive, got w={w}, h={h} "
                f"(px of level {level})"
            )
        if w * h > MAX_READ_PIXELS:
            raise SlideError(
                f"slide {self.path}: region {w}x{h} px at level {level} is larger than "
                f"{MAX_READ_PIXELS} px; read it in pieces or from a coarser level"
            )
        ds = self.level_downsamples[level]
        width, height = self.dimensions
        if x >= width or y >= height or x + w * ds <= 0 or y + h * ds <= 0:
            raise SlideError(
                f"slide {self.path}: region x={x}, y={y}, w={w}, h={h} at level {level} "
                f"(level-0 extent {w * ds:.0f}x{h * ds:.0f}) lies wholly outside the slide "
                f"(level-0 size {width}x{height})"
            )
        handle = self._handle()
        region = self._read_tiles(handle, x, y, w, h, level)
        if region is not None:
            return region
        try:
            return _read_region_rgb(handle.osr, x, y, level, w, h)
        except openslide.OpenSlideError as e:
            # An OpenSlide handle is unusable after an error: drop it so the next read reopens.
            self._forget(handle)
            raise SlideError(
                f"slide {self.path}: reading region x={x}, y={y}, w={w}, h={h} at level {level} "
                f"failed ({e}); the file is damaged or truncated"
            ) from None

    def read_level(self, level: int, max_pixels: int = MAX_READ_PIXELS) -> np.ndarray:
        """A whole level as ``(h, w, 3)`` uint8 RGB; meant for low-resolution levels.

        Raises:
            SlideError: bad level, or the level has more than ``max_pixels`` pixels.
        """
        level = self._check_level(level)
        w, h = self.level_dimensions[level]
        if w * h > max_pixels:
            raise SlideError(
                f"slide {self.path}: level {level} is {w}x{h} px, more than max_pixels="
                f"{max_pixels}; read a coarser level (best_level) or read it region by region"
            )
        return self.read(0, 0, w, h, level)

    # -- lifetime -------------------------------------------------------------------------------

    def close(self) -> None:
        """Release this process's handle; later reads raise SlideError. Idempotent."""
        if not self._closed:
            self._closed = True
            self._forget()

    def __enter__(self) -> Slide:
        if self._closed:
            raise SlideError(f"slide {self.path} is closed; open it again with open_slide()")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        # Metadata only; the OpenSlide handle never travels (it lives in the per-process LRU).
        return dict(self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


def slide_mpp_setting(slide_mpp: object, deprecated_mpp: object = None) -> float | None:
    """The ``slide_mpp=`` key (level-0 µm/px of slides that do not record it) of a command, with
    its old name ``mpp=`` (evaluate, export) accepted as a deprecated alias; None: not given.

    Raises:
        ConfigError: not a positive number, or both given with different values.
    """
    from lymphnode.core.errors import ConfigError

    values = {}
    for key, value in (("slide_mpp", slide_mpp), ("mpp", deprecated_mpp)):
        if value is not None:
            values[key] = validate.number(
                key, value, 0, strict_minimum=True, unit="µm/px (level 0; or null)",
                error=ConfigError,
            )  # fmt: skip
    if "mpp" in values:
        if "slide_mpp" in values and values["slide_mpp"] != values["mpp"]:
            raise ConfigError(
                f"slide_mpp={values['slide_mpp']:g} and mpp={values['mpp']:g} disagree; mpp= is "
                "the old name of slide_mpp= (level-0 µm/px): give slide_mpp= only"
            )
        log.warning("mpp= is deprecated here: it is the slide's level-0 µm/px, now slide_mpp=")
    return values.get("slide_mpp", values.get("mpp"))


def open_slide(path: str | Path, mpp: float | None = None) -> Slide:
    """Open a whole-slide image; the file is validated now, so a bad path fails here.

    Args:
        path: slide file in any format OpenSlide reads (tiled TIFF, .svs, .ndpi, .mrxs, ...).
        mpp: µm per level-0 pixel, overriding the file's ``openslide.mpp-x`` (use it for slides
            without resolution metadata).

    Raises:
        SlideError: missing file, directory, unsupported format (e.g. a stripped TIFF or a text
            file), damaged or truncated file, or a bad ``mpp``.
    """
    return Slide(path, mpp=mpp)


__all__ = ["MAX_OPEN_HANDLES", "SLIDE_SUFFIXES", "Slide", "open_handle_count", "open_slide"]
