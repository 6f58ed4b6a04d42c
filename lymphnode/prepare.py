"""``python -m lymphnode.prepare``: a slides folder (+ ASAP XML) → the patch caches unlabeled/,
labeled/ and test/ and the split file (logic in :mod:`lymphnode.patches.build`; config
``conf/prepare.yaml``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lymphnode.core.errors import ConfigError
from lymphnode.patches.build import CACHE_KINDS, build_caches, settings_from_config
from lymphnode.patches.split import SPLIT_FILE, find_slides, split_slides

log = logging.getLogger(__name__)

#: The build function under its earlier name.
prepare = build_caches

__all__ = [
    "CACHE_KINDS",
    "SPLIT_FILE",
    "find_slides",
    "prepare",
    "run",
    "settings_from_config",
    "split_slides",
]


def run(cfg: Any) -> dict[str, Path]:
    """:func:`~lymphnode.patches.build.build_caches` with the folders of ``cfg.paths``."""
    from omegaconf import OmegaConf

    plain = OmegaConf.to_container(cfg, resolve=True)
    if not isinstance(plain, dict):  # pragma: no cover - Hydra always gives a mapping
        raise ConfigError(f"the prepare config must be a mapping, got {type(plain).__name__}")
    paths = plain.get("paths") or {}
    return build_caches(
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
