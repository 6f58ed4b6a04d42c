"""``python -m lymphnode.prepare``: a slides folder (+ ASAP XML) → the three patch caches.

- ``unlabeled``: images of every training slide, tumor and normal (reconstruction pretraining);
- ``labeled``: images + tumor masks of the annotated training slides, class-balanced;
- ``test``: images + tumor masks of the held-out slides, class-balanced (normal slides give
  non-tumor patches only).

The train/test split is by slide (a list, or a seeded fraction of the tumor and of the normal
slides) and is written to ``<cache_dir>/split.json``; no slide is in both. Slides are processed in
a process pool, one slide per task: the worker opens the slide itself, computes its tissue mask,
samples locations (:mod:`lymphnode.patches.sampling`), reads the patches and streams them into that
slide's shard of each cache (:class:`lymphnode.patches.cache.ShardWriter`); the parent commits finished
shards. Memory is that of one slide's tissue mask and one patch per worker, whatever the number or
size of slides. A rerun with the same config skips completed slides; one with another config
refuses and names the differing keys (``force=true`` rebuilds). Errors name the slide, the
annotation file or the cache; slides finished before an error stay in the caches.

Every draw derives from ``seed`` and the slide's name, never from the order or the number of
workers, so the same config gives the same bytes.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import sys
import threading
import zlib
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from lymphnode.core.errors import ConfigError, LymphnodeError, SlideError
from lymphnode.patches.cache import CODECS, CacheWriter
from lymphnode.patches.sampling import sample_patches
from lymphnode.wsi.annotations import read_asap
from lymphnode.wsi.slide import SLIDE_SUFFIXES, open_slide
from lymphnode.wsi.tissue import tissue_mask

log = logging.getLogger(__name__)

CACHE_KINDS = ("unlabeled", "labeled", "test")
#: File suffixes taken for slides (those OpenSlide reads).
SPLIT_FILE = "split.json"
_SAMPLING_KEYS = (
    "tumor_probability",
    "min_tumor_fraction",
    "center_fraction",
    "min_tissue_fraction",
    "max_tries",
)


# ----------------------------------------------------------------------------------------------
# slides and the split


@dataclass(frozen=True)
class SlideSource:
    """One input slide: its name (file stem), file and ASAP XML (None for a normal slide)."""

    name: str
    path: Path
    annotations: Path | None

    @property
    def annotated(self) -> bool:
        return self.annotations is not None


def find_slides(slides_dir: str | Path, annotations_dir: str | Path | None) -> list[SlideSource]:
    """The slides in ``slides_dir`` (sorted by name), each with ``<annotations_dir>/<name>.xml``.

    Raises:
        ConfigError: the folder is missing or holds no slide, or two slides share a name.
    """
    slides_dir = Path(slides_dir)
    if not slides_dir.is_dir():
        raise ConfigError(f"paths.slides_dir {slides_dir} is not a directory (expected the slides)")
    files = sorted(
        p
        for p in slides_dir.iterdir()
        if p.suffix.lower() in SLIDE_SUFFIXES and not p.name.startswith(".")
    )
    if not files:
        raise ConfigError(
            f"paths.slides_dir {slides_dir} holds no slide (expected files ending in "
            f"{', '.join(SLIDE_SUFFIXES)})"
        )
    names = [p.stem for p in files]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"paths.slides_dir {slides_dir}: several slides named {dupes}")
    xml_dir = Path(annotations_dir) if annotations_dir is not None else None
    xmls: dict[str, Path] = {}
    if xml_dir is not None and xml_dir.is_dir():
        xmls = {p.stem: p for p in xml_dir.iterdir() if p.suffix.lower() == ".xml"}
    elif xml_dir is not None:
        log.warning("paths.annotations_dir %s does not exist: every slide is normal", xml_dir)
    orphans = sorted(set(xmls) - set(names))
    if orphans:
        log.warning(
            "%d annotation files in %s have no slide in %s and are not used: %s",
            len(orphans),
            xml_dir,
            slides_dir,
            ", ".join(orphans[:10]),
        )
    return [SlideSource(p.stem, p, xmls.get(p.stem)) for p in files]


def split_slides(
    sources: Sequence[SlideSource],
    *,
    test_slides: Sequence[str] | None,
    test_fraction: float,
    seed: int,
) -> tuple[list[SlideSource], list[SlideSource]]:
    """Train and test slides (each sorted by name); no slide is in both.

    ``test_slides`` names the held-out slides; when None, ``round(test_fraction * n)`` of the
    annotated and of the normal slides each (at least one of a group when the fraction is
    positive and the group has two or more) are drawn with ``seed``.
    """
    names = [s.name for s in sources]
    if test_slides is not None:
        wanted = [str(t) for t in test_slides]
        unknown = [t for t in wanted if t not in names]
        if unknown:
            raise ConfigError(
                f"split.test_slides names slides that are not in paths.slides_dir: {unknown} "
                f"(available: {', '.join(names[:20])}{', ...' if len(names) > 20 else ''})"
            )
        test = set(wanted)
    else:
        if not 0.0 <= test_fraction < 1.0:
            raise ConfigError(f"split.test_fraction must be in [0, 1), got {test_fraction!r}")
        rng = np.random.default_rng(int(seed))
        test = set()
        for group in ([s for s in sources if s.annotated], [s for s in sources if not s.annotated]):
            # At least one held out when the fraction is positive, at least one kept for training.
            k = round(test_fraction * len(group))
            if test_fraction > 0:
                k = max(k, 1)
            k = max(0, min(k, len(group) - 1))
            order = rng.permutation(len(group))
            test.update(group[i].name for i in order[:k])
    train = [s for s in sources if s.name not in test]
    held_out = [s for s in sources if s.name in test]
    if not train:
        raise ConfigError(
            "the split leaves no training slide (every slide is in split.test_slides)"
        )
    return train, held_out


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


def _int_at_least(key: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{key} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def settings_from_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Validate the prepare config; returns plain values (ConfigError names the bad key)."""
    caches = list(cfg.get("caches") or [])
    unknown = [c for c in caches if c not in CACHE_KINDS]
    if unknown or not caches:
        raise ConfigError(f"caches must be a non-empty subset of {list(CACHE_KINDS)}, got {caches}")
    codec = cfg.get("codec")
    if codec not in CODECS:
        raise ConfigError(f"codec must be one of {list(CODECS)}, got {codec!r}")
    counts = dict(cfg.get("counts") or {})
    for kind in caches:
        counts[kind] = _int_at_least(f"counts.{kind}", counts.get(kind), minimum=0)
    sampling = dict(cfg.get("sampling") or {})
    extra = sorted(set(sampling) - set(_SAMPLING_KEYS))
    if extra:
        raise ConfigError(f"sampling has unknown keys {extra} (expected {list(_SAMPLING_KEYS)})")
    mpp = cfg.get("mpp")
    if mpp is not None and not (isinstance(mpp, (int, float)) and mpp > 0):
        raise ConfigError(f"mpp must be a positive number (µm/px) or null, got {mpp!r}")
    slide_mpp = cfg.get("slide_mpp")
    if slide_mpp is not None and not (isinstance(slide_mpp, (int, float)) and slide_mpp > 0):
        raise ConfigError(f"slide_mpp must be a positive number (µm/px) or null, got {slide_mpp!r}")
    tissue_downsample = (cfg.get("tissue") or {}).get("downsample", 32)
    if not (isinstance(tissue_downsample, (int, float)) and tissue_downsample >= 1):
        raise ConfigError(f"tissue.downsample must be a number >= 1, got {tissue_downsample!r}")
    patch = PatchSettings(
        patch_size=_int_at_least("patch_size", cfg.get("patch_size")),
        level=_int_at_least("level", cfg.get("level"), minimum=0),
        mpp=float(mpp) if mpp is not None else None,
        slide_mpp=float(slide_mpp) if slide_mpp is not None else None,
        tissue_downsample=float(tissue_downsample),
        sampling=sampling,
    )
    workers = _int_at_least("workers", cfg.get("workers"), minimum=0)
    quality = _int_at_least("quality", cfg.get("quality", 90))
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
        "force": bool(cfg.get("force", False)),
        "seed": int(cfg.get("seed", 0)),
        "split_seed": int(split.get("seed", cfg.get("seed", 0))),
        "test_slides": list(test_slides) if test_slides is not None else None,
        "test_fraction": float(split.get("test_fraction", 0.2)),
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


def process_slide(job: SlideJob) -> SlideResult:
    """Sample, read and write one slide's shards; LymphnodeErrors come back in the result."""
    result = SlideResult(job.source.name)
    source, patch = job.source, job.patch
    try:
        with open_slide(source.path, mpp=patch.slide_mpp) as slide:
            level = _read_level(slide, patch, source)
            ds = float(slide.level_downsamples[level])
            annotations = None
            if source.annotations is not None:
                annotations = read_asap(source.annotations)
                annotations.validate_within(*slide.dimensions, path=source.path)
            tissue = tissue_mask(slide, downsample=patch.tissue_downsample)
            size = patch.patch_size
            extent = round(size * ds)  # level-0 px
            for shard_job in job.shards:
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


def _worker_init() -> None:
    """One thread per worker process: the pool is the parallelism."""
    try:
        import cv2

        cv2.setNumThreads(1)
    except ImportError:  # pragma: no cover
        pass


# ----------------------------------------------------------------------------------------------
# the whole build


def _cache_config(kind: str, slides: Sequence[str], settings: Mapping[str, Any]) -> dict[str, Any]:
    """What decides a cache's bytes (stored in its manifest; a rerun must match it)."""
    patch: PatchSettings = settings["patch"]
    return {
        "kind": kind,
        "slides": list(slides),
        "patch_size": patch.patch_size,
        "level": patch.level if patch.mpp is None else None,
        "mpp": patch.mpp,
        "slide_mpp": patch.slide_mpp,
        "count": settings["counts"][kind],
        "sampling": dict(patch.sampling),
        "tissue_downsample": patch.tissue_downsample,
        "seed": settings["seed"],
    }


def _split_record(
    train: Sequence[SlideSource],
    test: Sequence[SlideSource],
    slides_dir: Path,
    annotations_dir: Path | None,
    settings: Mapping[str, Any],
) -> dict[str, Any]:
    def entry(s: SlideSource) -> dict[str, Any]:
        return {
            "name": s.name,
            "path": s.path.name,
            "annotations": s.annotations.name if s.annotations is not None else None,
        }

    return {
        "slides_dir": str(slides_dir.resolve()),
        "annotations_dir": str(annotations_dir.resolve()) if annotations_dir else None,
        "test_slides": settings["test_slides"],
        "test_fraction": settings["test_fraction"],
        "seed": settings["split_seed"],
        "train": [entry(s) for s in train],
        "test": [entry(s) for s in test],
    }


def _write_split(path: Path, record: Mapping[str, Any], force: bool) -> None:
    """Write split.json atomically; refuse to replace a different split unless ``force``."""
    if path.is_file() and not force:
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            old = None
        if isinstance(old, dict):
            changed = [
                key
                for key in ("train", "test")
                if [e.get("name") for e in old.get(key, [])] != [e["name"] for e in record[key]]
            ]
            if changed:
                raise ConfigError(
                    f"{path} holds another train/test split (its {' and '.join(changed)} slides "
                    "differ); pass force=true to rebuild the caches with the new split or choose "
                    "another paths.cache_dir"
                )
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"cannot write the split file {path}: {exc}") from exc


def prepare(
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

    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create paths.cache_dir {cache_dir}: {exc}") from exc
    writers = {
        kind: CacheWriter(
            cache_dir / kind,
            _cache_config(kind, [s.name for s in members[kind]], settings),
            codec=settings["codec"],
            patch_size=settings["patch"].patch_size,
            has_masks=kind != "unlabeled",
            quality=settings["quality"],
            force=settings["force"],
        )
        for kind in settings["caches"]
    }
    _write_split(
        cache_dir / SPLIT_FILE,
        _split_record(train, test, slides_dir, annotations_dir, settings),
        settings["force"],
    )

    jobs: list[SlideJob] = []
    for source in sources:
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
            jobs.append(SlideJob(source, shards, settings["patch"], settings["seed"]))
    skipped = len(sources) - len(jobs)
    if skipped:
        log.info("%d slides already complete in every cache: skipped", skipped)

    error = _run(
        jobs, writers, settings["workers"], total=len(sources), done=skipped, progress=progress
    )
    if error is not None:
        raise error
    for kind, writer in writers.items():
        writer.finalize([s.name for s in members[kind]])
        log.info("%s cache: %s", kind, writer.path)
    return {kind: writer.path for kind, writer in writers.items()}


class _Progress(tqdm):
    """tqdm without its monitor thread, so that worker processes can be forked safely."""

    monitor_interval = 0


def _mp_context() -> multiprocessing.context.BaseContext:
    """``fork`` on Linux when this process runs one thread (workers start in milliseconds and
    inherit the imports); ``spawn`` otherwise (threads and fork do not mix; macOS)."""
    if sys.platform.startswith("linux") and threading.active_count() == 1:
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def _run(
    jobs: Sequence[SlideJob],
    writers: Mapping[str, CacheWriter],
    workers: int,
    *,
    total: int,
    done: int,
    progress: bool,
) -> LymphnodeError | None:
    """Run the slide jobs (in a pool when ``workers`` > 0); commit finished shards as they come.

    Returns the first error; no job is started after it, running ones finish and are committed.
    """
    from tqdm.contrib.logging import logging_redirect_tqdm

    first_error: LymphnodeError | None = None
    if not jobs:
        return None
    with (
        logging_redirect_tqdm(),
        _Progress(
            total=total, initial=done, unit="slide", desc="prepare", disable=not progress
        ) as bar,
    ):

        def record(result: SlideResult) -> None:
            nonlocal first_error
            for kind, info in result.done.items():
                writers[kind].commit(result.name, info)
            bar.update(1)
            bar.set_postfix_str(f"{result.name}: {result.patches} patches", refresh=False)
            if result.error is not None and first_error is None:
                first_error = result.error

        if workers == 0 or (len(jobs) <= 1 and workers <= 1):
            for job in jobs:
                record(process_slide(job))
                if first_error is not None:
                    break
            return first_error
        with ProcessPoolExecutor(
            max_workers=min(workers, len(jobs)), mp_context=_mp_context(), initializer=_worker_init
        ) as pool:
            pending: set[Future[SlideResult]] = set()
            queue: Iterator[SlideJob] = iter(jobs)
            window = 2 * workers  # jobs in flight: bounded, so an error stops the rest quickly
            while True:
                while first_error is None and len(pending) < window:
                    next_job = next(queue, None)
                    if next_job is None:
                        break
                    pending.add(pool.submit(process_slide, next_job))
                if not pending:
                    break
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    record(future.result())
    return first_error


# ----------------------------------------------------------------------------------------------
# Hydra entry point


def run(cfg: Any) -> dict[str, Path]:
    """:func:`prepare` with the slides, annotations and cache folders of ``cfg.paths``."""
    from omegaconf import OmegaConf

    plain = OmegaConf.to_container(cfg, resolve=True)
    if not isinstance(plain, dict):  # pragma: no cover - Hydra always gives a mapping
        raise ConfigError(f"the prepare config must be a mapping, got {type(plain).__name__}")
    paths = plain.get("paths") or {}
    return prepare(
        {str(k): v for k, v in plain.items()},
        slides_dir=paths["slides_dir"],
        annotations_dir=paths.get("annotations_dir"),
        cache_dir=paths["cache_dir"],
    )


def main() -> None:
    """``python -m lymphnode.prepare [key=value ...]`` behind the error boundary of
    :mod:`lymphnode.core.boundary` (bad input: one ``error:`` line, exit 1; a bug: traceback, 2).

    Hydra is imported here, not at module level, so that worker processes do not pay for it.
    """
    import hydra

    from lymphnode.core.boundary import config_dir, hydra_boundary

    app = hydra_boundary(run)
    hydra.main(version_base="1.3", config_path=config_dir(), config_name="prepare")(app)()


if __name__ == "__main__":
    main()
