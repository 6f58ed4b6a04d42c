"""Building the patch caches from slides (what ``python -m lymphnode.prepare`` runs).

- ``unlabeled``: images of every training slide, tumor and normal (reconstruction pretraining);
- ``labeled``: images + tumor masks of the annotated training slides (``<slide>.xml`` ASAP or
  ``<slide>.geojson`` QuPath, classes mapped by the ``qupath`` keys), class-balanced;
- ``test``: images + tumor masks of the held-out slides, class-balanced (normal slides give
  non-tumor patches only).

The train/test split is by slide (a list, or a seeded fraction of the tumor and of the normal
slides; :mod:`lymphnode.patches.split`) and is written to ``<cache_dir>/split.json``; no slide is
in both. Slides are processed in a process pool (:func:`lymphnode.core.pool.run_jobs`), one slide
per task: the worker opens the slide itself, computes its tissue mask, samples locations
(:mod:`lymphnode.patches.sampling`), reads the patches and streams them into that slide's shard of
each cache (:class:`lymphnode.patches.writer.ShardWriter`); the parent commits finished shards.
Memory is that of one slide's tissue mask and one patch per worker, whatever the number or size of
slides. A rerun with the same config skips completed slides; one with another config refuses and
names the differing keys (``force=true`` rebuilds). Each slide's manifest record keeps its
annotation file's SHA-256 (:func:`slide_inputs`): a slide whose annotations changed since (a
corrected outline back from QuPath) is built again, with a warning naming it. Errors name the slide, the annotation file or
the cache; slides finished before an error stay in the caches.

Every draw derives from ``seed`` and the slide's name, never from the order or the number of
workers, so the same config gives the same bytes.

Sharded builds (a job array, ``shard=i/n``): job ``i`` builds every ``n``-th slide
(:func:`shard_slides`) into the same caches, committing each shard to the manifest under the
cache's lock; the job that finds every slide of a cache complete when it ends (the last to
finish, or a later ``prepare`` without ``shard``) puts the manifest in slide order, and the caches
are then byte-identical to a single-process build.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lymphnode.core import validate
from lymphnode.core.errors import AnnotationError, ConfigError, LymphnodeError, SlideError
from lymphnode.core.pool import run_jobs
from lymphnode.patches.format import CODECS, SLIDE_ID_PATTERN, sha256
from lymphnode.patches.sampling import sample_patches
from lymphnode.patches.split import (
    SPLIT_FILE,
    SlideSource,
    find_slides,
    split_record,
    split_slides,
    write_split,
)
from lymphnode.patches.writer import CacheWriter
from lymphnode.wsi.annotations import Annotations, AsapGroups, read_asap, read_downsample
from lymphnode.wsi.geojson import QupathClasses, read_qupath
from lymphnode.wsi.slide import open_slide
from lymphnode.wsi.tissue import tissue_mask

log = logging.getLogger(__name__)

CACHE_KINDS = ("unlabeled", "labeled", "test")
_SAMPLING_KEYS = (
    "tumor_probability",
    "min_tumor_fraction",
    "center_fraction",
    "min_tissue_fraction",
    "max_tries",
)

__all__ = [
    "CACHE_KINDS",
    "PatchSettings",
    "SlideJob",
    "build_caches",
    "patch_seed",
    "process_slide",
    "settings_from_config",
    "shard_slides",
    "slide_inputs",
]


def patch_seed(seed: int, cache: str, slide: str) -> int:
    """The sampling seed of ``slide`` in ``cache``: independent of slide order and worker count."""
    entropy = [int(seed), zlib.crc32(cache.encode()), zlib.crc32(slide.encode())]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> np.uint64(1))


# ----------------------------------------------------------------------------------------------
# settings


@dataclass(frozen=True)
class PatchSettings:
    """How patches are cut: size (px at the read level), level or mpp, sampling thresholds."""

    patch_size: int
    level: int
    mpp: float | None = None  # read at the level whose µm/px is within 10% of this
    slide_mpp: float | None = None  # level-0 µm/px of slides that lack it
    tissue_downsample: float = 32.0
    sampling: Mapping[str, Any] = field(default_factory=dict)
    annotation_tolerance: float = 0.0  # level-0 px an outline may reach past the slide's edge
    annotations_downsample: float = 1.0  # annotation coordinates are divided by it (frame -> slide)


def settings_from_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Validate the prepare config; returns plain values (ConfigError names the bad key)."""
    caches = list(cfg.get("caches") or [])
    unknown = [c for c in caches if c not in CACHE_KINDS]
    if unknown or not caches:
        raise ConfigError(f"caches must be a non-empty subset of {list(CACHE_KINDS)}, got {caches}")
    codec = validate.choice("codec", cfg.get("codec"), CODECS)
    counts = dict(cfg.get("counts") or {})
    for kind in caches:
        counts[kind] = validate.integer(f"counts.{kind}", counts.get(kind), minimum=0)
    sampling = validate.keys("sampling", cfg.get("sampling") or {}, _SAMPLING_KEYS)
    mpp, slide_mpp = cfg.get("mpp"), cfg.get("slide_mpp")
    if mpp is not None:
        mpp = validate.number("mpp", mpp, 0, strict_minimum=True, unit="µm/px (or null)")
    if slide_mpp is not None:
        slide_mpp = validate.number(
            "slide_mpp", slide_mpp, 0, strict_minimum=True, unit="µm/px (or null)"
        )
    tissue_downsample = validate.number(
        "tissue.downsample", (cfg.get("tissue") or {}).get("downsample", 32), 1
    )
    patch = PatchSettings(
        patch_size=validate.integer("patch_size", cfg.get("patch_size"), minimum=1),
        level=validate.integer("level", cfg.get("level"), minimum=0),
        mpp=float(mpp) if mpp is not None else None,
        slide_mpp=float(slide_mpp) if slide_mpp is not None else None,
        tissue_downsample=float(tissue_downsample),
        sampling=sampling,
        annotation_tolerance=validate.number(
            "annotation_tolerance", cfg.get("annotation_tolerance", 0.0), 0.0, unit="level-0 px"
        ),
        annotations_downsample=read_downsample(cfg.get("annotations_downsample")),
    )
    workers = validate.integer("workers", cfg.get("workers"), minimum=0)
    shard = validate.shard("shard", cfg.get("shard"))
    if shard is not None and cfg.get("force", False):
        raise ConfigError(
            f"force=true cannot be combined with shard={cfg.get('shard')!r}: each job of the "
            "sharded build would delete the slides the other jobs wrote; rebuild with one job "
            "(shard=null force=true), or delete the caches and start the sharded build again"
        )
    quality = validate.integer("quality", cfg.get("quality", 90), minimum=1)
    split = dict(cfg.get("split") or {})
    test_slides = split.get("test_slides")
    if test_slides is not None and (
        isinstance(test_slides, str) or not isinstance(test_slides, Sequence)
    ):
        raise ConfigError(
            f"split.test_slides must be a list of slide names or null, got {test_slides!r}"
        )
    return {
        "caches": caches,
        "codec": codec,
        "quality": quality,
        "counts": counts,
        "patch": patch,
        "workers": workers,
        "shard": shard,
        "force": bool(cfg.get("force", False)),
        "seed": validate.integer("seed", cfg.get("seed", 0), minimum=0),
        "split_seed": validate.integer(
            "split.seed", split.get("seed", cfg.get("seed", 0)), minimum=0
        ),
        "test_slides": list(test_slides) if test_slides is not None else None,
        "test_fraction": validate.number(
            "split.test_fraction",
            split.get("test_fraction", 0.2),
            0.0,
            1.0,
            unit="(the share of tumor and of normal slides held out)",
        ),
        "qupath": QupathClasses.from_config(cfg.get("qupath")),
        "asap": AsapGroups.from_config(cfg.get("asap")),
    }


# ----------------------------------------------------------------------------------------------
# one slide (runs in a worker process)


@dataclass(frozen=True)
class ShardJob:
    """One cache's shard of a slide: which cache, its writer, how many patches, with masks?"""

    cache: str
    writer: CacheWriter
    n: int
    labeled: bool


@dataclass(frozen=True)
class SlideJob:
    """Everything a worker needs for one slide (picklable)."""

    source: SlideSource
    shards: tuple[ShardJob, ...]
    patch: PatchSettings
    seed: int
    qupath: QupathClasses = field(
        default_factory=QupathClasses
    )  # class mapping of <slide>.geojson annotations
    asap: AsapGroups = field(default_factory=AsapGroups)  # group mapping of <slide>.xml


@dataclass
class SlideResult:
    """What a worker sends back: finished shards (cache → shard info) and the error, if any."""

    name: str
    done: dict[str, dict[str, Any]] = field(default_factory=dict)
    patches: int = 0
    error: LymphnodeError | None = None


def _named(exc: LymphnodeError, source: SlideSource) -> LymphnodeError:
    """``exc`` with the slide's path in its message when the message does not name it yet."""
    message = str(exc)
    if str(source.path) in message or (
        source.annotations is not None and str(source.annotations) in message
    ):
        return exc
    try:
        return type(exc)(f"slide {source.path}: {message}")
    except TypeError:  # pragma: no cover - an error type with another signature
        return exc


def _fit(mask: np.ndarray, size: int) -> np.ndarray:
    """Crop or zero-pad a (h, w) mask to (size, size) (rounding of non-integer downsamples)."""
    if mask.shape == (size, size):
        return mask
    out = np.zeros((size, size), dtype=bool)
    h, w = min(size, mask.shape[0]), min(size, mask.shape[1])
    out[:h, :w] = mask[:h, :w]
    return out


def read_annotations(
    source: SlideSource,
    qupath: QupathClasses,
    asap: AsapGroups | None = None,
    downsample: float = 1.0,
) -> Annotations | None:
    """The annotations of a slide: ASAP XML mapped with ``asap`` (default: the CAMELYON groups),
    or QuPath GeoJSON mapped with ``qupath``; a group or class neither maps is an error.
    Coordinates are divided by ``downsample`` (``annotations_downsample``: annotation px per
    level-0 px of the slide file)."""
    if source.annotations is None:
        return None
    if source.annotations.suffix.lower() == ".geojson":
        return read_qupath(source.annotations, qupath, slide=source.path).scaled(downsample)
    annotations = read_asap(source.annotations, groups=asap or AsapGroups(), slide=source.path)
    return annotations.scaled(downsample)


def process_slide(job: SlideJob) -> SlideResult:
    """Sample, read and write one slide's shards; LymphnodeErrors come back in the result."""
    result = SlideResult(job.source.name)
    source, patch = job.source, job.patch
    try:
        with open_slide(source.path, mpp=patch.slide_mpp) as slide:
            level = _read_level(slide, patch, source)
            ds = float(slide.level_downsamples[level])
            annotations = read_annotations(
                source, job.qupath, job.asap, patch.annotations_downsample
            )
            if annotations is not None:
                tolerance = patch.annotation_tolerance
                try:
                    annotations.validate_within(
                        *slide.dimensions,
                        path=source.path,
                        tolerance=tolerance,
                        downsample=patch.annotations_downsample,
                    )
                except AnnotationError as exc:
                    raise AnnotationError(
                        f"{exc} (annotation_tolerance={tolerance:g} level-0 "
                        "px; outlines drawn a little past the edge pass with a larger one, e.g. "
                        "annotation_tolerance=64)"
                    ) from exc
            tissue = tissue_mask(slide, downsample=patch.tissue_downsample)
            size = patch.patch_size
            extent = round(size * ds)  # level-0 px
            for shard_job in job.shards:
                if shard_job.writer.is_complete(source.name):
                    # another prepare on the same caches (same config) finished it meanwhile
                    log.info("%s: already complete in the %s cache (another prepare built it)",
                             source.name, shard_job.cache)  # fmt: skip
                    continue
                locations = sample_patches(
                    slide_size=slide.dimensions,
                    n=shard_job.n,
                    patch_size=size,
                    level_downsample=ds,
                    seed=patch_seed(job.seed, shard_job.cache, source.name),
                    tissue=tissue,
                    annotations=annotations,
                    labeled=shard_job.labeled,
                    slide_name=f"slide {source.path} ({shard_job.cache} cache)",
                    **patch.sampling,
                )
                with shard_job.writer.slide(source.name, n=len(locations)) as shard:
                    for loc in locations:
                        image = slide.read(loc.x, loc.y, size, size, level)
                        mask = None
                        if shard_job.labeled:
                            if annotations is None or annotations.is_empty:
                                mask = np.zeros((size, size), dtype=bool)
                            else:
                                mask = _fit(
                                    annotations.mask(loc.x, loc.y, extent, extent, ds), size
                                )
                        shard.add(image, mask, x=loc.x, y=loc.y, level=level, label=loc.label)
                result.done[shard_job.cache] = shard.info
                result.patches += len(locations)
    except LymphnodeError as exc:
        result.error = _named(exc, source)
    return result


def _read_level(slide: Any, patch: PatchSettings, source: SlideSource) -> int:
    if patch.mpp is not None:
        return int(slide.level_for_mpp(patch.mpp))
    if patch.level >= slide.level_count:
        raise SlideError(
            f"slide {source.path} has levels 0-{slide.level_count - 1} (downsamples "
            f"{', '.join(f'{d:g}' for d in slide.level_downsamples)}); level={patch.level} was "
            "requested"
        )
    return patch.level


# the whole build


def _cache_config(
    kind: str, slides: Sequence[SlideSource], settings: Mapping[str, Any]
) -> dict[str, Any]:
    """What decides a cache's bytes (stored in its manifest; a rerun must match it). The QuPath
    class mapping counts only for caches with masks of slides annotated in GeoJSON (so caches
    built from ASAP XML keep the record they had before GeoJSON was read)."""
    patch: PatchSettings = settings["patch"]
    config = {
        "kind": kind,
        "slides": [s.name for s in slides],
        "patch_size": patch.patch_size,
        "level": patch.level if patch.mpp is None else None,
        "mpp": patch.mpp,
        "slide_mpp": patch.slide_mpp,
        "count": settings["counts"][kind],
        "sampling": dict(patch.sampling),
        "tissue_downsample": patch.tissue_downsample,
        "seed": settings["seed"],
    }
    if kind != "unlabeled" and any(_is_geojson(s) for s in slides):
        q: QupathClasses = settings["qupath"]
        config["qupath"] = {
            "tumor_classes": list(q.tumor),
            "exclusion_classes": list(q.exclusion),
            "ignored_classes": list(q.ignored),
        }
    if kind != "unlabeled" and patch.annotations_downsample != 1:
        # recorded when set only, so caches built before the key still resume
        config["annotations_downsample"] = patch.annotations_downsample
    groups: AsapGroups = settings["asap"]
    if (
        kind != "unlabeled"
        and not groups.is_default
        and any(s.annotations is not None and not _is_geojson(s) for s in slides)
    ):  # recorded when changed only, so caches built before the asap keys still resume
        config["asap"] = {
            "tumor_groups": list(groups.tumor),
            "exclusion_groups": list(groups.exclusion),
            "ignored_groups": list(groups.ignored),
        }
    return config


def _is_geojson(source: SlideSource) -> bool:
    return source.annotations is not None and source.annotations.suffix.lower() == ".geojson"


def build_caches(
    cfg: Mapping[str, Any],
    *,
    slides_dir: str | Path,
    annotations_dir: str | Path | None,
    cache_dir: str | Path,
    progress: bool = True,
) -> dict[str, Path]:
    """Build the caches ``cfg.caches`` under ``cache_dir``; returns their paths by kind.

    ``cfg`` is the prepare config (see ``conf/prepare.yaml``) as a mapping. Raises a
    :class:`~lymphnode.core.errors.LymphnodeError` naming the input at the first failing slide, after
    committing every slide that finished.
    """
    settings = settings_from_config(cfg)
    slides_dir = Path(slides_dir)
    annotations_dir = Path(annotations_dir) if annotations_dir is not None else None
    cache_dir = Path(cache_dir)
    sources = find_slides(slides_dir, annotations_dir)
    for source in sources:  # before split.json or any cache is written
        if not SLIDE_ID_PATTERN.match(source.name):
            raise SlideError(
                f"slide {source.path}: its name {source.name!r} cannot name a cache shard; "
                "expected letters, digits and '._+-' (at most 200), starting with a letter or "
                "digit: rename the slide (and its annotation file)"
            )
    train, test = split_slides(
        sources,
        test_slides=settings["test_slides"],
        test_fraction=settings["test_fraction"],
        seed=settings["split_seed"],
    )
    members = {
        "unlabeled": train,
        "labeled": [s for s in train if s.annotated],
        "test": test,
    }
    for kind in settings["caches"]:
        if not members[kind]:
            what = "annotated training slide" if kind == "labeled" else f"{kind} slide"
            raise ConfigError(
                f"the {kind} cache would hold no slide: the split has no {what} "
                f"(train: {len(train)} slides, {sum(s.annotated for s in train)} annotated; "
                f"test: {len(test)}); change split or caches"
            )
    log.info(
        "%d slides: %d train (%d annotated), %d test",
        len(sources),
        len(train),
        sum(s.annotated for s in train),
        len(test),
    )

    # Annotations are checked before anything is written: an unknown QuPath class or ASAP group
    # stops the build here.
    for source in sources:
        if source.annotations is not None and any(source in members[k] for k in settings["caches"]):
            annotations = read_annotations(
                source,
                settings["qupath"],
                settings["asap"],
                settings["patch"].annotations_downsample,
            )
            if annotations is not None and not annotations.tumor:
                log.warning(
                    "annotation file %s (slide %s) holds no tumour outline (an empty file, or "
                    "only lines / points / classes that are not tumour): every patch of this slide "
                    "is labelled non-tumour",
                    source.annotations,
                    source.path,
                )

    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create paths.cache_dir {cache_dir}: {exc}") from exc
    writers = {
        kind: CacheWriter(
            cache_dir / kind,
            _cache_config(kind, members[kind], settings),
            codec=settings["codec"],
            patch_size=settings["patch"].patch_size,
            has_masks=kind != "unlabeled",
            quality=settings["quality"],
            force=settings["force"],
        )
        for kind in settings["caches"]
    }
    write_split(
        cache_dir / SPLIT_FILE,
        split_record(train, test, slides_dir, annotations_dir, settings),
        settings["force"],
    )

    needed = [s for s in sources if any(s in members[k] for k in settings["caches"])]
    mine = shard_slides(needed, settings["shard"])
    if settings["shard"] is not None:
        index, count = settings["shard"]
        log.info(
            "shard %d/%d: %d of the %d slides (%s)",
            index, count, len(mine), len(needed), ", ".join(s.name for s in mine) or "none",
        )  # fmt: skip
    inputs = {source.name: slide_inputs(source) for source in mine}
    unrecorded: list[str] = []
    for source in mine:
        for kind in settings["caches"]:
            if source not in members[kind] or not writers[kind].is_complete(source.name):
                continue
            recorded = writers[kind].recorded_inputs(source.name)
            if recorded is None:  # built before the record: nothing to compare
                unrecorded.append(f"{kind}/{source.name}")
            elif recorded != inputs[source.name]:
                writers[kind].discard(source.name, _changed_inputs(source, recorded, inputs))
    if unrecorded:
        log.warning(
            "%d complete slides (%s) record no annotation hash (built before prepare recorded "
            "them): a changed annotation file is not noticed for them; force=true rebuilds",
            len(unrecorded), ", ".join(unrecorded[:5]) + (" ..." if len(unrecorded) > 5 else ""),
        )  # fmt: skip
    jobs: list[SlideJob] = []
    for source in mine:
        shards = tuple(
            ShardJob(
                cache=kind,
                writer=writers[kind],
                n=settings["counts"][kind],
                labeled=kind != "unlabeled",
            )
            for kind in settings["caches"]
            if source in members[kind] and not writers[kind].is_complete(source.name)
        )
        if shards:
            jobs.append(
                SlideJob(
                    source,
                    shards,
                    settings["patch"],
                    settings["seed"],
                    settings["qupath"],
                    settings["asap"],
                )
            )
    skipped = len(mine) - len(jobs)
    if skipped:
        log.info("%d slides already complete in every cache: skipped", skipped)

    errors: list[LymphnodeError] = []

    def record(job: SlideJob, result: SlideResult) -> bool:
        for kind, info in result.done.items():
            writers[kind].commit(result.name, info, inputs=inputs[result.name])
        if result.error is not None:
            errors.append(result.error)
        return not errors  # after an error no slide starts; running ones finish and are kept

    run_jobs(
        process_slide,
        jobs,
        workers=settings["workers"],
        on_result=record,
        desc="prepare",
        unit="slide",
        total=len(mine),
        initial=skipped,
        progress=progress,
        postfix=lambda job, result: f"{result.name}: {result.patches} patches",
    )
    if errors:
        raise errors[0]
    for kind, writer in writers.items():
        names = [s.name for s in members[kind]]
        waiting = [n for n in names if not writer.is_complete(n)] if settings["shard"] else []
        if waiting:  # another job's slides: the last job to finish writes the final manifest
            log.info(
                "%s cache: this shard's slides are done; %d of %d slides are still to come from "
                "the other jobs (%s): the last job to finish, or prepare without shard, "
                "finalizes it", kind, len(waiting), len(names), ", ".join(waiting[:5]),
            )  # fmt: skip
            continue
        writer.finalize(names)
        log.info("%s cache: %s", kind, writer.path)
    return {kind: writer.path for kind, writer in writers.items()}


def slide_inputs(source: SlideSource) -> dict[str, Any]:
    """What a slide's shards are built from besides the cache configuration, as its manifest
    record keeps it: the annotation file's name and SHA-256 of its bytes (both None for a slide
    without one). A corrected outline (QuPath round trip) changes the hash, so a rerun of
    ``prepare`` builds that slide again instead of keeping the old masks."""
    path = source.annotations
    if path is None:
        return {"annotations": None, "annotations_sha256": None}
    try:
        digest = sha256(path)
    except OSError as exc:
        raise AnnotationError(f"annotation file {path} (slide {source.path}): {exc}") from exc
    return {"annotations": path.name, "annotations_sha256": digest}


def _changed_inputs(
    source: SlideSource, recorded: Mapping[str, Any], now: Mapping[str, Any]
) -> str:
    """One line: how a slide's inputs changed since its shard was built."""
    old, new = recorded.get("annotations_sha256"), now.get("annotations_sha256")
    return (
        f"its annotations changed since the cache was built ({recorded.get('annotations')} "
        f"sha256 {str(old)[:12]} -> {source.annotations} sha256 {str(new)[:12]})"
    )


def shard_slides(slides: Sequence[SlideSource], shard: tuple[int, int] | None) -> list[SlideSource]:
    """The slides job ``i`` of ``n`` builds (``shard=(i, n)``): every ``n``-th of ``slides``
    (the slides of the requested caches, sorted by name), starting at position ``i``; all of
    them for ``shard=None``. Depends on the slide list only, never on what is complete, so the
    jobs of an array never overlap and a rerun of one job redoes only its own slides."""
    if shard is None:
        return list(slides)
    index, count = shard
    return [source for k, source in enumerate(slides) if k % count == index]
