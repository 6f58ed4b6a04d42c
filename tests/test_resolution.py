"""infer/select read each slide at the µm/px the checkpoint was trained at, or refuse.

The slide: 1024 x 768 px, levels 0.243 / 0.486 / 0.972 µm/px (and one without mpp)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lymphnode.core.errors import SlideError
from lymphnode.inference.resolution import for_slide, read_level
from lymphnode.models.preprocess import Preprocess
from lymphnode.tasks.multitask import MultiTaskModule
from lymphnode.wsi.pyramid import write_pyramid
from lymphnode.wsi.slide import open_slide


def _slide(path: Path, mpp: float | None) -> Path:
    img = np.full((768, 1024, 3), 245, np.uint8)
    img[128:512, 256:768] = (180, 90, 170)
    write_pyramid(path, img, mpp=mpp, tile_size=128, min_size=128)
    return path


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("slides")
    return {"known": _slide(root / "tumor_001.tif", 0.243), "bare": _slide(root / "b.tif", None)}


def test_the_level_within_ten_percent_is_read_and_others_refused(slides: dict[str, Path]) -> None:
    with open_slide(slides["known"]) as slide:
        assert slide.level_count >= 3
        assert read_level(Preprocess(level=2, patch_size=8), slide) == 2  # no mpp: its level
        assert read_level(Preprocess(level=0, patch_size=8, mpp=0.486), slide) == 1
        assert read_level(Preprocess(level=0, patch_size=8, mpp=0.52), slide) == 1  # 7 % off
        assert for_slide(Preprocess(level=0, patch_size=8, mpp=0.95), slide).level == 2
        with pytest.raises(SlideError, match=r"trained at 0\.7 µm/px .*level 1: 0\.486"):
            read_level(Preprocess(level=0, patch_size=8, mpp=0.7), slide)
    with open_slide(slides["bare"]) as slide:
        with pytest.raises(SlideError, match=r"records no µm/px .*0\.243 µm/px.*slide_mpp="):
            read_level(Preprocess(level=0, patch_size=8, mpp=0.243), slide)
        slide.mpp = 0.243  # what slide_mpp= does
        assert read_level(Preprocess(level=1, patch_size=8, mpp=0.243), slide) == 0


def _checkpoint(path: Path, mpp: float) -> Path:
    net = {"_target_": "lymphnode.models.UNet", "base_width": 4, "depth": 2, "top_skip": True}
    module = MultiTaskModule(net=net, preprocess=Preprocess(level=0, patch_size=32, mpp=mpp))
    ckpt = {"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    torch.save(ckpt, path)
    return path


def _run(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args, "num_workers=0", "progress=false"],
        capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "offline"}, timeout=300,
    )  # fmt: skip


def test_infer_and_select_refuse_a_slide_far_from_the_checkpoints_resolution(
    slides: dict[str, Path], tmp_path: Path
) -> None:
    far = _checkpoint(tmp_path / "far.ckpt", 7.776)  # a level-5 CAMELYON16 network
    infer = _run("lymphnode.infer", f"checkpoint={far}", f"slides=[{slides['known']}]",
                 f"out_dir={tmp_path / 'out'}")  # fmt: skip
    assert infer.returncode == 1
    said = infer.stdout + infer.stderr
    assert "trained at 7.776 µm/px" in said and "level 0: 0.243" in said, said
    assert not (tmp_path / "out" / "tumor_001.heatmap.tif").exists()
    select = _run("lymphnode.select", f"checkpoint={far}", f"slides=[{slides['known']}]",
                  f"out_dir={tmp_path / 'sel'}", "k=1")  # fmt: skip
    assert select.returncode == 1
    said = select.stdout + select.stderr
    errors = [line for line in said.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "trained at 7.776 µm/px" in errors[0], said
    near = _checkpoint(tmp_path / "near.ckpt", 0.486)
    ok = _run("lymphnode.infer", f"checkpoint={near}", f"slides=[{slides['bare']}]",
              f"out_dir={tmp_path / 'ok'}", "slide_mpp=0.243")  # fmt: skip
    assert ok.returncode == 0, ok.stderr
