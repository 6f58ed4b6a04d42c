"""The on-disk patch cache: images, masks, an index and a manifest, written slide by slide.

Training never reads slides; it reads patch caches that ``python -m lymphnode.prepare`` (or
:func:`import_patch_folder`) wrote once. A cache is a directory::

    <cache>/manifest.json                 format_version, codec, quality, patch_size, has_masks,
                                          mask_encoding, config (the dict that built it), and
                                          slides: ordered [{id, status: "complete", n, checksums}]
    <cache>/shards/<slide_id>/index.npy   structured (n,): slide (str), x, y (int64, level-0 px,
                                          top-left; -1 = unknown), level (int32), label (int8:
                                          1 tumor, 0 non-tumor, -1 unknown)
    <cache>/shards/<slide_id>/images.npy  codec "raw":  (n, P, P, 3) uint8 RGB, memory-mapped
    <cache>/shards/<slide_id>/images.jpegs + offsets.npy
                                          codec "jpeg": the n JPEG streams back to back, and the
                                          (n + 1,) int64 byte offsets of each stream in that file
    <cache>/shards/<slide_id>/masks.npy   when has_masks: (n, P, ceil(P / 8)) uint8, the {0, 1}
                                          masks bit-packed along x (``np.packbits(axis=-1)``)

``checksums`` maps each shard file name to its SHA-256. Every file is a plain ``.npy`` (or a
concatenation of standard JPEG files), so a cache is readable without lymphnode.

Writing (:class:`CacheWriter`) is per slide and atomic: a slide's patches stream into
``shards/.tmp-<slide_id>-<host>-<pid>``, which is fsynced and renamed to ``shards/<slide_id>``
only when the slide is complete; the slide becomes visible once :meth:`CacheWriter.commit` records it in the
manifest (replaced atomically). Shards can be written in worker processes while the parent
commits; a build killed at any moment and rerun with the same config resumes, and after
:meth:`CacheWriter.finalize` every file is byte-identical to an uninterrupted build (no
timestamps or process ids in final files).

Reading (:class:`PatchCache`) sees only complete slides, opens files lazily in the process that
reads (so a cache can be pickled into DataLoader workers) and is safe for many processes at once.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import copy
import hashlib
import io
import itertools
import json
import logging
import operator
import os
import re
import shutil
import socket
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import imagecodecs
import numpy as np

from lymphnode.core.errors import CacheError, ConfigError

try:  # POSIX: serialises manifest updates between writer processes (job arrays, process pools)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
CODECS = ("raw", "jpeg")
MASK_ENCODING = "packbits"  # {0,1} masks bit-packed along x: 8x smaller, unpacking costs ~5 µs

MANIFEST_NAME = "manifest.json"
SHARDS_DIR = "shards"
INDEX_FILE = "index.npy"
MASKS_FILE = "masks.npy"
RAW_IMAGES_FILE = "images.npy"
JPEG_IMAGES_FILE = "images.jpegs"
JPEG_OFFSETS_FILE = "offsets.npy"

_TMP_PREFIX = ".tmp-"
_MANIFEST_TMP_PREFIX = ".manifest.json.tmp-"
_SLIDE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,199}$")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")

__all__ = [
    "CACHE_FORMAT_VERSION",
    "CODECS",
    "CacheWriter",
    "PatchCache",
    "ShardWriter",
    "import_patch_folder",
    "main",
]


# ----------------------------------------------------------------------------------------------
# small file helpers


def _write(fh: Any, data: Any) -> None:
    """Write ``data`` to an open binary file (one place, so tests can make the disk fill up)."""
    fh.write(data)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _save_npy(path: Path, array: np.ndarray) -> None:
    """``np.save`` that goes through :func:`_write` and fsyncs."""
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
    with open(path, "wb") as fh:
        _write(fh, buffer.getbuffer())
        fh.flush()
        os.fsync(fh.fileno())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _owner() -> str:
    """``<host>-<pid>``: names temp files, so that a build on another machine sharing the cache
    directory (a job array on a network file system) is never taken for a killed one."""
    host = re.sub(r"[^A-Za-z0-9.]", "", socket.gethostname()) or "host"
    return f"{host}-{os.getpid()}"


def _stale(name: str, prefix: str, other_hosts: bool = False) -> bool:
    """Whether a temp entry ``<prefix>...-<host>-<pid>`` belongs to a process of this machine
    that no longer runs (or, with ``other_hosts``, to any other machine)."""
    rest, _, pid_text = name[len(prefix) :].rpartition("-")
    if not pid_text.isdigit():
        return True
    host = _owner().rpartition("-")[0]
    if not (rest == host or rest.endswith(f"-{host}")):
        return other_hosts  # another machine's: it may still be writing
    pid = int(pid_text)
    return pid != os.getpid() and not _pid_alive(pid)


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Exclusive advisory lock on the cache directory (read-modify-write of the manifest)."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _check_slide_id(slide_id: object) -> str:
    if not isinstance(slide_id, str) or not _SLIDE_ID.match(slide_id):
        raise CacheError(
            f"invalid slide id {slide_id!r}: expected 1-200 characters of letters, digits and "
            "'._+-', starting with a letter or digit (it names a shard directory)"
        )
    return slide_id


def _index_dtype(slide_width: int) -> np.dtype:
    return np.dtype(
        [
            ("slide", f"<U{max(1, slide_width)}"),
            ("x", "<i8"),
            ("y", "<i8"),
            ("level", "<i4"),
            ("label", "i1"),
        ]
    )


def _shard_files(codec: str, has_masks: bool) -> tuple[str, ...]:
    images = _IMAGE_SINKS[codec].FILES
    return (*images, INDEX_FILE, *((MASKS_FILE,) if has_masks else ()))


# ----------------------------------------------------------------------------------------------
# manifest


def _jsonable(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config as plain JSON types (Path -> str, numpy scalars -> Python, tuples -> lists)."""
    if not isinstance(config, Mapping):
        raise ConfigError(f"cache config must be a mapping, got {type(config).__name__}")

    def default(value: Any) -> Any:
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, np.ndarray):
            return value.tolist()
        raise TypeError(f"{type(value).__name__} {value!r}")

    try:
        return json.loads(json.dumps(dict(config), default=default, sort_keys=True))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"cache config is not JSON-serialisable: {exc}") from exc


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict) and value:
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: value}


_ABSENT = object()


def _differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``key: old → new`` for every flattened key whose value differs."""

    def show(value: Any) -> str:
        return "<absent>" if value is _ABSENT else json.dumps(value)

    a, b = _flatten(dict(old), ""), _flatten(dict(new), "")
    keys = sorted(set(a) | set(b))
    return [
        f"{key}: {show(a.get(key, _ABSENT))} → {show(b.get(key, _ABSENT))}"
        for key in keys
        if a.get(key, _ABSENT) != b.get(key, _ABSENT)
    ]


def _settings(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """What must match for a writer to continue an existing cache."""
    return {
        "codec": manifest.get("codec"),
        "quality": manifest.get("quality"),
        "patch_size": manifest.get("patch_size"),
        "has_masks": manifest.get("has_masks"),
        "mask_encoding": manifest.get("mask_encoding"),
        "config": manifest.get("config"),
    }


def _read_manifest(cache: Path) -> dict[str, Any]:
    """The parsed and checked manifest of ``cache``; CacheError naming the file otherwise."""
    path = cache / MANIFEST_NAME
    if not path.is_file():
        raise CacheError(
            f"{cache} is not a patch cache: {MANIFEST_NAME} is missing (the build never "
            "started, or the directory is something else)"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CacheError(f"cannot read patch-cache manifest {path}: {exc}") from exc
    if not isinstance(manifest, dict):
        raise CacheError(f"patch-cache manifest {path} is not a JSON object")
    version = manifest.get("format_version")
    if version != CACHE_FORMAT_VERSION:
        raise CacheError(
            f"patch-cache manifest {path} has format_version {version!r}; this lymphnode reads "
            f"format_version {CACHE_FORMAT_VERSION} (rebuild the cache with force=true)"
        )
    problems = []
    if manifest.get("codec") not in CODECS:
        problems.append(f"codec {manifest.get('codec')!r} (expected one of {list(CODECS)})")
    patch_size = manifest.get("patch_size")
    if not isinstance(patch_size, int) or isinstance(patch_size, bool) or patch_size < 1:
        problems.append(f"patch_size {patch_size!r} (expected a positive integer)")
    if not isinstance(manifest.get("has_masks"), bool):
        problems.append(f"has_masks {manifest.get('has_masks')!r} (expected true or false)")
    if manifest.get("has_masks") and manifest.get("mask_encoding") != MASK_ENCODING:
        problems.append(f"mask_encoding {manifest.get('mask_encoding')!r} (expected 'packbits')")
    if not isinstance(manifest.get("config"), dict):
        problems.append("config (expected an object)")
    slides = manifest.get("slides")
    if not isinstance(slides, list) or not all(
        isinstance(s, dict)
        and isinstance(s.get("id"), str)
        and isinstance(s.get("n"), int)
        and isinstance(s.get("checksums"), dict)
        for s in slides
    ):
        problems.append("slides (expected a list of {id, status, n, checksums})")
    if problems:
        raise CacheError(f"patch-cache manifest {path} is malformed: " + "; ".join(problems))
    return manifest


def _write_manifest(cache: Path, manifest: Mapping[str, Any]) -> None:
    """Replace ``manifest.json`` atomically (temp file, fsync, os.replace, fsync dir)."""
    text = json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    tmp = cache / f"{_MANIFEST_TMP_PREFIX}{_owner()}"
    try:
        with open(tmp, "wb") as fh:
            _write(fh, text.encode("utf-8"))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, cache / MANIFEST_NAME)
        _fsync_dir(cache)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise CacheError(f"cannot write the manifest of patch cache {cache}: {exc}") from exc


# ----------------------------------------------------------------------------------------------
# image codecs: a sink writes one slide's images, a source reads them back


class _NpyAppender:
    """Streams equally shaped items into a ``.npy`` file whose leading dimension grows.

    NumPy pads every header so that the leading dimension can grow to 21 digits in place, so the
    header written for n = 0 is rewritten with the final n at the same length: one pass, memory
    independent of n, and bytes identical to ``np.save`` of the whole array.
    """

    def __init__(self, path: Path, item_shape: tuple[int, ...], dtype: Any = np.uint8) -> None:
        self.path = path
        self.n = 0
        self._item_shape = item_shape
        self._descr = np.lib.format.dtype_to_descr(np.dtype(dtype))
        self._fh = open(path, "wb")  # noqa: SIM115 - closed in close()/abort()
        self._header_size = self._write_header()

    def _write_header(self) -> int:
        buffer = io.BytesIO()
        header = {
            "descr": self._descr,
            "fortran_order": False,
            "shape": (self.n, *self._item_shape),
        }
        np.lib.format.write_array_header_1_0(buffer, header)
        _write(self._fh, buffer.getbuffer())
        return buffer.tell()

    def append(self, item: np.ndarray) -> None:
        _write(self._fh, np.ascontiguousarray(item).data)
        self.n += 1

    def close(self) -> None:
        self._fh.flush()
        self._fh.seek(0)
        if self._write_header() != self._header_size:  # pragma: no cover - NumPy guarantees it
            raise CacheError(f"internal error: the .npy header of {self.path} changed size")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self._fh.close()


class _RawSink:
    FILES = (RAW_IMAGES_FILE,)

    def __init__(self, directory: Path, patch_size: int, quality: int | None) -> None:
        self._images = _NpyAppender(directory / RAW_IMAGES_FILE, (patch_size, patch_size, 3))

    def add(self, image: np.ndarray) -> None:
        self._images.append(image)

    def close(self) -> None:
        self._images.close()

    def abort(self) -> None:
        self._images.abort()


class _JpegSink:
    FILES = (JPEG_IMAGES_FILE, JPEG_OFFSETS_FILE)

    def __init__(self, directory: Path, patch_size: int, quality: int | None) -> None:
        self._directory = directory
        self._quality = quality
        self._offsets = [0]
        self._fh = open(directory / JPEG_IMAGES_FILE, "wb")  # noqa: SIM115 - closed in close()

    def add(self, image: np.ndarray) -> None:
        data = imagecodecs.jpeg8_encode(image, level=self._quality)  # RGB in, YCbCr 4:2:0 out
        _write(self._fh, data)
        self._offsets.append(self._offsets[-1] + len(data))

    def close(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        _save_npy(self._directory / JPEG_OFFSETS_FILE, np.asarray(self._offsets, dtype="<i8"))

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self._fh.close()


_IMAGE_SINKS: dict[str, type[_RawSink] | type[_JpegSink]] = {"raw": _RawSink, "jpeg": _JpegSink}


def _load_npy(path: Path, mmap: bool) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise CacheError(f"cannot read patch-cache file {path}: {exc}") from exc


def _expect_shape(array: np.ndarray, shape: tuple[int, ...], path: Path) -> None:
    if array.shape != shape:
        raise CacheError(
            f"patch-cache file {path} holds an array of shape {array.shape}, expected {shape} "
            "from the manifest; the cache is corrupt (rebuild it with force=true)"
        )


class _RawSource:
    def __init__(self, directory: Path, n: int, patch_size: int) -> None:
        path = directory / RAW_IMAGES_FILE
        self._images = _load_npy(path, mmap=True)
        _expect_shape(self._images, (n, patch_size, patch_size, 3), path)

    def image(self, j: int) -> np.ndarray:
        return np.array(self._images[j])  # a private, writable copy; (P, P, 3) uint8


class _JpegSource:
    def __init__(self, directory: Path, n: int, patch_size: int) -> None:
        self._path = directory / JPEG_IMAGES_FILE
        self._shape = (patch_size, patch_size, 3)
        self._offsets = _load_npy(directory / JPEG_OFFSETS_FILE, mmap=False).tolist()
        if len(self._offsets) != n + 1:
            raise CacheError(
                f"patch-cache file {directory / JPEG_OFFSETS_FILE} has {len(self._offsets)} "
                f"offsets, expected {n + 1}; the cache is corrupt (rebuild it with force=true)"
            )
        size = self._path.stat().st_size
        if size != self._offsets[-1]:
            raise CacheError(
                f"patch-cache file {self._path} has {size} bytes, expected {self._offsets[-1]}; "
                "the cache is corrupt (rebuild it with force=true)"
            )
        self._pack = np.memmap(self._path, dtype=np.uint8, mode="r") if size else None

    def image(self, j: int) -> np.ndarray:
        try:
            data = self._pack[self._offsets[j] : self._offsets[j + 1]]  # type: ignore[index]
            image = imagecodecs.jpeg8_decode(data)  # type: ignore[arg-type]
        except Exception as exc:
            raise CacheError(f"cannot decode JPEG patch {j} of {self._path}: {exc}") from exc
        if image.shape != self._shape:
            raise CacheError(
                f"JPEG patch {j} of {self._path} decodes to shape {image.shape}, expected "
                f"{self._shape}"
            )
        return image


_IMAGE_SOURCES: dict[str, type[_RawSource] | type[_JpegSource]] = {
    "raw": _RawSource,
    "jpeg": _JpegSource,
}


# ----------------------------------------------------------------------------------------------
# writer


class ShardWriter:
    """Writes one slide's patches; made by :meth:`CacheWriter.slide`, used as a context manager.

    Patches stream to ``shards/.tmp-<slide_id>-<host>-<pid>`` (memory does not grow with their
    number). A successful ``with`` block fsyncs the files and renames the directory to
    ``shards/<slide_id>``; :attr:`info` then holds the picklable record that
    :meth:`CacheWriter.commit` puts into the manifest. A block that raises leaves nothing behind.
    """

    def __init__(
        self,
        cache: Path,
        slide_id: str,
        *,
        codec: str,
        patch_size: int,
        has_masks: bool,
        quality: int | None,
        n: int | None,
    ) -> None:
        self.cache = cache
        self.slide_id = slide_id
        self.n_expected = n
        self._codec = codec
        self._patch_size = patch_size
        self._has_masks = has_masks
        self._quality = quality
        self._tmp = cache / SHARDS_DIR / f"{_TMP_PREFIX}{slide_id}-{_owner()}"
        self._final = cache / SHARDS_DIR / slide_id
        self._images: _RawSink | _JpegSink | None = None
        self._masks: _NpyAppender | None = None
        self._records: list[tuple[int, int, int, int]] = []  # (x, y, level, label), tiny
        self._info: dict[str, Any] | None = None
        self._open = False

    def __repr__(self) -> str:
        return f"ShardWriter({str(self.cache)!r}, slide={self.slide_id!r}, n={len(self._records)})"

    def _fail(self, action: str, exc: BaseException) -> CacheError:
        return CacheError(
            f"cannot {action} slide {self.slide_id!r} of patch cache {self.cache}: {exc}; "
            "the slide was not written (earlier complete slides are kept)"
        )

    def __enter__(self) -> ShardWriter:
        if self._open or self._info is not None:
            raise CacheError(f"the shard writer of slide {self.slide_id!r} can be used only once")
        try:
            if self._tmp.exists():
                shutil.rmtree(self._tmp)
            self._tmp.mkdir(parents=True)
            self._images = _IMAGE_SINKS[self._codec](self._tmp, self._patch_size, self._quality)
            if self._has_masks:
                width = (self._patch_size + 7) // 8
                self._masks = _NpyAppender(self._tmp / MASKS_FILE, (self._patch_size, width))
        except OSError as exc:
            self._abort()
            raise self._fail("start", exc) from exc
        self._open = True
        return self

    def add(
        self,
        image: np.ndarray,
        mask: np.ndarray | None = None,
        *,
        x: int,
        y: int,
        level: int,
        label: int,
    ) -> None:
        """Append one patch.

        Args:
            image: (P, P, 3) uint8 RGB, P = the cache's patch_size (pixels of ``level``).
            mask: (P, P) bool or uint8 {0, 1} tumor mask when the cache has masks, else None.
            x, y: level-0 pixel coordinates of the patch's top-left corner (-1 = unknown).
            level: the slide level the patch was read at (>= 0).
            label: 1 tumor, 0 non-tumor, -1 unknown.
        """
        if not self._open:
            raise CacheError(
                f"add() for slide {self.slide_id!r} outside its `with writer.slide(...)` block"
            )
        k = len(self._records)
        where = f"patch {k} of slide {self.slide_id!r} (cache {self.cache})"
        p = self._patch_size
        if self.n_expected is not None and k >= self.n_expected:
            raise CacheError(f"{where}: more patches than the expected n={self.n_expected}")
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.shape != (p, p, 3):
            raise CacheError(
                f"{where}: image has shape {getattr(image, 'shape', None)} dtype "
                f"{getattr(image, 'dtype', type(image).__name__)}; expected ({p}, {p}, 3) uint8"
            )
        if self._has_masks:
            if mask is None:
                raise CacheError(f"{where}: the cache has masks, but mask is None")
            if not isinstance(mask, np.ndarray) or mask.shape != (p, p):
                raise CacheError(
                    f"{where}: mask has shape {getattr(mask, 'shape', None)}; expected ({p}, {p})"
                )
            if mask.dtype != np.bool_ and (mask.dtype != np.uint8 or mask.max(initial=0) > 1):
                raise CacheError(
                    f"{where}: mask must be bool or uint8 with values {{0, 1}}, got dtype "
                    f"{mask.dtype} with max {mask.max(initial=0)}"
                )
        elif mask is not None:
            raise CacheError(f"{where}: the cache was opened with has_masks=False, got a mask")
        values = {"x": x, "y": y, "level": level, "label": label}
        for name, value in values.items():
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise CacheError(f"{where}: {name}={value!r} is not an integer")
        if x < -1 or y < -1 or level < 0 or label not in (-1, 0, 1):
            raise CacheError(
                f"{where}: x={x}, y={y}, level={level}, label={label}; expected x, y >= -1 "
                "(level-0 px, -1 = unknown), level >= 0, label in {-1, 0, 1}"
            )
        assert self._images is not None
        try:
            self._images.add(image)
            if self._masks is not None:
                self._masks.append(np.packbits(mask, axis=-1))  # type: ignore[arg-type]
        except OSError as exc:
            raise self._fail("write", exc) from exc
        self._records.append((int(x), int(y), int(level), int(label)))

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._open = False
        if exc_type is not None:
            self._abort()
            return
        try:
            self._finish()
        except OSError as error:
            self._abort()
            raise self._fail("finish", error) from error
        except BaseException:
            self._abort()
            raise

    def _finish(self) -> None:
        n = len(self._records)
        if self.n_expected is not None and n != self.n_expected:
            raise CacheError(
                f"slide {self.slide_id!r} of patch cache {self.cache}: {n} patches were added, "
                f"expected n={self.n_expected}; the slide was not written"
            )
        assert self._images is not None
        self._images.close()
        if self._masks is not None:
            self._masks.close()
        index = np.array(
            [(self.slide_id, *record) for record in self._records],
            dtype=_index_dtype(len(self.slide_id)),
        )
        _save_npy(self._tmp / INDEX_FILE, index)
        files = _shard_files(self._codec, self._has_masks)
        checksums = {name: _sha256(self._tmp / name) for name in sorted(files)}
        _fsync_dir(self._tmp)
        if self._final.exists():  # an earlier run renamed it but was killed before committing
            shutil.rmtree(self._final)
        os.rename(self._tmp, self._final)
        _fsync_dir(self._final.parent)
        self._info = {"id": self.slide_id, "status": "complete", "n": n, "checksums": checksums}
        log.debug("wrote %d patches of slide %s to %s", n, self.slide_id, self._final)

    def _abort(self) -> None:
        for sink in (self._images, self._masks):
            if sink is not None:
                sink.abort()
        shutil.rmtree(self._tmp, ignore_errors=True)

    @property
    def n(self) -> int:
        """Patches added so far."""
        return len(self._records)

    @property
    def info(self) -> dict[str, Any]:
        """The manifest record of the finished slide (picklable): id, status, n, checksums."""
        if self._info is None:
            raise CacheError(f"slide {self.slide_id!r} is not finished (its `with` block is open)")
        return dict(self._info)


class CacheWriter:
    """Builds a patch cache slide by slide; see the module docstring for the layout.

    Opening an existing cache continues it when its settings (codec, quality, patch_size,
    has_masks) and ``config`` equal these; otherwise it raises CacheError listing the differing
    keys, unless ``force=True``, which deletes the cache's manifest and shards and starts over.
    Temp directories left by killed builds are removed. Typical use::

        writer = CacheWriter(path, cfg, codec="jpeg", patch_size=300, has_masks=True)
        for slide_id in slide_ids:              # or in a process pool: pickle the writer
            if writer.is_complete(slide_id):
                continue
            with writer.slide(slide_id, n=len(locations)) as shard:
                for loc in locations:
                    shard.add(image, mask, x=loc.x, y=loc.y, level=0, label=loc.label)
            writer.commit(slide_id, shard.info)   # in the parent when shards come from workers
        writer.finalize(slide_ids)              # manifest order = config order

    Args:
        path: the cache directory (created if missing).
        config: the JSON-serialisable settings that built the cache (stored in the manifest).
        codec: "raw" (uint8 memory map, fastest) or "jpeg" (about 10x smaller).
        patch_size: patch side P in pixels of the level read.
        has_masks: whether every patch has a (P, P) {0, 1} tumor mask.
        quality: JPEG quality 1-100 (codec "jpeg" only).
        force: delete an existing cache that was built differently (or is unreadable).
    """

    def __init__(
        self,
        path: str | Path,
        config: Mapping[str, Any],
        *,
        codec: str = "raw",
        patch_size: int,
        has_masks: bool,
        quality: int = 90,
        force: bool = False,
    ) -> None:
        if codec not in CODECS:
            raise ConfigError(f"cache codec {codec!r} is not one of {list(CODECS)}")
        if isinstance(patch_size, bool) or not isinstance(patch_size, (int, np.integer)):
            raise ConfigError(f"patch_size must be a positive integer, got {patch_size!r}")
        if patch_size < 1:
            raise ConfigError(f"patch_size must be a positive integer, got {patch_size!r}")
        if codec == "jpeg" and (
            isinstance(quality, bool)
            or not isinstance(quality, (int, np.integer))
            or not 1 <= quality <= 100
        ):
            raise ConfigError(f"JPEG quality must be an integer in 1..100, got {quality!r}")
        self.path = Path(path)
        self.codec = codec
        self.patch_size = int(patch_size)
        self.has_masks = bool(has_masks)
        self.quality: int | None = int(quality) if codec == "jpeg" else None
        fresh = {
            "format_version": CACHE_FORMAT_VERSION,
            "codec": self.codec,
            "quality": self.quality,
            "patch_size": self.patch_size,
            "has_masks": self.has_masks,
            "mask_encoding": MASK_ENCODING,
            "config": _jsonable(config),
            "slides": [],
        }
        if self.path.exists() and not self.path.is_dir():
            raise CacheError(f"patch cache path {self.path} exists and is not a directory")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CacheError(f"cannot create patch cache directory {self.path}: {exc}") from exc
        with _locked(self.path):
            self._manifest = self._open_or_create(fresh, force)
            self._remove_stale_temps()

    def _open_or_create(self, fresh: dict[str, Any], force: bool) -> dict[str, Any]:
        if (self.path / MANIFEST_NAME).exists():
            try:
                existing = _read_manifest(self.path)
            except CacheError as exc:
                if not force:
                    raise CacheError(f"{exc}; pass force=true to rebuild it") from exc
                self._wipe(f"its manifest is unreadable ({exc})")
            else:
                changes = _differences(_settings(existing), _settings(fresh))
                if not changes:
                    return existing
                if not force:
                    raise CacheError(
                        f"patch cache {self.path} was built with another configuration ("
                        + "; ".join(changes)
                        + "); pass force=true to rebuild it (this deletes its "
                        f"{len(existing['slides'])} slides) or choose another cache directory"
                    )
                self._wipe("force=True and the configuration changed: " + "; ".join(changes))
        else:
            ours = {SHARDS_DIR}
            others = [
                p.name
                for p in self.path.iterdir()
                if p.name not in ours and not p.name.startswith(_MANIFEST_TMP_PREFIX)
            ]
            if others:
                raise CacheError(
                    f"{self.path} is not empty ({', '.join(sorted(others)[:5])}) and holds no "
                    f"{MANIFEST_NAME}; refusing to write a patch cache into it (choose a new or "
                    "empty directory)"
                )
            if (self.path / SHARDS_DIR).exists():
                if not force:
                    raise CacheError(
                        f"{self.path} has a {SHARDS_DIR}/ folder but no {MANIFEST_NAME}; pass "
                        "force=true to rebuild the cache"
                    )
                self._wipe(f"force=True and {MANIFEST_NAME} is missing")
        _write_manifest(self.path, fresh)
        return copy.deepcopy(fresh)

    def _wipe(self, reason: str) -> None:
        log.warning("deleting the patch cache %s: %s", self.path, reason)
        try:  # the manifest first: from then on no slide counts as complete
            (self.path / MANIFEST_NAME).unlink(missing_ok=True)
            if (self.path / SHARDS_DIR).exists():
                shutil.rmtree(self.path / SHARDS_DIR)
        except OSError as exc:
            raise CacheError(f"cannot delete the patch cache {self.path}: {exc}") from exc

    def _remove_stale_temps(self, other_hosts: bool = False) -> None:
        """Remove temp shards and manifest temps whose process is gone (killed builds); those of
        other machines only with ``other_hosts`` (at finalize, when every slide is complete)."""
        for entry in self.path.iterdir():
            if entry.name.startswith(_MANIFEST_TMP_PREFIX) and _stale(
                entry.name, _MANIFEST_TMP_PREFIX, other_hosts
            ):
                entry.unlink(missing_ok=True)
        shards = self.path / SHARDS_DIR
        if shards.is_dir():
            for entry in shards.iterdir():
                if entry.name.startswith(_TMP_PREFIX) and _stale(
                    entry.name, _TMP_PREFIX, other_hosts
                ):
                    log.info("removing %s, left by a build that was killed", entry)
                    shutil.rmtree(entry, ignore_errors=True)

    def __repr__(self) -> str:
        return (
            f"CacheWriter({str(self.path)!r}, codec={self.codec!r}, patch_size={self.patch_size}, "
            f"has_masks={self.has_masks}, complete={len(self._manifest['slides'])})"
        )

    @property
    def manifest(self) -> dict[str, Any]:
        """A copy of the manifest as last read or written by this writer."""
        return copy.deepcopy(self._manifest)

    def _refresh(self) -> dict[str, Any]:
        self._manifest = _read_manifest(self.path)
        return self._manifest

    def is_complete(self, slide_id: str) -> bool:
        """Whether ``slide_id`` is recorded complete in the manifest (re-read from disk)."""
        _check_slide_id(slide_id)
        for record in self._refresh()["slides"]:
            if record["id"] == slide_id and record.get("status") == "complete":
                return (self.path / SHARDS_DIR / slide_id).is_dir()
        return False

    def slide(self, slide_id: str, n: int | None = None) -> ShardWriter:
        """A :class:`ShardWriter` for ``slide_id``; ``n``, when given, is the exact patch count.

        Works in any process that has this writer (it pickles); one writer per slide at a time.
        """
        _check_slide_id(slide_id)
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            raise ConfigError(f"n must be a non-negative integer or None, got {n!r}")
        if self.is_complete(slide_id):
            raise CacheError(
                f"slide {slide_id!r} is already complete in patch cache {self.path}; skip it "
                "(CacheWriter.is_complete) or rebuild the cache with force=true"
            )
        return ShardWriter(
            self.path,
            slide_id,
            codec=self.codec,
            patch_size=self.patch_size,
            has_masks=self.has_masks,
            quality=self.quality,
            n=n,
        )

    def commit(self, slide_id: str, info: Mapping[str, Any]) -> None:
        """Record a finished shard (``ShardWriter.info``) in the manifest, atomically."""
        _check_slide_id(slide_id)
        if not isinstance(info, Mapping) or info.get("id") != slide_id:
            raise CacheError(
                f"commit({slide_id!r}, ...) needs the info of that slide's finished shard, got "
                f"{info!r}"
            )
        directory = self.path / SHARDS_DIR / slide_id
        checksums = info.get("checksums")
        expected = set(_shard_files(self.codec, self.has_masks))
        if (
            info.get("status") != "complete"
            or not isinstance(info.get("n"), int)
            or not isinstance(checksums, Mapping)
            or set(checksums) != expected
        ):
            raise CacheError(f"commit({slide_id!r}, ...): malformed shard info {info!r}")
        missing = [name for name in sorted(expected) if not (directory / name).is_file()]
        if missing:
            raise CacheError(
                f"cannot commit slide {slide_id!r}: {directory} lacks {', '.join(missing)}"
            )
        record = {
            "id": slide_id,
            "status": "complete",
            "n": int(info["n"]),
            "checksums": dict(checksums),
        }
        with _locked(self.path):
            manifest = self._refresh()
            slides = [s for s in manifest["slides"] if s["id"] != slide_id]
            slides.append(record)
            manifest["slides"] = slides
            _write_manifest(self.path, manifest)
        log.info("patch cache %s: slide %s complete (%d patches)", self.path, slide_id, record["n"])

    def finalize(self, slide_order: Sequence[str]) -> None:
        """Put the manifest's slides in ``slide_order`` (the config's order, not completion order).

        Every slide in ``slide_order`` must be complete and no other slide may be. Also removes
        shard directories that no manifest entry refers to, so that a resumed build ends
        byte-identical to an uninterrupted one.
        """
        order = [_check_slide_id(s) for s in slide_order]
        duplicates = sorted({s for s in order if order.count(s) > 1})
        if duplicates:
            raise CacheError(f"finalize: slide ids repeated in slide_order: {duplicates}")
        with _locked(self.path):
            manifest = self._refresh()
            by_id = {s["id"]: s for s in manifest["slides"] if s.get("status") == "complete"}
            missing = [s for s in order if s not in by_id]
            extra = [s for s in by_id if s not in order]
            if missing or extra:
                raise CacheError(
                    f"cannot finalize patch cache {self.path}: "
                    + (f"slides not complete: {missing}" if missing else "")
                    + ("; " if missing and extra else "")
                    + (f"complete slides not in slide_order: {extra}" if extra else "")
                )
            manifest["slides"] = [by_id[s] for s in order]
            _write_manifest(self.path, manifest)
            shards = self.path / SHARDS_DIR
            if shards.is_dir():
                for entry in shards.iterdir():
                    if not entry.name.startswith(_TMP_PREFIX) and entry.name not in by_id:
                        log.info("removing %s: not in the manifest (uncommitted)", entry)
                        shutil.rmtree(entry, ignore_errors=True)
            self._remove_stale_temps(other_hosts=True)


# ----------------------------------------------------------------------------------------------
# reader


class _ShardReader:
    """Open files of one shard (in one process)."""

    def __init__(self, directory: Path, codec: str, n: int, patch_size: int, masks: bool) -> None:
        self._source = _IMAGE_SOURCES[codec](directory, n, patch_size)
        self._patch_size = patch_size
        self._masks: np.ndarray | None = None
        if masks:
            path = directory / MASKS_FILE
            self._masks = _load_npy(path, mmap=True)
            _expect_shape(self._masks, (n, patch_size, (patch_size + 7) // 8), path)

    def read(self, j: int) -> tuple[np.ndarray, np.ndarray | None]:
        image = self._source.image(j)
        if self._masks is None:
            return image, None
        return image, np.unpackbits(self._masks[j], axis=-1, count=self._patch_size)


class PatchCache:
    """Read side of a patch cache: ``cache[i] -> (image, mask or None)`` over its complete slides.

    Patches are numbered in manifest slide order, then in the order they were written. Files are
    opened lazily in the process that reads, so a PatchCache can be pickled into DataLoader
    workers; any number of processes may read one cache at once.

    Args:
        path: the cache directory.
        verify: check every shard file's SHA-256 against the manifest on open (reads everything).

    Raises:
        CacheError: missing cache or manifest, unknown format_version, missing shard files,
            checksum mismatch (with ``verify=True``), corrupt shard files (when read).
    """

    def __init__(self, path: str | Path, *, verify: bool = False) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise CacheError(f"patch cache not found: {self.path}")
        if not self.path.is_dir():
            raise CacheError(f"patch cache {self.path} is not a directory")
        manifest = _read_manifest(self.path)
        self._manifest = manifest
        self._codec: str = manifest["codec"]
        self._patch_size: int = manifest["patch_size"]
        self._has_masks: bool = manifest["has_masks"]
        records = [s for s in manifest["slides"] if s.get("status") == "complete"]
        expected = set(_shard_files(self._codec, self._has_masks))
        for record in records:
            directory = self.path / SHARDS_DIR / _check_slide_id(record["id"])
            if set(record["checksums"]) != expected:
                raise CacheError(
                    f"patch-cache manifest {self.path / MANIFEST_NAME}: slide {record['id']!r} "
                    f"lists files {sorted(record['checksums'])}, expected {sorted(expected)}"
                )
            for name in sorted(expected):
                if not (directory / name).is_file():
                    raise CacheError(
                        f"patch cache {self.path}: {directory / name} is missing although the "
                        "manifest lists the slide as complete (rebuild with force=true)"
                    )
                if verify:
                    digest = _sha256(directory / name)
                    if digest != record["checksums"][name]:
                        raise CacheError(
                            f"checksum mismatch for {directory / name}: manifest "
                            f"{record['checksums'][name][:16]}…, file {digest[:16]}…; the cache "
                            "is corrupt (rebuild it with force=true)"
                        )
        self._slides: tuple[str, ...] = tuple(r["id"] for r in records)
        self._counts: tuple[int, ...] = tuple(int(r["n"]) for r in records)
        self._starts: list[int] = [0, *itertools.accumulate(self._counts)]
        self._handles: dict[int, _ShardReader] = {}
        self._pid: int | None = None
        self._index: np.ndarray | None = None

    # pickling: drop open memory maps and the (possibly large) index; both come back lazily
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handles"] = {}
        state["_pid"] = None
        state["_index"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return (
            f"PatchCache({str(self.path)!r}, n={len(self)}, slides={len(self._slides)}, "
            f"codec={self._codec!r}, patch_size={self._patch_size}, has_masks={self._has_masks})"
        )

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Patch ``i``: image (P, P, 3) uint8 RGB and mask (P, P) uint8 {0, 1} or None."""
        if isinstance(i, bool):
            raise TypeError("patch index must be an integer, got bool")
        try:
            i = operator.index(i)
        except TypeError:
            raise TypeError(f"patch index must be an integer, got {type(i).__name__}") from None
        n = self._starts[-1]
        if not 0 <= i < n:
            raise IndexError(f"patch index {i} out of range: cache {self.path} has {n} patches")
        s = bisect.bisect_right(self._starts, i) - 1
        return self._shard(s).read(i - self._starts[s])

    def _shard(self, s: int) -> _ShardReader:
        pid = os.getpid()
        if self._pid != pid:  # first read in this process (forked workers re-open their maps)
            self._handles = {}
            self._pid = pid
        shard = self._handles.get(s)
        if shard is None:
            directory = self.path / SHARDS_DIR / self._slides[s]
            shard = _ShardReader(
                directory, self._codec, self._counts[s], self._patch_size, self._has_masks
            )
            self._handles[s] = shard
        return shard

    def close(self) -> None:
        """Drop this process's open memory maps (they reopen on the next read)."""
        self._handles = {}

    def __enter__(self) -> PatchCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def manifest(self) -> dict[str, Any]:
        """A copy of the manifest (format_version, codec, config, slides, ...)."""
        return copy.deepcopy(self._manifest)

    @property
    def config(self) -> dict[str, Any]:
        """A copy of the config that built the cache."""
        return copy.deepcopy(self._manifest["config"])

    @property
    def codec(self) -> str:
        return self._codec

    @property
    def patch_size(self) -> int:
        """Patch side P in pixels (of the level the patches were read at)."""
        return self._patch_size

    @property
    def has_masks(self) -> bool:
        return self._has_masks

    @property
    def slides(self) -> tuple[str, ...]:
        """Ids of the complete slides, in manifest order."""
        return self._slides

    @property
    def slide_counts(self) -> dict[str, int]:
        """Patches per complete slide."""
        return dict(zip(self._slides, self._counts))

    @property
    def index(self) -> np.ndarray:
        """Read-only structured (N,) array: slide (str), x, y (level-0 px), level, label."""
        if self._index is None:
            parts = []
            for slide_id, n in zip(self._slides, self._counts):
                path = self.path / SHARDS_DIR / slide_id / INDEX_FILE
                part = _load_npy(path, mmap=False)
                if part.dtype.names != ("slide", "x", "y", "level", "label") or len(part) != n:
                    raise CacheError(
                        f"patch-cache index {path} has fields {part.dtype.names} and {len(part)} "
                        f"rows, expected (slide, x, y, level, label) and {n} rows"
                    )
                parts.append(part)
            width = max((len(s) for s in self._slides), default=1)
            index = np.empty(len(self), dtype=_index_dtype(width))
            for part, start in zip(parts, self._starts):
                index[start : start + len(part)] = part.astype(index.dtype)
            index.flags.writeable = False
            self._index = index
        return self._index

    @property
    def labels(self) -> np.ndarray:
        """(N,) int64: 1 tumor, 0 non-tumor, -1 unknown."""
        return self.index["label"].astype(np.int64)


# ----------------------------------------------------------------------------------------------
# importing a folder of patches


def _read_rgb(path: Path) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB; alpha is composited on white."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                raise CacheError(f"{path}: {im.mode} images are not supported (expected 8-bit)")
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                white = Image.new("RGBA", im.size, (255, 255, 255, 255))
                return np.asarray(Image.alpha_composite(white, im.convert("RGBA")).convert("RGB"))
            return np.asarray(im.convert("RGB"))
    except OSError as exc:
        raise CacheError(f"cannot read image {path}: {exc}") from exc


def _read_mask(path: Path) -> np.ndarray:
    """A 0/255 (or 0/1) mask file as (H, W) uint8 {0, 1}."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            array = np.asarray(im.convert("RGB") if im.mode not in ("1", "L") else im)
    except OSError as exc:
        raise CacheError(f"cannot read mask {path}: {exc}") from exc
    if array.ndim == 3:
        if not (array == array[..., :1]).all():
            raise CacheError(f"mask {path} is a colour image; expected a grey 0/255 mask")
        array = array[..., 0]
    values = np.unique(array)
    if not (set(values.tolist()) <= {0, 255} or set(values.tolist()) <= {0, 1}):
        raise CacheError(
            f"mask {path} has values {values[:8].tolist()}; expected 0/255 (or 0/1) only"
        )
    return (array > 0).astype(np.uint8)


def _image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size  # (width, height)
    except OSError as exc:
        raise CacheError(f"cannot read image {path}: {exc}") from exc


def import_patch_folder(
    images_dir: str | Path,
    out: str | Path,
    *,
    masks_dir: str | Path | None = None,
    slide_pattern: str = r"^(?P<slide>[^_]+)",
    codec: str = "raw",
    label_from_mask: bool = True,
    quality: int = 90,
    force: bool = False,
) -> PatchCache:
    """Turn a folder of equally sized square patches (PNG/JPEG/TIFF) into a patch cache.

    Files are taken in sorted name order; each file's slide id is the named group ``slide`` of
    ``slide_pattern`` searched in its file name. With ``masks_dir``, every image needs a mask of
    the same name (or the same stem with ``.png``) holding 0/255; the label is 1 when the mask has
    any tumor pixel (``label_from_mask``), else -1 (unknown). x and y are -1 (unknown), level 0.
    Rerunning resumes an interrupted import; the config records the folders and pattern.

    Returns:
        the finished cache, opened.

    Raises:
        ConfigError: bad pattern (invalid, or without a ``slide`` group), codec or quality.
        CacheError: missing folder, no images, a name the pattern does not match, a file of
            another size, a missing or non-binary mask, an existing cache built differently.
    """
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise CacheError(f"images folder not found: {images_dir}")
    masks_path = Path(masks_dir) if masks_dir is not None else None
    if masks_path is not None and not masks_path.is_dir():
        raise CacheError(f"masks folder not found: {masks_path}")
    try:
        pattern = re.compile(slide_pattern)
    except re.error as exc:
        raise ConfigError(
            f"slide_pattern {slide_pattern!r} is not a valid regular expression: {exc}"
        ) from exc
    if "slide" not in pattern.groupindex:
        raise ConfigError(
            f"slide_pattern {slide_pattern!r} has no named group 'slide'; write it as e.g. "
            r"'^(?P<slide>[^_]+)'"
        )
    if codec not in CODECS:
        raise ConfigError(f"cache codec {codec!r} is not one of {list(CODECS)}")

    files = sorted(
        p for p in images_dir.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES
    )
    if not files:
        raise CacheError(f"no PNG/JPEG/TIFF images ({', '.join(_IMAGE_SUFFIXES)}) in {images_dir}")
    ignored = sum(1 for p in images_dir.iterdir() if p.is_file()) - len(files)
    if ignored:
        log.warning("ignoring %d files in %s that are not PNG/JPEG/TIFF", ignored, images_dir)

    by_slide: dict[str, list[tuple[Path, Path | None]]] = {}
    first_size: tuple[int, int] | None = None
    for path in files:
        match = pattern.search(path.name)
        if match is None or not match.group("slide"):
            raise CacheError(
                f"file name {path.name!r} (in {images_dir}) does not match slide_pattern "
                f"{slide_pattern!r}: no slide id"
            )
        slide_id = match.group("slide")
        if not _SLIDE_ID.match(slide_id):
            raise CacheError(
                f"{path}: slide id {slide_id!r} from slide_pattern {slide_pattern!r} is not "
                "usable: expected letters, digits and '._+-', starting with a letter or digit"
            )
        size = _image_size(path)
        if first_size is None:
            first_size = size
            if size[0] != size[1]:
                raise CacheError(f"{path}: patches must be square, this one is {size[0]}x{size[1]}")
        elif size != first_size:
            raise CacheError(
                f"{path} is {size[0]}x{size[1]} px but {files[0].name} is "
                f"{first_size[0]}x{first_size[1]}; all patches must have the same size"
            )
        mask_file = None
        if masks_path is not None:
            candidates = [masks_path / path.name, masks_path / f"{path.stem}.png"]
            mask_file = next((c for c in candidates if c.is_file()), None)
            if mask_file is None:
                raise CacheError(f"no mask for {path}: looked for {candidates[0]} and .png")
            mask_size = _image_size(mask_file)
            if mask_size != size:
                raise CacheError(
                    f"mask {mask_file} is {mask_size[0]}x{mask_size[1]} px but its image {path} is "
                    f"{size[0]}x{size[1]}"
                )
        by_slide.setdefault(slide_id, []).append((path, mask_file))

    assert first_size is not None
    config = {
        "source": "import_patch_folder",
        "images_dir": str(images_dir.resolve()),
        "masks_dir": str(masks_path.resolve()) if masks_path is not None else None,
        "slide_pattern": slide_pattern,
        "label_from_mask": bool(label_from_mask),
    }
    writer = CacheWriter(
        out,
        config,
        codec=codec,
        patch_size=first_size[0],
        has_masks=masks_path is not None,
        quality=quality,
        force=force,
    )
    for slide_id, items in by_slide.items():
        if writer.is_complete(slide_id):
            continue
        with writer.slide(slide_id, n=len(items)) as shard:
            for image_path, mask_path in items:
                mask = _read_mask(mask_path) if mask_path is not None else None
                label = int(mask.any()) if mask is not None and label_from_mask else -1
                shard.add(_read_rgb(image_path), mask, x=-1, y=-1, level=0, label=label)
        writer.commit(slide_id, shard.info)
    writer.finalize(list(by_slide))
    return PatchCache(out)


# ----------------------------------------------------------------------------------------------
# command line


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lymphnode.cache import|info ...`` behind the error boundary of
    :mod:`lymphnode.core.boundary`; returns the exit status (1: bad input, 2: a bug)."""
    from lymphnode.core.boundary import cli_boundary

    return cli_boundary(_main)(argv)


def _main(argv: Sequence[str] | None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lymphnode.cache", description="Patch caches: import a folder, inspect."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    imp = commands.add_parser("import", help="a folder of patch images (+ masks) -> a cache")
    imp.add_argument("images", type=Path, help="folder of PNG/JPEG/TIFF patches, one size")
    imp.add_argument("out", type=Path, help="the cache directory to write")
    imp.add_argument("--masks", type=Path, help="folder of same-named 0/255 PNG masks")
    imp.add_argument(
        "--pattern",
        default=r"^(?P<slide>[^_]+)",
        help="regex with a named group 'slide' searched in each file name (default: %(default)s)",
    )
    imp.add_argument("--codec", choices=CODECS, default="raw")
    imp.add_argument("--quality", type=int, default=90, help="JPEG quality (codec jpeg)")
    imp.add_argument(
        "--no-label-from-mask",
        dest="label_from_mask",
        action="store_false",
        help="label -1 (unknown) instead of 1 when a mask has tumor pixels",
    )
    imp.add_argument("--force", action="store_true", help="rebuild a cache built differently")
    info = commands.add_parser("info", help="summarise a cache")
    info.add_argument("cache", type=Path)
    info.add_argument("--verify", action="store_true", help="check every file's SHA-256")
    args = parser.parse_args(argv)
    if args.command == "import":
        cache = import_patch_folder(
            args.images,
            args.out,
            masks_dir=args.masks,
            slide_pattern=args.pattern,
            codec=args.codec,
            label_from_mask=args.label_from_mask,
            quality=args.quality,
            force=args.force,
        )
    else:
        cache = PatchCache(args.cache, verify=args.verify)
    labels = cache.labels
    size = _folder_bytes(cache.path)
    print(
        f"{cache.path}: {len(cache)} patches from {len(cache.slides)} slides, codec "
        f"{cache.codec}, {cache.patch_size}x{cache.patch_size} px, masks "
        f"{'yes' if cache.has_masks else 'no'}, labels tumor {int((labels == 1).sum())} / "
        f"non-tumor {int((labels == 0).sum())} / unknown {int((labels == -1).sum())}, "
        f"{size / 1e6:.1f} MB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
