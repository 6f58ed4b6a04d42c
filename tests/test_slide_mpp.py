"""One key, ``slide_mpp=``, for a slide's level-0 µm/px in prepare, evaluate and export (infer
records it in its heatmaps); ``mpp=`` of evaluate/export is a deprecated alias; every "no µm/px"
error names ``slide_mpp=`` (prepare's used to say ``open_slide(path, mpp=...)``, a Python API).

The slide is the real CAMELYON16 tumor_001 level-5 page, which records no mpp (7.776 µm/px)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lymphnode.core.errors import ConfigError
from lymphnode.inference.heatmap import Heatmap, heatmap_path, write_heatmap
from lymphnode.wsi.slide import slide_mpp_setting

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PAGE = "slides/camelyon16_tumor_001_level5.tif"
PAGE_SIZE = (3072, 7168)


def _run(*cmd: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", *cmd], cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, timeout=300,
    )  # fmt: skip


def _one_error(result: subprocess.CompletedProcess, pattern: str) -> None:
    assert result.returncode == 1, result.stdout
    errors = [line for line in result.stdout.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.search(pattern, errors[0]), result.stdout


def test_the_setting_takes_the_old_name_as_an_alias_and_refuses_a_conflict() -> None:
    assert slide_mpp_setting(None) is None
    assert slide_mpp_setting(0.243) == 0.243
    assert slide_mpp_setting(None, 0.243) == 0.243  # deprecated mpp=
    assert slide_mpp_setting(0.243, 0.243) == 0.243
    with pytest.raises(ConfigError, match=r"slide_mpp=0.243 and mpp=0.5 disagree"):
        slide_mpp_setting(0.243, 0.5)
    with pytest.raises(ConfigError, match=r"slide_mpp must be a finite number > 0"):
        slide_mpp_setting(0)


@pytest.fixture()
def page(real_fixtures: Path, tmp_path: Path) -> dict[str, Path]:
    """The page as slides/tumor_001.tif and a heatmap of it that records no mpp."""
    slides = tmp_path / "slides"
    slides.mkdir()
    (slides / "tumor_001.tif").symlink_to(real_fixtures / PAGE)
    heat = tmp_path / "heatmaps"
    heat.mkdir()
    probs = np.zeros((PAGE_SIZE[1] // 32, PAGE_SIZE[0] // 32), np.float32)
    probs[40:50, 40:50] = 0.9
    write_heatmap(
        heatmap_path(heat, "tumor_001"), Heatmap("tumor_001", probs, 32.0, PAGE_SIZE, None)
    )
    annotations = tmp_path / "annotations"
    annotations.mkdir()
    (annotations / "tumor_001.xml").symlink_to(real_fixtures / "annotations" / "tumor_001.xml")
    return {"root": tmp_path, "slides": slides, "heatmaps": heat, "annotations": annotations}


def test_prepare_without_the_slides_mpp_names_the_cli_key(page: dict[str, Path]) -> None:
    args = ["lymphnode.prepare", f"paths.root={page['root']}", "caches=[unlabeled]",
            "split.test_slides=[]", "patch_size=16", "counts.unlabeled=2", "codec=raw",
            "workers=0", "annotations_downsample=32"]  # fmt: skip
    refused = _run(*args, "mpp=7.776")
    _one_error(refused, r"tumor_001\.tif has no mpp .*slide_mpp=<µm/px>")
    assert "open_slide(" not in refused.stdout
    assert _run(*args, "mpp=7.776", "slide_mpp=7.776", "force=true").returncode == 0


def test_evaluate_and_export_take_slide_mpp(page: dict[str, Path]) -> None:
    common = [f"heatmaps={page['heatmaps']}", f"out_dir={page['root'] / 'out'}"]
    evaluate = ["lymphnode.evaluate", *common, f"annotations={page['annotations']}",
                "annotations_downsample=32"]  # fmt: skip
    _one_error(_run(*evaluate), r"has no µm/px .*pass slide_mpp=<level-0 µm/px>")
    ok = _run(*evaluate, "slide_mpp=7.776")
    assert ok.returncode == 0, ok.stdout
    assert "over 1 slides" in ok.stdout
    export = ["lymphnode.export", *common, f"slides={page['slides']}"]
    _one_error(_run(*export), r"record no µm/px; pass slide_mpp=<level-0 µm/px>")
    ok = _run(*export, "slide_mpp=7.776")
    assert ok.returncode == 0, ok.stdout
    old = _run(*export, "mpp=7.776")  # the old name still works, with a warning
    assert old.returncode == 0 and "mpp= is deprecated" in old.stdout, old.stdout
