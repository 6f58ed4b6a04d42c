"""Tests of lymphnode.wsi.pyramid: pyramidal TIFFs that OpenSlide opens as generic-tiff."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import openslide
import pytest

from lymphnode.core.errors import ConfigError
from lymphnode.wsi import pyramid
from lymphnode.wsi.pyramid import halve, pyramid_shapes, write_pyramid


def _smooth_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth colour image (JPEG-friendly) with values well inside 0..255."""
    rng = np.random.default_rng(seed)
    low = rng.uniform(60, 200, size=(height // 32 + 2, width // 32 + 2, 3)).astype(np.float32)
    return (
        cv2.resize(low, (width, height), interpolation=cv2.INTER_CUBIC)
        .clip(0, 255)
        .astype(np.uint8)
    )


def _read(slide: openslide.OpenSlide, level: int) -> np.ndarray:
    w, h = slide.level_dimensions[level]
    return np.asarray(slide.read_region((0, 0), level, (w, h)))


def test_rgb_pyramid_opens_as_generic_tiff_with_mpp_and_halving_levels(tmp_path: Path) -> None:
    image = _smooth_rgb(1100, 1500)
    path = tmp_path / "slide.tif"
    write_pyramid(path, image, mpp=0.243, description="synthetic test slide")
    with openslide.OpenSlide(path) as slide:
        assert slide.properties["openslide.vendor"] == "generic-tiff"
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.243, rel=1e-6)
        assert float(slide.properties["openslide.mpp-y"]) == pytest.approx(0.243, rel=1e-6)
        assert slide.level_dimensions == ((1500, 1100), (750, 550), (375, 275), (188, 138))
        assert slide.level_downsamples[:3] == pytest.approx((1.0, 2.0, 4.0))
        assert slide.level_downsamples[3] == pytest.approx(8.0, rel=0.01)
        assert slide.properties["tiff.ImageDescription"] == "synthetic test slide"
        level0 = _read(slide, 0)
        level2 = _read(slide, 2)
    assert level0.shape == (1100, 1500, 4)
    assert np.abs(level0[..., :3].astype(int) - image).mean() < 2.0  # JPEG q90: close, not exact
    expected2 = halve(halve(image))
    assert np.abs(level2[..., :3].astype(int) - expected2).mean() < 4.0  # smaller level: busier


def test_levels_halve_until_both_sides_are_below_min_size() -> None:
    assert pyramid_shapes(2048, 2048, 256) == [
        (2048, 2048),
        (1024, 1024),
        (512, 512),
        (256, 256),
        (128, 128),
    ]
    assert pyramid_shapes(300, 100, 256) == [(300, 100), (150, 50)]
    assert pyramid_shapes(100, 100, 256) == [(100, 100)]


def test_mask_pyramid_is_lossless_and_keeps_single_pixel_lesions(tmp_path: Path) -> None:
    mask = np.zeros((1001, 777), np.uint8)
    mask[500, 301] = 255  # one-pixel lesion: an area mean would shrink it to 64 then to 16
    mask[10:200, 20:300] = 255
    path = tmp_path / "mask.tif"
    write_pyramid(path, mask, mpp=0.243, mask=True)
    with openslide.OpenSlide(path) as slide:
        assert slide.properties["openslide.vendor"] == "generic-tiff"
        assert slide.level_count == 3
        level0 = _read(slide, 0)
        assert np.array_equal(level0[..., 0], mask)  # grayscale → R = G = B = value
        assert np.array_equal(level0[..., 1], mask)
        for level in (1, 2):
            pixels = _read(slide, level)[..., 0]
            ds = 2**level
            assert pixels[500 // ds, 301 // ds] == 255
            assert set(np.unique(pixels)) == {0, 255}


def test_grayscale_image_pyramid_opens(tmp_path: Path) -> None:
    gray = _smooth_rgb(600, 600)[..., 0]
    path = tmp_path / "gray.tif"
    write_pyramid(path, gray, mpp=None, compression="deflate")
    with openslide.OpenSlide(path) as slide:
        assert slide.level_count == 3
        assert "openslide.mpp-x" not in slide.properties
        assert np.array_equal(_read(slide, 0)[..., 2], gray)


def test_memmap_input_is_accepted(tmp_path: Path) -> None:
    image = _smooth_rgb(512, 512)
    mm = np.lib.format.open_memmap(
        tmp_path / "image.npy", mode="w+", dtype=np.uint8, shape=image.shape
    )
    mm[:] = image
    write_pyramid(tmp_path / "mm.tif", mm, mpp=0.5, compression="none")
    with openslide.OpenSlide(tmp_path / "mm.tif") as slide:
        assert np.array_equal(_read(slide, 0)[..., :3], image)
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.5)


def test_halve_takes_mean_for_images_and_max_for_masks() -> None:
    block = np.array([[0, 255], [0, 0]], np.uint8)
    assert halve(block, mask=True).tolist() == [[255]]
    assert halve(block).tolist() == [[64]]  # INTER_AREA: 255 / 4 rounded
    odd = np.arange(15, dtype=np.uint8).reshape(3, 5)
    assert halve(odd, mask=True).shape == (2, 3)
    assert halve(np.dstack([odd] * 3)).shape == (2, 3, 3)


def test_existing_file_is_replaced_atomically(tmp_path: Path) -> None:
    path = tmp_path / "slide.tif"
    write_pyramid(path, _smooth_rgb(300, 300, seed=1), mpp=0.243)
    write_pyramid(path, _smooth_rgb(400, 300, seed=2), mpp=0.243)
    with openslide.OpenSlide(path) as slide:
        assert slide.dimensions == (300, 400)
    assert [p.name for p in tmp_path.iterdir()] == ["slide.tif"]


def test_failed_write_leaves_neither_temp_file_nor_output(tmp_path: Path, monkeypatch) -> None:
    def broken_halve(image: np.ndarray, *, mask: bool = False) -> np.ndarray:
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(pyramid, "halve", broken_halve)
    path = tmp_path / "slide.tif"
    with pytest.raises(OSError, match="disk full"):
        write_pyramid(path, _smooth_rgb(600, 600), mpp=0.243)
    assert list(tmp_path.iterdir()) == []


def test_failed_rewrite_keeps_the_old_file(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "slide.tif"
    write_pyramid(path, _smooth_rgb(600, 600), mpp=0.243)
    before = path.read_bytes()
    monkeypatch.setattr(pyramid, "halve", lambda image, mask=False: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        write_pyramid(path, _smooth_rgb(600, 600, seed=3), mpp=0.243)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["slide.tif"]


@pytest.mark.parametrize(
    ("image", "kwargs", "match"),
    [
        (np.zeros((64, 64, 3), np.float32), {}, "uint8 numpy array, got float32"),
        (np.zeros((64, 64, 4), np.uint8), {}, r"shape \(H, W\) or \(H, W, 3\), got \(64, 64, 4\)"),
        (np.zeros((0, 64), np.uint8), {}, "empty"),
        (
            np.zeros((64, 64), np.uint8),
            {"mpp": -1.0},
            "mpp must be a positive number or None, got -1.0",
        ),
        (
            np.zeros((64, 64), np.uint8),
            {"tile_size": 100},
            "tile_size must be a positive multiple of 16, got 100",
        ),
        (
            np.zeros((64, 64), np.uint8),
            {"compression": "webp"},
            r"compression 'webp' is not allowed",
        ),
        (
            np.zeros((64, 64), np.uint8),
            {"compression": "jpeg", "mask": True},
            r"'jpeg' is not allowed for a mask",
        ),
        (np.zeros((64, 64, 3), np.uint8), {"quality": 0}, "quality must be in 1..100, got 0"),
        (np.zeros((64, 64, 3), np.uint8), {"min_size": 0}, "min_size must be >= 1, got 0"),
    ],
)
def test_bad_arguments_raise_config_error_naming_the_value(
    tmp_path: Path, image: np.ndarray, kwargs: dict, match: str
) -> None:
    kwargs = {"mpp": 0.243, **kwargs}
    with pytest.raises(ConfigError, match=match):
        write_pyramid(tmp_path / "bad.tif", image, **kwargs)
    assert list(tmp_path.iterdir()) == []
