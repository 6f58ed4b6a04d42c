"""Writing a patch cache: :class:`CacheWriter` (the cache) and :class:`ShardWriter` (one slide).

Writing is per slide and atomic: a slide's patches stream into
``shards/.tmp-<slide_id>-<host>-<pid>``, which is fsynced and renamed to ``shards/<slide_id>``
only when the slide is complete; the slide becomes visible once :meth:`CacheWriter.commit` records
it in the manifest (replaced atomically). Shards can be written in worker processes while the
parent commits; a build killed at any moment and rerun with the same config resumes, and after
:meth:`CacheWriter.finalize` every file is byte-identical to an uninterrupted build (no timestamps
or process ids in final files). The layout is in :mod:`lymphnode.patches.format`.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import imagecodecs
import numpy as np

from lymphnode.core import atomic, validate
from lymphnode.core.errors import CacheError
from lymphnode.core.records import config_differences
from lymphnode.patches.format import (
    CACHE_FORMAT_VERSION,
    CODECS,
    INDEX_FILE,
    JPEG_IMAGES_FILE,
    JPEG_OFFSETS_FILE,
    MANIFEST_NAME,
    MANIFEST_TMP_PREFIX,
    MASK_ENCODING,
    MASKS_FILE,
    RAW_IMAGES_FILE,
    SHARDS_DIR,
    TMP_PREFIX,
    check_slide_id,
    index_dtype,
    jsonable,
    locked,
    read_manifest,
    resume_settings,
    sha256,
    shard_files,
    write_manifest,
)

log = logging.getLogger(__name__)

__all__ = ["CacheWriter", "ShardWriter"]


# ----------------------------------------------------------------------------------------------
# image codecs: a sink writes one slide's images


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
        atomic.write_all(self._fh, buffer.getbuffer())
        return buffer.tell()

    def append(self, item: np.ndarray) -> None:
        atomic.write_all(self._fh, np.ascontiguousarray(item).data)
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
    def __init__(self, directory: Path, patch_size: int, quality: int | None) -> None:
        self._images = _NpyAppender(directory / RAW_IMAGES_FILE, (patch_size, patch_size, 3))

    def add(self, image: np.ndarray) -> None:
        self._images.append(image)

    def close(self) -> None:
        self._images.close()

    def abort(self) -> None:
        self._images.abort()


class _JpegSink:
    def __init__(self, directory: Path, patch_size: int, quality: int | None) -> None:
        self._directory = directory
        self._quality = quality
        self._offsets = [0]
        self._fh = open(directory / JPEG_IMAGES_FILE, "wb")  # noqa: SIM115 - closed in close()

    def add(self, image: np.ndarray) -> None:
        data = imagecodecs.jpeg8_encode(image, level=self._quality)  # RGB in, YCbCr 4:2:0 out
        atomic.write_all(self._fh, data)
        self._offsets.append(self._offsets[-1] + len(data))

    def close(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        atomic.save_npy(
            self._directory / JPEG_OFFSETS_FILE,
            np.asarray(self._offsets, dtype="<i8"),
            atomic=False,
        )

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self._fh.close()


_IMAGE_SINKS: dict[str, type[_RawSink] | type[_JpegSink]] = {"raw": _RawSink, "jpeg": _JpegSink}


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
        self._tmp = cache / SHARDS_DIR / f"{TMP_PREFIX}{slide_id}-{atomic.owner_tag()}"
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
            dtype=index_dtype(len(self.slide_id)),
        )
        atomic.save_npy(self._tmp / INDEX_FILE, index, atomic=False)
        files = shard_files(self._codec, self._has_masks)
        checksums = {name: sha256(self._tmp / name) for name in sorted(files)}
        atomic.fsync_dir(self._tmp)
        if self._final.exists():  # an earlier run renamed it but was killed before committing
            shutil.rmtree(self._final)
        os.rename(self._tmp, self._final)
        atomic.fsync_dir(self._final.parent)
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
        validate.choice("cache codec", codec, CODECS)
        patch_size = validate.integer("patch_size", patch_size, minimum=1, unit="px")
        if codec == "jpeg":
            quality = validate.integer("JPEG quality", quality, 1, 100)
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
            "config": jsonable(config),
            "slides": [],
        }
        if self.path.exists() and not self.path.is_dir():
            raise CacheError(f"patch cache path {self.path} exists and is not a directory")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CacheError(f"cannot create patch cache directory {self.path}: {exc}") from exc
        with locked(self.path):
            self._manifest = self._open_or_create(fresh, force)
            self._remove_stale_temps()

    def _open_or_create(self, fresh: dict[str, Any], force: bool) -> dict[str, Any]:
        if (self.path / MANIFEST_NAME).exists():
            try:
                existing = read_manifest(self.path)
            except CacheError as exc:
                if not force:
                    raise CacheError(f"{exc}; pass force=true to rebuild it") from exc
                self._wipe(f"its manifest is unreadable ({exc})")
            else:
                changes = config_differences(resume_settings(existing), resume_settings(fresh))
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
                if p.name not in ours and not p.name.startswith(MANIFEST_TMP_PREFIX)
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
        write_manifest(self.path, fresh)
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
            if entry.name.startswith(MANIFEST_TMP_PREFIX) and atomic.is_stale_temp(
                entry.name, MANIFEST_TMP_PREFIX, other_hosts
            ):
                entry.unlink(missing_ok=True)
        shards = self.path / SHARDS_DIR
        if shards.is_dir():
            for entry in shards.iterdir():
                if entry.name.startswith(TMP_PREFIX) and atomic.is_stale_temp(
                    entry.name, TMP_PREFIX, other_hosts
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
        self._manifest = read_manifest(self.path)
        return self._manifest

    def is_complete(self, slide_id: str) -> bool:
        """Whether ``slide_id`` is recorded complete in the manifest (re-read from disk)."""
        check_slide_id(slide_id)
        for record in self._refresh()["slides"]:
            if record["id"] == slide_id and record.get("status") == "complete":
                return (self.path / SHARDS_DIR / slide_id).is_dir()
        return False

    def manifest_slides(self) -> list[str]:
        """The ids of the slides the manifest records complete (re-read from disk)."""
        return [s["id"] for s in self._refresh()["slides"] if s.get("status") == "complete"]

    def recorded_inputs(self, slide_id: str) -> dict[str, Any] | None:
        """What a complete slide's record says it was built from (``inputs``, e.g. its
        annotation file's SHA-256; :meth:`commit`); None when the slide is not complete or its
        record predates the field."""
        check_slide_id(slide_id)
        for record in self._refresh()["slides"]:
            if record["id"] == slide_id and record.get("status") == "complete":
                inputs = record.get("inputs")
                return dict(inputs) if isinstance(inputs, Mapping) else None
        return None

    def discard(self, slide_id: str, reason: str) -> None:
        """Drop a complete slide from the manifest and delete its shard (its inputs changed: it
        is built again). The manifest goes first, so a crash between the two leaves a shard
        that no manifest entry names (removed at :meth:`finalize`), never a record without
        files."""
        check_slide_id(slide_id)
        with locked(self.path):
            manifest = self._refresh()
            manifest["slides"] = [s for s in manifest["slides"] if s["id"] != slide_id]
            write_manifest(self.path, manifest)
            shutil.rmtree(self.path / SHARDS_DIR / slide_id, ignore_errors=True)
        log.warning("patch cache %s: slide %s discarded and built again: %s", self.path,
                    slide_id, reason)  # fmt: skip

    def slide(self, slide_id: str, n: int | None = None) -> ShardWriter:
        """A :class:`ShardWriter` for ``slide_id``; ``n``, when given, is the exact patch count.

        Works in any process that has this writer (it pickles); one writer per slide at a time.
        """
        check_slide_id(slide_id)
        if n is not None:
            n = validate.integer("n (the slide's patch count)", n, minimum=0)
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

    def commit(
        self, slide_id: str, info: Mapping[str, Any], inputs: Mapping[str, Any] | None = None
    ) -> None:
        """Record a finished shard (``ShardWriter.info``) in the manifest, atomically.

        ``inputs``: what the slide's bytes were built from besides the cache's configuration
        (JSON values; ``prepare`` records its annotation file's name and SHA-256), kept in its
        record so that a rerun notices a changed input (:meth:`recorded_inputs`)."""
        check_slide_id(slide_id)
        if not isinstance(info, Mapping) or info.get("id") != slide_id:
            raise CacheError(
                f"commit({slide_id!r}, ...) needs the info of that slide's finished shard, got "
                f"{info!r}"
            )
        directory = self.path / SHARDS_DIR / slide_id
        checksums = info.get("checksums")
        expected = set(shard_files(self.codec, self.has_masks))
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
        if inputs is not None:
            record["inputs"] = jsonable(dict(inputs))
        with locked(self.path):
            manifest = self._refresh()
            slides = [s for s in manifest["slides"] if s["id"] != slide_id]
            slides.append(record)
            manifest["slides"] = slides
            write_manifest(self.path, manifest)
        log.info("patch cache %s: slide %s complete (%d patches)", self.path, slide_id, record["n"])

    def finalize(self, slide_order: Sequence[str]) -> None:
        """Put the manifest's slides in ``slide_order`` (the config's order, not completion order).

        Every slide in ``slide_order`` must be complete and no other slide may be. Also removes
        shard directories that no manifest entry refers to, so that a resumed build ends
        byte-identical to an uninterrupted one.
        """
        order = [check_slide_id(s) for s in slide_order]
        duplicates = sorted({s for s in order if order.count(s) > 1})
        if duplicates:
            raise CacheError(f"finalize: slide ids repeated in slide_order: {duplicates}")
        with locked(self.path):
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
            write_manifest(self.path, manifest)
            shards = self.path / SHARDS_DIR
            if shards.is_dir():
                for entry in shards.iterdir():
                    if not entry.name.startswith(TMP_PREFIX) and entry.name not in by_id:
                        log.info("removing %s: not in the manifest (uncommitted)", entry)
                        shutil.rmtree(entry, ignore_errors=True)
            self._remove_stale_temps(other_hosts=True)
