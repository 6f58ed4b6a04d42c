"""``python -m lymphnode.select checkpoint=CKPT slides=DIR out_dir=DIR k=40``

The patches worth labelling next: the tissue tiles of the slides (the checkpoint's read level and
patch size, ``infer``'s grid) that the fine-tuned model is least sure about (``score``: ``tta`` D4
disagreement, ``entropy``, ``tta_entropy``), spread out (no two closer than ``min_distance`` level-0
px, centre to centre, Chebyshev; default one patch side) and at most ``per_slide_cap`` per slide.
Into ``out_dir``: ``<slide>.geojson`` per slide (QuPath squares of class "To label" with measurements
Rank and Score: drag it onto the slide in QuPath, draw the Tumor outlines inside the squares, export
the annotations as ``<slide>.geojson`` for ``prepare``) and ``selection.csv`` (rank, slide, x, y,
size, score; level-0 px, top-left). ``exclude`` skips tiles that overlap already-labeled squares
(patch caches, or GeoJSON of earlier rounds). Bad input (a missing slide, a pretraining checkpoint,
k too large, a slide without tissue) writes nothing. The logic lives in
:mod:`lymphnode.inference.labelling`; this module composes the config and maps errors.

``slides`` is a list of files, a folder, a glob, or ``split:<split.json>`` (as ``infer``).
"""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig, OmegaConf

from lymphnode.core.boundary import config_dir, hydra_boundary
from lymphnode.core.errors import ConfigError
from lymphnode.infer import resolve_slides
from lymphnode.inference.labelling import SelectSettings, select_patches, write_selection
from lymphnode.inference.settings import InferenceSettings
from lymphnode.wsi.slide import slide_mpp_setting

log = logging.getLogger(__name__)


def _list(cfg: DictConfig, key: str) -> list:
    value = OmegaConf.to_container(cfg[key]) if OmegaConf.is_list(cfg[key]) else cfg[key]
    if value is None:
        return []
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
        return [value]
    if not isinstance(value, list):
        raise ConfigError(f"{key} must be a list, got {value!r}")
    return value


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="select")
@hydra_boundary
def main(cfg: DictConfig) -> None:
    """Hydra entry point: select, write, print one line; behind the error boundary of
    :mod:`lymphnode.core.boundary` (bad input: one ``error:`` line, exit 1, nothing written)."""
    settings = SelectSettings(
        k=cfg.k,
        score=str(cfg.score),
        min_distance=cfg.min_distance,
        per_slide_cap=cfg.per_slide_cap,
        allow_fewer=bool(cfg.allow_fewer),
        class_name=str(cfg.class_name),
        color=tuple(_list(cfg, "color")),  # type: ignore[arg-type]
    )
    inference = InferenceSettings(
        patch_size=cfg.patch_size,
        stride=cfg.stride,
        batch_size=int(cfg.batch_size),
        num_workers=int(cfg.num_workers),
        bf16=bool(cfg.bf16),
        channels_last=bool(cfg.channels_last),
        device=str(cfg.device),
        min_tissue_fraction=float(cfg.min_tissue_fraction),
        num_threads=None if cfg.get("num_threads") is None else int(cfg.num_threads),
        adapt_bn=cfg.get("adapt_bn", False),
        adapt_tiles=cfg.get("adapt_tiles", 512),
        adapt_layers=cfg.get("adapt_layers"),
    )
    slides = resolve_slides(_list(cfg, "slides"))
    selection = select_patches(
        cfg.checkpoint, slides, settings, inference=inference,
        exclude=[str(p) for p in _list(cfg, "exclude")], progress=bool(cfg.progress),
        trusted_modules=[str(m) for m in _list(cfg, "trusted_modules")],
        slide_mpp=slide_mpp_setting(cfg.get("slide_mpp")),
    )  # fmt: skip
    write_selection(cfg.out_dir, selection, class_name=settings.class_name, color=settings.color)
    per_slide = {s: sum(p.slide == s for p in selection.patches) for s in selection.slides}
    print(
        f"selected {len(selection.patches)} patches ({settings.score}) from "
        f"{sum(selection.candidates.values())} candidates of {len(selection.slides)} slides "
        f"({', '.join(f'{s}: {n}' for s, n in per_slide.items())}) -> {cfg.out_dir}"
    )


if __name__ == "__main__":
    main()
