"""The patch-cache format: the file layout, the manifest, slide ids and the index dtype.

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

Written by :mod:`lymphnode.patches.writer`, read by :mod:`lymphnode.patches.reader`, filled from
image folders by :mod:`lymphnode.patches.importer`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lymphnode.core import atomic
from lymphnode.core.errors import CacheError, ConfigError

try:  # POSIX: serialises manifest updates between writer processes (job arrays, process pools)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

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

TMP_PREFIX = ".tmp-"  # shards/.tmp-<slide_id>-<host>-<pid>: a shard being written
MANIFEST_TMP_PREFIX = ".manifest.json.tmp-"  # the manifest being replaced (core.atomic)
SLIDE_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,199}$")
#: Image files of a shard, by codec.
IMAGE_FILES = {"raw": (RAW_IMAGES_FILE,), "jpeg": (JPEG_IMAGES_FILE, JPEG_OFFSETS_FILE)}

__all__ = [
    "CACHE_FORMAT_VERSION",
    "CODECS",
    "IMAGE_FILES",
    "MANIFEST_NAME",
    "MANIFEST_TMP_PREFIX",
    "SHARDS_DIR",
    "SLIDE_ID_PATTERN",
    "TMP_PREFIX",
    "check_slide_id",
    "expect_shape",
    "index_dtype",
    "jsonable",
    "load_npy",
    "locked",
    "read_manifest",
    "resume_settings",
    "sha256",
    "shard_files",
    "write_manifest",
]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
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


def check_slide_id(slide_id: object) -> str:
    if not isinstance(slide_id, str) or not SLIDE_ID_PATTERN.match(slide_id):
        raise CacheError(
            f"invalid slide id {slide_id!r}: expected 1-200 characters of letters, digits and "
            "'._+-', starting with a letter or digit (it names a shard directory)"
        )
    return slide_id


def index_dtype(slide_width: int) -> np.dtype:
    return np.dtype(
        [
            ("slide", f"<U{max(1, slide_width)}"),
            ("x", "<i8"),
            ("y", "<i8"),
            ("level", "<i4"),
            ("label", "i1"),
        ]
    )


def shard_files(codec: str, has_masks: bool) -> tuple[str, ...]:
    return (*IMAGE_FILES[codec], INDEX_FILE, *((MASKS_FILE,) if has_masks else ()))


def jsonable(config: Mapping[str, Any]) -> dict[str, Any]:
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


def resume_settings(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """What must match for a writer to continue an existing cache."""
    return {
        "codec": manifest.get("codec"),
        "quality": manifest.get("quality"),
        "patch_size": manifest.get("patch_size"),
        "has_masks": manifest.get("has_masks"),
        "mask_encoding": manifest.get("mask_encoding"),
        "config": manifest.get("config"),
    }


def read_manifest(cache: Path) -> dict[str, Any]:
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


def write_manifest(cache: Path, manifest: Mapping[str, Any]) -> None:
    """Replace ``manifest.json`` atomically (temp file, fsync, os.replace, fsync dir)."""
    try:
        atomic.write_json(cache / MANIFEST_NAME, manifest, sort_keys=True, ensure_ascii=False)
    except OSError as exc:
        raise CacheError(f"cannot write the manifest of patch cache {cache}: {exc}") from exc


def load_npy(path: Path, mmap: bool) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise CacheError(f"cannot read patch-cache file {path}: {exc}") from exc


def expect_shape(array: np.ndarray, shape: tuple[int, ...], path: Path) -> None:
    if array.shape != shape:
        raise CacheError(
            f"patch-cache file {path} holds an array of shape {array.shape}, expected {shape} "
            "from the manifest; the cache is corrupt (rebuild it with force=true)"
        )
