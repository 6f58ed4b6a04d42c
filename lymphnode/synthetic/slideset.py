"""A set of synthetic slides in the CAMELYON16 layout, made in parallel and resumable.

``<out_dir>/slides/{tumor_001,..,normal_001,..}.tif``, ``<out_dir>/annotations/tumor_XXX.xml``
and ``<out_dir>/slides/synth_manifest.json`` (the config, per-slide seeds and facts). The manifest
is a run record (:mod:`lymphnode.core.records`): a rerun with the same config skips the slides
already there, one with another config refuses and names the differing keys.
"""

from __future__ import annotations

import logging
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from lymphnode.core import atomic, validate
from lymphnode.core.errors import ConfigError
from lymphnode.core.pool import run_jobs
from lymphnode.core.records import resume_or_refuse
from lymphnode.synthetic.slide import GENERATOR_VERSION, MIN_SIDE, make_slide
from lymphnode.synthetic.style import CAMELYON_MPP

log = logging.getLogger(__name__)

MANIFEST_NAME = "synth_manifest.json"

__all__ = ["MANIFEST_NAME", "generate_slides", "slide_names", "slide_seed"]


def slide_seed(seed: int, name: str) -> int:
    """The seed of slide ``name`` in a set drawn from ``seed`` (independent streams per name)."""
    sequence = np.random.SeedSequence([int(seed), zlib.crc32(name.encode("utf-8"))])
    return int(sequence.generate_state(1, np.uint64)[0] >> np.uint64(1))


def slide_names(n_tumor: int, n_normal: int) -> list[tuple[str, bool]]:
    """CAMELYON16 names: ``tumor_001``.., ``normal_001``.. with whether each is a tumor slide."""
    return [(f"tumor_{i:03d}", True) for i in range(1, n_tumor + 1)] + [
        (f"normal_{i:03d}", False) for i in range(1, n_normal + 1)
    ]


def _write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    atomic.write_json(path, manifest, sort_keys=True)


def _make_one(job: dict[str, Any]) -> dict[str, Any]:
    info = make_slide(
        job["path"],
        seed=job["seed"],
        tumor=job["tumor"],
        size=(job["width"], job["height"]),
        mpp=job["mpp"],
        annotation_path=job["xml"],
    )
    return {
        "name": job["name"],
        "seconds": round(info.seconds, 2),
        "tumor_fraction": round(info.tumor_fraction, 4),
        "tissue_fraction": round(info.tissue_fraction, 4),
        "n_tumor_polygons": len(info.tumor),
        "n_exclusion_polygons": len(info.exclusion),
    }


def generate_slides(
    out_dir: str | Path,
    *,
    n_tumor: int,
    n_normal: int,
    width: int,
    height: int,
    seed: int,
    mpp: float = CAMELYON_MPP,
    workers: int = 2,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Write a set of synthetic slides in the CAMELYON16 layout; returns the manifest.

    ``<out_dir>/slides/{tumor_001,..,normal_001,..}.tif``, ``<out_dir>/annotations/tumor_XXX.xml``
    and ``<out_dir>/slides/synth_manifest.json`` (the config, per-slide seeds and facts). Slides
    already written with the same config are skipped (a killed run resumes); a folder made with
    another config (or holding slides synth did not write) is refused unless ``overwrite``.
    ``workers`` processes make one slide each (0 or 1: in this process).

    Raises:
        ConfigError: bad parameter, or the folder holds slides made with another config.
    """
    where = "synth: "
    n_tumor = validate.integer("n_tumor", n_tumor, minimum=0, where=where)
    n_normal = validate.integer("n_normal", n_normal, minimum=0, where=where)
    width = validate.integer("width", width, minimum=MIN_SIDE, unit="px", where=where)
    height = validate.integer("height", height, minimum=MIN_SIDE, unit="px", where=where)
    workers = validate.integer("workers", workers, minimum=0, where=where)
    if n_tumor + n_normal == 0:
        raise ConfigError("synth: n_tumor + n_normal must be at least 1, got 0 slides")
    seed = validate.integer("seed", seed, minimum=0, where=where)
    mpp = validate.number("mpp", mpp, 0.05, 5, unit="µm/px", where=where)

    out = Path(out_dir)
    slides_dir, xml_dir = out / "slides", out / "annotations"
    manifest_path = slides_dir / MANIFEST_NAME
    config = {
        "n_tumor": n_tumor,
        "n_normal": n_normal,
        "width": width,
        "height": height,
        "mpp": mpp,
        "seed": seed,
        "generator_version": GENERATOR_VERSION,
    }
    names = dict(slide_names(n_tumor, n_normal))
    remedy = "use another out_dir or overwrite=true"
    found = resume_or_refuse(
        manifest_path,
        config,
        what="synth manifest",
        remedy=remedy,
        force=overwrite,
        required_keys={"slides": dict},
    )
    old = found.record
    if old is None and not overwrite and slides_dir.is_dir():
        foreign = [n for n in names if (slides_dir / f"{n}.tif").exists()]
        if foreign:
            raise ConfigError(
                f"synth: {slides_dir} already holds {', '.join(foreign[:3])}.tif without a "
                f"{MANIFEST_NAME} (not written by synth); {remedy}"
            )
    if old is not None and overwrite:  # slides of the old set that the new one does not have
        for name in set(old["slides"]) - set(names):
            (slides_dir / f"{name}.tif").unlink(missing_ok=True)
            (xml_dir / f"{name}.xml").unlink(missing_ok=True)
    kept = old["slides"] if old is not None and not overwrite else {}
    manifest: dict[str, Any] = {
        "config": config,
        "slides": {k: v for k, v in kept.items() if k in names},
    }
    slides_dir.mkdir(parents=True, exist_ok=True)
    if n_tumor:
        xml_dir.mkdir(parents=True, exist_ok=True)

    jobs = []
    for name, is_tumor in names.items():
        tif, xml = slides_dir / f"{name}.tif", xml_dir / f"{name}.xml"
        if name in manifest["slides"] and tif.exists() and (not is_tumor or xml.exists()):
            continue  # finished by an earlier run with this config
        manifest["slides"].pop(name, None)
        if not is_tumor:
            xml.unlink(missing_ok=True)  # a normal slide has no XML
        jobs.append(
            {
                "name": name,
                "path": str(tif),
                "xml": str(xml) if is_tumor else None,
                "tumor": is_tumor,
                "seed": slide_seed(seed, name),
                "width": width,
                "height": height,
                "mpp": mpp,
            }
        )
    _write_manifest(manifest_path, manifest)
    skipped = len(names) - len(jobs)
    if skipped:
        log.info("synth: %d of %d slides already in %s, skipped", skipped, len(names), slides_dir)

    def record(job: dict[str, Any], result: dict[str, Any]) -> None:
        manifest["slides"][job["name"]] = {
            "seed": job["seed"],
            "tumor": job["tumor"],
            "file": f"{job['name']}.tif",
            "annotation": f"../annotations/{job['name']}.xml" if job["tumor"] else None,
            **{k: v for k, v in result.items() if k != "name"},
        }
        _write_manifest(manifest_path, manifest)

    run_jobs(
        _make_one,
        jobs,
        workers=workers,
        on_result=record,
        desc="synth slides",
        unit="slide",
        progress=progress,
        start_method="spawn",  # OpenCV's threads in the parent do not survive a fork
        threads_per_worker=max(1, (os.cpu_count() or 1) // max(1, min(workers, len(jobs) or 1))),
    )
    return manifest
