"""``python -m lymphnode.infer checkpoint=CKPT slides=[...] out_dir=DIR [annotations=DIR]``

Whole-slide tumor-probability heatmaps from a fine-tuned checkpoint (see :mod:`lymphnode.inference.predict`):
tiles are read and normalised by the checkpoint's preprocessing contract (level, patch size, stain
normalisation, normalisation; :mod:`lymphnode.models.preprocess`), exactly as its test patches were,
and the task module gives the probabilities.
Per slide, into ``out_dir``: ``<slide>.heatmap.tif`` (pyramidal, opens in OpenSlide and QuPath;
input of ``lymphnode.evaluate``) and ``<slide>.overlay.png`` (thumbnail with the heatmap and, when
``annotations`` holds ``<slide>.xml``, the lesion outlines). Every heatmap records what made it
(the checkpoint's path and SHA-256, the settings that change the map). Resumable: a slide whose
outputs exist and record this checkpoint and these settings is skipped unless ``overwrite=true``;
one made by another checkpoint or with other settings is recomputed, with a warning naming the
differences. A slide that fails (unreadable, no tissue) is reported and the
others go on; the exit code is 1 when any failed, and completed slides are kept.

``slides`` is a list of files, a folder (every ``*.tif``/``*.svs``/... in it), a glob, or
``split:<split.json>`` (the test slides of ``lymphnode.prepare``'s split file).
"""

from __future__ import annotations

import dataclasses
import glob
import logging
from collections.abc import Sequence
from pathlib import Path

import hydra
from omegaconf import DictConfig, ListConfig, OmegaConf

from lymphnode.core.boundary import EXIT_USER_ERROR, config_dir, hydra_boundary
from lymphnode.core.errors import CheckpointError, ConfigError, EvaluationError, LymphnodeError
from lymphnode.core.records import read_record
from lymphnode.inference.heatmap import (
    heatmap_path,
    heatmap_source,
    read_heatmap_source,
    source_differences,
    write_heatmap,
)
from lymphnode.inference.overlay import render_overlay, write_overlay
from lymphnode.inference.predict import predict_slide, scratch_dir
from lymphnode.inference.resolution import for_slide
from lymphnode.inference.settings import InferenceSettings
from lymphnode.patches.format import sha256
from lymphnode.wsi.annotations import Annotations, read_asap, read_downsample
from lymphnode.wsi.slide import SLIDE_SUFFIXES, slide_mpp_setting

log = logging.getLogger(__name__)


def overlay_path(out_dir: str | Path, slide: str) -> Path:
    """Where the overlay thumbnail of ``slide`` lives in ``out_dir``."""
    return Path(out_dir) / f"{slide}.overlay.png"


def resolve_slides(spec: str | Sequence[str]) -> list[Path]:
    """Slide paths from a list, a folder, a glob or ``split:<split.json>`` (its test slides)."""
    items = [spec] if isinstance(spec, str) else list(spec)
    out: list[Path] = []
    for item in items:
        item = str(item)
        if item.startswith("split:"):
            out += _split_test_slides(Path(item[len("split:") :]))
        elif Path(item).is_dir():
            found = sorted(p for p in Path(item).iterdir() if p.suffix.lower() in SLIDE_SUFFIXES)
            if not found:
                raise ConfigError(
                    f"slides={item} is a folder without slides ({', '.join(SLIDE_SUFFIXES)})"
                )
            out += found
        elif any(ch in item for ch in "*?["):
            found = sorted(Path(p) for p in glob.glob(item))
            if not found:
                raise ConfigError(f"slides={item} matches no file")
            out += found
        else:
            out.append(Path(item))
    if not out:
        raise ConfigError(
            "slides=[] names no slide (expected files, a folder, a glob or split:FILE)"
        )
    stems = [p.stem for p in out]
    dupes = sorted({s for s in stems if stems.count(s) > 1})
    if dupes:
        raise ConfigError(f"slides holds several files named {dupes}; outputs are named by stem")
    return out


def _split_test_slides(path: Path) -> list[Path]:
    split = read_record(path, what="split file", required_keys={"test": list})  # ConfigError
    if split is None:
        raise ConfigError(f"split file {path} does not exist (written by lymphnode.prepare)")
    test = split["test"]
    slides_dir = split.get("slides_dir")
    paths = []
    for entry in test:
        p = Path(entry["path"] if isinstance(entry, dict) else entry)
        if not p.is_absolute() and not p.exists() and slides_dir:
            p = Path(slides_dir) / p
        if not p.suffix and slides_dir:
            matches = [
                q
                for q in Path(slides_dir).glob(f"{p.name}.*")
                if q.suffix.lower() in SLIDE_SUFFIXES
            ]
            p = matches[0] if matches else p
        paths.append(p)
    return paths


def check_segmentation_task(task: object, checkpoint: str | Path) -> None:
    """CheckpointError when ``task`` (the checkpoint's task module) predicts no tumour
    probabilities: a pretraining (pretext) checkpoint has an untrained segmentation head, and
    its heatmap would be noise. Names the task found and the task infer needs."""
    from lymphnode.tasks.base import TaskModule

    cls = type(task)
    if getattr(cls, "probabilities", None) is TaskModule.probabilities:  # not overridden
        name = getattr(task, "task_name", cls.__name__)
        raise CheckpointError(
            f"checkpoint={checkpoint} was written by the task {cls.__module__}.{cls.__qualname__} "
            f"({name}: pretraining), which predicts no tumour probabilities; infer needs a "
            "fine-tuned checkpoint of lymphnode.tasks.MultiTaskModule (segmentation: a run of "
            "experiment=finetune or experiment=scratch, <runs_dir>/<init>/size<N>/fold<K>/"
            "seed<S>/checkpoints/best.ckpt)"
        )


def run_inference(
    checkpoint: str | Path,
    slides: Sequence[Path],
    out_dir: str | Path,
    *,
    annotations: str | Path | None = None,
    annotations_downsample: float = 1.0,
    slide_mpp: float | None = None,
    settings: InferenceSettings | None = None,
    overwrite: bool = False,
    overlay_max_side: int = 2048,
    progress: bool = True,
    trusted_modules: Sequence[str] = (),
) -> dict[str, str]:
    """Heatmap + overlay for each slide; returns {slide: "done" | "skipped" | "failed: <why>"}.

    ``trusted_modules``: modules besides lymphnode's own whose classes the checkpoint may name
    (a network or task of the user's; :mod:`lymphnode.models.allowlist`).
    ``annotations_downsample``: the outlines' px per level-0 px of the slide files (their
    coordinates are divided by it); every outline is checked against its slide before the
    checkpoint is loaded (AnnotationError: one outside its slide). ``slide_mpp``: level-0 µm/px
    of slides that do not record it (the file's own value wins), recorded in each heatmap."""
    from tqdm import tqdm

    from lymphnode.models.checkpoint import load_inference_model
    from lymphnode.wsi.slide import open_slide
    from lymphnode.wsi.tissue import tissue_mask

    settings = settings or InferenceSettings()
    outlines = _outlines(slides, annotations, annotations_downsample)
    # CheckpointError before any slide is touched
    model = load_inference_model(checkpoint, trusted_modules=trusted_modules)
    check_segmentation_task(model.task, checkpoint)
    if settings.patch_size and settings.patch_size != model.patch_size:
        log.warning(
            "patch_size=%d differs from the %d px the network was trained on (checkpoint %s)",
            settings.patch_size, model.patch_size, checkpoint,
        )  # fmt: skip
    source = heatmap_source(
        checkpoint, sha256(Path(checkpoint)),
        {**dataclasses.asdict(settings), "patch_size": settings.patch_size or model.patch_size},
    )  # fmt: skip
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    status: dict[str, str] = {}
    for path in tqdm(list(slides), desc="slides", unit="slide", disable=not progress):
        name = path.stem
        heat_file, png_file = heatmap_path(out, name), overlay_path(out, name)
        if not overwrite and heat_file.is_file() and png_file.is_file():
            changed = _changed_source(heat_file, source)
            if not changed:
                log.info("%s: heatmap exists, skipped (overwrite=true redoes it)", name)
                status[name] = "skipped"
                continue
            log.warning(
                "%s: the heatmap %s was made otherwise (%s): recomputed", name, heat_file,
                "; ".join(changed),
            )  # fmt: skip
        try:
            with open_slide(path) as slide:
                if slide.mpp is None:  # the file's own value wins
                    slide.mpp = slide_mpp
                tissue = tissue_mask(slide)
                with scratch_dir(out, name) as work:
                    heatmap = predict_slide(
                        model.task, for_slide(model.preprocess, slide), slide, tissue,
                        settings=settings,
                        workdir=work, progress=progress,
                    )  # fmt: skip
                heatmap.source = source
                ann = outlines.get(path)
                overlay = render_overlay(
                    slide, heatmap,
                    tumor_outlines=ann.tumor if ann else None,
                    exclusion_outlines=ann.exclusion if ann else None,
                    max_side=overlay_max_side,
                )  # fmt: skip
            write_heatmap(heat_file, heatmap)
            write_overlay(png_file, overlay)
            status[name] = "done"
            log.info(
                "%s: heatmap %s, max p %.3f", name, heat_file, float(heatmap.probabilities.max())
            )
        except LymphnodeError as exc:
            status[name] = f"failed: {exc}"
            log.error("%s failed: %s", name, exc)
        except OSError as exc:  # a full disk (scratch arrays, heatmap, overlay): this slide fails
            status[name] = f"failed: cannot write its outputs in {out}: {exc}"
            log.error("%s failed: cannot write its outputs in %s: %s", name, out, exc)
    return status


def _outlines(
    slides: Sequence[Path], annotations: str | Path | None, downsample: float
) -> dict[Path, Annotations]:
    """``<annotations>/<slide>.xml`` of each slide that has one, divided by ``downsample`` and
    checked to lie within its slide (AnnotationError naming the file, box, slide size and key)."""
    from lymphnode.wsi.slide import open_slide

    ds = read_downsample(downsample)
    out: dict[Path, Annotations] = {}
    if not annotations:
        return out
    for path in slides:
        xml = Path(annotations) / f"{Path(path).stem}.xml"
        if not xml.is_file():
            continue
        ann = read_asap(xml).scaled(ds)
        with open_slide(path) as slide:
            ann.validate_within(*slide.dimensions, path=path, downsample=ds)
        out[Path(path)] = ann
    return out


def _changed_source(heat_file: Path, source: dict) -> list[str]:
    """How the existing heatmap's record differs from ``source`` (empty: the same)."""
    try:
        return source_differences(read_heatmap_source(heat_file), source)
    except EvaluationError as exc:
        return [f"unreadable ({exc})"]


def _names(value: object) -> list[str]:
    """``trusted_modules`` from the config: null, one name or a list of names."""
    if value is None:
        return []
    if isinstance(value, ListConfig):
        value = OmegaConf.to_container(value)
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise ConfigError(f"trusted_modules={value!r} is invalid; expected a list of module names")
    return [str(v) for v in value]


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="infer")
@hydra_boundary
def main(cfg: DictConfig) -> None:
    """Hydra entry point behind the error boundary of :mod:`lymphnode.core.boundary`; exit code 1
    when the checkpoint is bad or any slide failed (each named on stderr)."""
    slides_spec = cfg.slides
    if isinstance(slides_spec, ListConfig):
        slides_spec = OmegaConf.to_container(slides_spec)
    settings = InferenceSettings(
        patch_size=cfg.patch_size,
        stride=cfg.stride,
        downsample=float(cfg.downsample),
        blend=str(cfg.blend),
        batch_size=int(cfg.batch_size),
        num_workers=int(cfg.num_workers),
        tta=bool(cfg.tta),
        bf16=bool(cfg.bf16),
        channels_last=bool(cfg.channels_last),
        device=str(cfg.device),
        min_tissue_fraction=float(cfg.min_tissue_fraction),
        # torch threads on the CPU (None: the cores the workers leave free); read with get() so
        # that a conf/infer.yaml without the key still composes (`+num_threads=N` then sets it)
        num_threads=None if cfg.get("num_threads") is None else int(cfg.num_threads),
        adapt_bn=cfg.get("adapt_bn", False),
        adapt_tiles=cfg.get("adapt_tiles", 512),
        adapt_layers=cfg.get("adapt_layers"),
    )
    slides = resolve_slides(slides_spec)  # type: ignore[arg-type]
    status = run_inference(
        cfg.checkpoint, slides, cfg.out_dir, annotations=cfg.annotations,
        annotations_downsample=cfg.get("annotations_downsample", 1),
        slide_mpp=slide_mpp_setting(cfg.get("slide_mpp")), settings=settings,
        overwrite=bool(cfg.overwrite), overlay_max_side=int(cfg.overlay_max_side),
        progress=bool(cfg.progress), trusted_modules=_names(cfg.get("trusted_modules")),
    )  # fmt: skip
    failed = {k: v for k, v in status.items() if v.startswith("failed")}
    done = sum(v == "done" for v in status.values())
    skipped = sum(v == "skipped" for v in status.values())
    print(f"heatmaps in {cfg.out_dir}: {done} done, {skipped} skipped, {len(failed)} failed")
    if failed:
        for name, why in failed.items():
            log.error("%s: %s", name, why)
        raise SystemExit(EXIT_USER_ERROR)


if __name__ == "__main__":
    main()
