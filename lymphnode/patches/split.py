"""The slides of a build and their seeded train/test split (``<cache_dir>/split.json``).

The split is by slide, never by patch: a list of held-out slides, or a seeded fraction of the
annotated and of the normal slides each. It is written beside the caches so that ``infer`` and
``evaluate`` can take the held-out slides (``split:<split.json>``), and a rebuild with another
split is refused unless forced (the caches' slides would no longer match it).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lymphnode.core import atomic
from lymphnode.core.errors import ConfigError
from lymphnode.core.records import read_record
from lymphnode.wsi.slide import SLIDE_SUFFIXES

log = logging.getLogger(__name__)

SPLIT_FILE = "split.json"
ANNOTATION_SUFFIXES = (".xml", ".geojson")  # ASAP XML, QuPath GeoJSON

__all__ = [
    "SPLIT_FILE",
    "SlideSource",
    "find_slides",
    "split_record",
    "split_slides",
    "write_split",
]


@dataclass(frozen=True)
class SlideSource:
    """One input slide: its name (file stem), file and annotations (ASAP XML or QuPath GeoJSON;
    None for a normal slide)."""

    name: str
    path: Path
    annotations: Path | None

    @property
    def annotated(self) -> bool:
        return self.annotations is not None


def find_slides(slides_dir: str | Path, annotations_dir: str | Path | None) -> list[SlideSource]:
    """The slides in ``slides_dir`` (sorted by name), each with ``<annotations_dir>/<name>.xml``
    (ASAP) or ``<annotations_dir>/<name>.geojson`` (QuPath).

    Raises:
        ConfigError: the folder is missing or holds no slide, two slides share a name, or a slide
            has both an XML and a GeoJSON file.
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
        for p in sorted(xml_dir.iterdir()):
            if p.suffix.lower() not in ANNOTATION_SUFFIXES or p.name.startswith("."):
                continue
            if p.stem in xmls:
                raise ConfigError(
                    f"paths.annotations_dir {xml_dir}: slide {p.stem!r} has two annotation files, "
                    f"{xmls[p.stem].name} and {p.name}; keep one"
                )
            xmls[p.stem] = p
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


def split_record(
    train: Sequence[SlideSource],
    test: Sequence[SlideSource],
    slides_dir: Path,
    annotations_dir: Path | None,
    settings: Mapping[str, Any],
) -> dict[str, Any]:
    """The content of split.json: the folders, the split settings and both slide lists."""

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


def write_split(path: Path, record: Mapping[str, Any], force: bool) -> None:
    """Write split.json atomically; refuse to replace a different split unless ``force``."""
    if path.is_file() and not force:
        try:
            old = read_record(path, what="split file")
        except ConfigError:  # unreadable: nothing to protect, it is replaced
            old = None
        if old is not None:
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
    try:
        atomic.write_json(path, record)
    except OSError as exc:
        raise ConfigError(f"cannot write the split file {path}: {exc}") from exc
