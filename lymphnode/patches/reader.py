"""Reading a patch cache: :class:`PatchCache`, ``cache[i] -> (image, mask or None)``.

A reader sees only complete slides (those the manifest lists), opens files lazily in the process
that reads (so a cache can be pickled into DataLoader workers) and is safe for many processes at
once. The layout is in :mod:`lymphnode.patches.format`.
"""

from __future__ import annotations

import bisect
import copy
import itertools
import operator
import os
from pathlib import Path
from typing import Any

import imagecodecs
import numpy as np

from lymphnode.core.errors import CacheError
from lymphnode.patches.format import (
    INDEX_FILE,
    JPEG_IMAGES_FILE,
    JPEG_OFFSETS_FILE,
    MANIFEST_NAME,
    MASKS_FILE,
    RAW_IMAGES_FILE,
    SHARDS_DIR,
    check_slide_id,
    expect_shape,
    index_dtype,
    load_npy,
    read_manifest,
    sha256,
    shard_files,
)

__all__ = ["PatchCache"]


class _RawSource:
    def __init__(self, directory: Path, n: int, patch_size: int) -> None:
        path = directory / RAW_IMAGES_FILE
        self._images = load_npy(path, mmap=True)
        expect_shape(self._images, (n, patch_size, patch_size, 3), path)

    def image(self, j: int) -> np.ndarray:
        return np.array(self._images[j])  # a private, writable copy; (P, P, 3) uint8


class _JpegSource:
    def __init__(self, directory: Path, n: int, patch_size: int) -> None:
        self._path = directory / JPEG_IMAGES_FILE
        self._shape = (patch_size, patch_size, 3)
        self._offsets = load_npy(directory / JPEG_OFFSETS_FILE, mmap=False).tolist()
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


class _ShardReader:
    """Open files of one shard (in one process)."""

    def __init__(self, directory: Path, codec: str, n: int, patch_size: int, masks: bool) -> None:
        self._source = _IMAGE_SOURCES[codec](directory, n, patch_size)
        self._patch_size = patch_size
        self._masks: np.ndarray | None = None
        if masks:
            path = directory / MASKS_FILE
            self._masks = load_npy(path, mmap=True)
            expect_shape(self._masks, (n, patch_size, (patch_size + 7) // 8), path)

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
        manifest = read_manifest(self.path)
        self._manifest = manifest
        self._codec: str = manifest["codec"]
        self._patch_size: int = manifest["patch_size"]
        self._has_masks: bool = manifest["has_masks"]
        records = [s for s in manifest["slides"] if s.get("status") == "complete"]
        expected = set(shard_files(self._codec, self._has_masks))
        for record in records:
            directory = self.path / SHARDS_DIR / check_slide_id(record["id"])
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
                    digest = sha256(directory / name)
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
                part = load_npy(path, mmap=False)
                if part.dtype.names != ("slide", "x", "y", "level", "label") or len(part) != n:
                    raise CacheError(
                        f"patch-cache index {path} has fields {part.dtype.names} and {len(part)} "
                        f"rows, expected (slide, x, y, level, label) and {n} rows"
                    )
                parts.append(part)
            width = max((len(s) for s in self._slides), default=1)
            index = np.empty(len(self), dtype=index_dtype(width))
            for part, start in zip(parts, self._starts):
                index[start : start + len(part)] = part.astype(index.dtype)
            index.flags.writeable = False
            self._index = index
        return self._index

    @property
    def labels(self) -> np.ndarray:
        """(N,) int64: 1 tumor, 0 non-tumor, -1 unknown."""
        return self.index["label"].astype(np.int64)
