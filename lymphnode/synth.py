"""``python -m lymphnode.synth [key=value ...]``: made-up CAMELYON16-like slides (config
``conf/synth.yaml``; logic in :mod:`lymphnode.synthetic`).

Writes ``<out_dir>/slides/tumor_XXX.tif``, ``normal_XXX.tif`` and
``<out_dir>/annotations/tumor_XXX.xml`` in parallel, with a manifest so that a rerun skips finished
slides and a rerun with another config refuses. The names below are re-exported for callers of
earlier releases (``from lymphnode.synth import make_slide``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from lymphnode.synthetic import (
    CAMELYON_MPP,
    GENERATOR_VERSION,
    MANIFEST_NAME,
    SlideStyle,
    SynthSlide,
    generate_slides,
    make_slide,
    slide_names,
    slide_seed,
)

__all__ = [
    "CAMELYON_MPP",
    "GENERATOR_VERSION",
    "MANIFEST_NAME",
    "SlideStyle",
    "SynthSlide",
    "generate_slides",
    "make_slide",
    "slide_names",
    "slide_seed",
]


def run(cfg: Any) -> str:
    """Make the slide set ``cfg`` describes; returns the one-line summary."""
    t0 = time.perf_counter()
    manifest = generate_slides(
        cfg.out_dir,
        n_tumor=cfg.n_tumor,
        n_normal=cfg.n_normal,
        width=cfg.width,
        height=cfg.height,
        seed=cfg.seed,
        mpp=cfg.mpp,
        workers=cfg.workers,
        overwrite=cfg.overwrite,
    )
    slides = manifest["slides"]
    fractions = [s["tumor_fraction"] for s in slides.values() if s.get("tumor")]
    return (
        f"{len(slides)} slides in {Path(cfg.out_dir) / 'slides'} "
        f"({sum(1 for s in slides.values() if s.get('tumor'))} tumor, "
        f"tumor fraction of tissue {min(fractions, default=0):.3f}-{max(fractions, default=0):.3f}) "
        f"in {time.perf_counter() - t0:.1f} s"
    )


def _main(cfg: Any) -> None:
    """The Hydra entry point: ``python -m lymphnode.synth [key=value ...]``."""
    print(run(cfg))


def main() -> None:
    """``python -m lymphnode.synth [key=value ...]`` behind the error boundary of
    :mod:`lymphnode.core.boundary` (bad input: one ``error:`` line, exit 1; a bug: traceback, 2).
    Hydra is imported here so that the slide workers do not pay for it."""
    import hydra

    from lymphnode.core.boundary import config_dir, hydra_boundary

    app = hydra_boundary(_main)
    hydra.main(version_base=None, config_path=config_dir(), config_name="synth")(app)()


if __name__ == "__main__":
    main()
