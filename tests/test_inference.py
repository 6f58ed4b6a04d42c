"""Sliding-window pieces: tile grid, stitching onto the heatmap grid, D4 test-time augmentation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lymphnode.core.errors import ConfigError
from lymphnode.inference.grid import tile_grid
from lymphnode.inference.overlay import write_overlay
from lymphnode.inference.predict import _d4, _d4_inverse, tile_probabilities
from lymphnode.inference.settings import resolve_device
from lymphnode.inference.stitch import HeatmapStitcher
from lymphnode.wsi.tissue import TissueMask


def test_tile_grid_covers_the_slide_and_keeps_only_tissue_tiles() -> None:
    corners = tile_grid((1000, 600), tile_level0=256, step_level0=256, tissue=None)
    xs, ys = sorted(set(corners[:, 0])), sorted(set(corners[:, 1]))
    assert xs == [0, 256, 512, 768] and ys == [0, 256, 512]  # the last tiles stick out (padded)
    mask = np.zeros((600 // 8, 1000 // 8), dtype=bool)
    mask[0:10, 0:10] = True  # tissue only in the top-left 80 × 80 level-0 px
    tissue = TissueMask(mask=mask, downsample=8.0)
    kept = tile_grid((1000, 600), 256, 128, tissue)
    assert kept.tolist() == [[0, 0]]


def test_stitcher_averages_overlapping_tiles_on_the_heatmap_grid(tmp_path: Path) -> None:
    st = HeatmapStitcher((4, 6), downsample=32, level_downsample=1.0, patch_size=64,
                         blend="mean", workdir=tmp_path / "w")  # fmt: skip
    st.add(0, 0, np.full((64, 64), 1.0, np.float32))  # heatmap px rows 0-1, cols 0-1
    st.add(32, 0, np.full((64, 64), 0.0, np.float32))  # rows 0-1, cols 1-2: overlaps col 1
    heat = st.result()
    assert heat[0, 0] == pytest.approx(1.0)
    assert heat[0, 1] == pytest.approx(0.5)  # mean of the two tiles
    assert heat[0, 2] == pytest.approx(0.0)
    assert heat[3, 5] == 0.0  # never covered


def test_stitcher_maps_level1_tiles_and_unaligned_corners(tmp_path: Path) -> None:
    # a 16-px tile at level 1 (downsample 2) covers 32 level-0 px starting at x = 40
    st = HeatmapStitcher((2, 4), downsample=16, level_downsample=2.0, patch_size=16,
                         blend="mean", workdir=tmp_path / "w")  # fmt: skip
    probs = np.zeros((16, 16), np.float32)
    probs[:, :4] = 1.0  # level-0 x 40..48 → heatmap col 2 (32..48)
    st.add(40, 0, probs)
    heat = st.result()
    # heatmap col 2 receives tile pixels with centres at x = 41..47 → 4 pixels, all 1.0
    assert heat[0, 2] == pytest.approx(1.0)
    assert heat[0, 3] == pytest.approx(0.0)  # x 48..64: pixels 4..11, all 0
    assert heat[0, 1] == 0.0 and heat[0, 0] == 0.0


def test_stitcher_clips_tiles_that_stick_out_of_the_slide(tmp_path: Path) -> None:
    st = HeatmapStitcher((2, 2), downsample=32, level_downsample=1.0, patch_size=64,
                         blend="hann", workdir=tmp_path / "w")  # fmt: skip
    st.add(32, 32, np.full((64, 64), 0.7, np.float32))
    heat = st.result()
    assert heat[1, 1] == pytest.approx(0.7) and heat[0, 0] == 0.0


def test_unknown_blend_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="blend='max' is not supported"):
        HeatmapStitcher((2, 2), 32, 1.0, 8, "max", tmp_path / "w")


def test_d4_inverse_undoes_each_of_the_eight_transforms() -> None:
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).reshape(2, 3, 5, 5)
    outs = {tuple(_d4(x, k).flatten().tolist()) for k in range(8)}
    assert len(outs) == 8
    for k in range(8):
        assert torch.equal(_d4_inverse(_d4(x, k), k), x)


class _LeftHalf(torch.nn.Module):
    """A 'model' whose tumor logit is +10 on the image's left half, -10 elsewhere (not D4-invariant)."""

    def forward(self, x: torch.Tensor):  # type: ignore[no-untyped-def]
        from lymphnode.models.unet import UNetOutput

        b, _, h, w = x.shape
        seg = torch.full((b, 1, h, w), -10.0)
        seg[..., : w // 2] = 10.0
        return UNetOutput(recon=x, seg=seg)

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self(x).seg)


def test_tta_averages_predictions_in_the_input_frame() -> None:
    x = torch.zeros(1, 3, 4, 4)
    plain = tile_probabilities(_LeftHalf(), x, tta=False, bf16=False, device=torch.device("cpu"))
    assert plain[0, 0, 0] > 0.99 and plain[0, 0, 3] < 0.01
    tta = tile_probabilities(_LeftHalf(), x, tta=True, bf16=False, device=torch.device("cpu"))
    # averaged over the 8 frames, every pixel is tumor in exactly half of them
    assert torch.allclose(tta, torch.full_like(tta, 0.5), atol=1e-3)


def test_bad_device_is_named() -> None:
    with pytest.raises(ConfigError, match="device='gpu0' is not a torch device"):
        resolve_device("gpu0")
    assert resolve_device("cpu").type == "cpu"


def test_overlay_png_keeps_rgb_order_and_leaves_no_temp(tmp_path: Path) -> None:
    from PIL import Image

    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[..., 0] = 200  # red
    rgb[1, 2] = (10, 20, 30)
    path = tmp_path / "s.overlay.png"
    path.write_bytes(b"old")
    write_overlay(path, rgb)
    assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), rgb)
    assert [p.name for p in tmp_path.iterdir()] == ["s.overlay.png"]
