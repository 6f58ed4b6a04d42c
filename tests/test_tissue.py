"""Tests of lymphnode.wsi.tissue: masks of synthetic images and slides, region queries, real slides."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

import lymphnode.wsi.tissue as tissue_module
from lymphnode.core.errors import ConfigError, TissueError
from lymphnode.wsi.annotations import read_asap
from lymphnode.wsi.slide import open_slide
from lymphnode.wsi.tissue import TissueMask, tissue_image, tissue_mask, tissue_mask_from_rgb

PINK = (222, 160, 200)  # eosin-stained stroma at low resolution


def white_image(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Empty slide: near-white with scanner/JPEG-like noise (±4 per channel)."""
    rng = np.random.default_rng(seed)
    return (246 + rng.integers(-4, 5, (height, width, 3))).astype(np.uint8)


def blob_image(width: int, height: int, center: tuple[int, int], radius: int) -> np.ndarray:
    """A pink disk of ``radius`` px at ``center`` (x, y) on a noisy white background."""
    image = white_image(width, height)
    cv2.circle(image, center, radius, PINK, thickness=-1)
    return image


def write_slide(path: Path, image: np.ndarray, levels: int = 1, tile: int = 128) -> Path:
    """Tiled (lossless) TIFF pyramid: level 0 then halved pages with subfiletype=1."""
    with tifffile.TiffWriter(path) as tif:
        level = image
        for index in range(levels):
            tif.write(
                level,
                tile=(tile, tile),
                compression="zlib",
                photometric="rgb",
                subfiletype=1 if index else 0,
                metadata=None,
            )
            level = cv2.resize(
                level, (level.shape[1] // 2, level.shape[0] // 2), interpolation=cv2.INTER_AREA
            )
    return path


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


# -- TissueMask region queries --------------------------------------------------------------------


@pytest.fixture()
def hand_mask() -> TissueMask:
    mask = np.zeros((4, 6), bool)
    mask[1, 1] = True
    mask[2:4, 3:6] = True
    return TissueMask(mask=mask, downsample=10.0)


def test_fraction_of_whole_pixels(hand_mask: TissueMask) -> None:
    assert hand_mask.fraction(10, 10, 10, 10) == pytest.approx(1.0)
    assert hand_mask.fraction(0, 0, 10, 10) == pytest.approx(0.0)
    assert hand_mask.fraction(0, 0, 60, 40) == pytest.approx(7 / 24)
    assert hand_mask.fraction(30, 20, 30, 20) == pytest.approx(1.0)


def test_fraction_counts_partial_pixels_by_overlap(hand_mask: TissueMask) -> None:
    assert hand_mask.fraction(15, 10, 10, 10) == pytest.approx(0.5)  # half of pixel (1, 1)
    assert hand_mask.fraction(5, 5, 10, 10) == pytest.approx(0.25)  # a quarter of it
    assert hand_mask.fraction(15, 15, 5, 5) == pytest.approx(1.0)  # inside it


def test_fraction_counts_outside_the_mask_as_no_tissue(hand_mask: TissueMask) -> None:
    assert hand_mask.fraction(50, 30, 20, 20) == pytest.approx(0.25)  # one mask px of four
    assert hand_mask.fraction(100, 100, 10, 10) == 0.0
    assert hand_mask.fraction(-50, -50, 10, 10) == 0.0


def test_fraction_matches_brute_force_on_random_regions() -> None:
    rng = np.random.default_rng(0)
    mask = rng.random((20, 30)) > 0.6
    ds = 8
    tissue = TissueMask(mask=mask, downsample=ds)
    level0 = np.repeat(np.repeat(mask, ds, axis=0), ds, axis=1)  # (160, 240)
    for _ in range(200):
        x, y = rng.integers(-40, 260), rng.integers(-40, 180)
        w, h = rng.integers(1, 90, size=2)
        padded = np.zeros((160 + 400, 240 + 400), bool)
        padded[200:360, 200:440] = level0
        want = padded[y + 200 : y + 200 + h, x + 200 : x + 200 + w].mean()
        assert tissue.fraction(x, y, w, h) == pytest.approx(want, abs=1e-9)
        assert tissue.any(x, y, w, h) == bool(want > 0)


def test_any_ignores_regions_that_only_touch_a_pixel_border(hand_mask: TissueMask) -> None:
    assert hand_mask.any(10, 10, 1, 1)
    assert hand_mask.any(0, 0, 11, 11)
    assert not hand_mask.any(0, 0, 10, 10)  # ends where pixel (1, 1) begins
    assert not hand_mask.any(20, 10, 10, 10)  # starts where it ends
    assert not hand_mask.any(1000, 0, 10, 10)


def test_region_size_must_be_positive(hand_mask: TissueMask) -> None:
    with pytest.raises(ConfigError, match=r"region size must be positive, got w=0, h=10"):
        hand_mask.fraction(0, 0, 0, 10)
    with pytest.raises(ConfigError, match=r"region size must be positive, got w=5, h=-1"):
        hand_mask.any(0, 0, 5, -1)


def test_tissue_mask_validates_its_fields() -> None:
    with pytest.raises(ConfigError, match=r"mask must be a non-empty 2-D array, got \(3,\)"):
        TissueMask(mask=np.ones(3, bool), downsample=1.0)
    with pytest.raises(ConfigError, match=r"downsample must be a positive number, got 0"):
        TissueMask(mask=np.ones((3, 3), bool), downsample=0)
    assert TissueMask(mask=np.ones((2, 2), np.uint8), downsample=2).mask.dtype == bool


# -- tissue_mask_from_rgb ------------------------------------------------------------------------


def test_pink_blob_on_white_is_the_mask() -> None:
    image = blob_image(200, 150, center=(120, 70), radius=40)
    want = np.zeros((150, 200), np.uint8)
    cv2.circle(want, (120, 70), 40, 1, thickness=-1)
    mask = tissue_mask_from_rgb(image)
    assert mask.dtype == bool and mask.shape == (150, 200)
    assert iou(mask, want.astype(bool)) > 0.95


def test_white_noise_and_black_are_not_tissue() -> None:
    assert not tissue_mask_from_rgb(white_image(100, 80)).any()
    image = white_image(100, 80)
    rng = np.random.default_rng(1)
    image[20:60, 20:60] = rng.integers(0, 25, (40, 40, 3))  # black pen: dark, noisy hue
    assert not tissue_mask_from_rgb(image).any()


def test_grey_glass_is_not_tissue() -> None:
    image = blob_image(200, 150, center=(60, 70), radius=40)
    image[:, 120:] = 190  # glass / coverslip edge: grey, unsaturated
    mask = tissue_mask_from_rgb(image)
    assert mask[:, :110].any()
    assert not mask[:, 120:].any()


def test_small_objects_are_removed() -> None:
    image = blob_image(200, 150, center=(60, 70), radius=30)
    image[10:14, 180:184] = PINK  # 16 px speck
    mask = tissue_mask_from_rgb(image, min_object_px=64)
    assert mask[70, 60] and not mask[10:14, 180:184].any()
    assert tissue_mask_from_rgb(image, min_object_px=0, opening_radius=0)[10:14, 180:184].all()


@pytest.mark.parametrize(
    ("image", "match"),
    [
        (np.zeros((10, 10, 3), np.float32), r"rgb must be a uint8 numpy array, got float32"),
        (np.zeros((10, 10), np.uint8), r"rgb must have shape \(H, W, 3\), got \(10, 10\)"),
        (np.zeros((0, 10, 3), np.uint8), r"rgb must have shape \(H, W, 3\), got \(0, 10, 3\)"),
    ],
)
def test_bad_images_are_rejected(image: np.ndarray, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        tissue_mask_from_rgb(image)


def test_bad_options_are_rejected() -> None:
    with pytest.raises(ConfigError, match=r"min_saturation must be 0\.\.255, got 300"):
        tissue_mask_from_rgb(white_image(10, 10), min_saturation=300)
    with pytest.raises(ConfigError, match=r"closing_radius must be >= 0, got -1"):
        tissue_mask_from_rgb(white_image(10, 10), closing_radius=-1)


# -- tissue_mask on slides ------------------------------------------------------------------------


def test_slide_mask_finds_the_blob_at_the_requested_downsample(tmp_path: Path) -> None:
    image = blob_image(1024, 768, center=(640, 384), radius=200)
    path = write_slide(tmp_path / "blob.tif", image, levels=6)  # downsamples 1..32
    with open_slide(path) as slide:
        tissue = tissue_mask(slide, downsample=32, min_mask_side=16)
    assert tissue.downsample == pytest.approx(32.0)
    assert tissue.mask.shape == (24, 32)
    assert tissue.fraction(540, 284, 200, 200) == pytest.approx(1.0)  # inside the disk
    assert tissue.fraction(0, 0, 300, 300) == 0.0  # white corner
    assert tissue.fraction(0, 0, 1024, 768) == pytest.approx(np.pi * 200**2 / (1024 * 768), rel=0.1)


def test_finer_level_is_downsized_to_the_target(tmp_path: Path) -> None:
    image = blob_image(1024, 768, center=(640, 384), radius=200)
    path = write_slide(tmp_path / "blob.tif", image, levels=3)  # downsamples 1, 2, 4
    with open_slide(path) as slide:
        tissue = tissue_mask(slide, downsample=16, min_mask_side=16)
    assert tissue.downsample == pytest.approx(16.0)
    assert tissue.mask.shape == (48, 64)
    assert tissue.any(640, 384, 1, 1) and not tissue.any(0, 0, 200, 200)


def test_small_slide_gets_a_finer_mask(tmp_path: Path) -> None:
    image = blob_image(512, 384, center=(256, 192), radius=100)
    with open_slide(write_slide(tmp_path / "small.tif", image)) as slide:
        tissue = tissue_mask(slide, downsample=32, min_mask_side=128)
    assert tissue.downsample == pytest.approx(4.0)
    assert tissue.mask.shape == (96, 128)


def test_downsized_image_read_in_strips_matches_one_resize(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = blob_image(1000, 700, center=(500, 350), radius=250)
    with open_slide(write_slide(tmp_path / "strips.tif", image)) as slide:
        whole, ds = tissue_image(slide, downsample=10, min_mask_side=1)
        monkeypatch.setattr(tissue_module, "_STRIP_PIXELS", 1000 * 10 * 7)  # 7 output rows a strip
        strips, ds_strips = tissue_image(slide, downsample=10, min_mask_side=1)
    assert ds == ds_strips == pytest.approx(10.0)
    assert whole.shape == strips.shape == (70, 100, 3)
    np.testing.assert_array_equal(whole, cv2.resize(image, (100, 70), interpolation=cv2.INTER_AREA))
    assert np.abs(whole.astype(int) - strips).max() <= 1


def test_min_object_size_is_in_square_microns_when_mpp_is_known(tmp_path: Path) -> None:
    image = white_image(1024, 1024)
    cv2.rectangle(image, (100, 100), (499, 499), PINK, thickness=-1)  # 400² µm² at 1 µm/px
    cv2.rectangle(image, (800, 800), (839, 839), PINK, thickness=-1)  # 40² = 1600 µm²
    path = write_slide(tmp_path / "objects.tif", image)
    with open_slide(path, mpp=1.0) as slide:
        big_only = tissue_mask(slide, min_mask_side=128, min_object_um2=10_000)
        both = tissue_mask(slide, min_mask_side=128, min_object_um2=1_000)
    assert big_only.downsample == pytest.approx(8.0)
    assert big_only.any(200, 200, 10, 10) and not big_only.any(800, 800, 40, 40)
    assert both.fraction(800, 800, 40, 40) > 0.5


def test_blank_slide_raises_no_tissue(tmp_path: Path) -> None:
    path = write_slide(tmp_path / "blank.tif", white_image(512, 512), levels=2)
    with open_slide(path) as slide:
        with pytest.raises(TissueError, match=r"no tissue found in slide .*blank\.tif"):
            tissue_mask(slide)
        empty = tissue_mask(slide, require=False)
    assert not empty.mask.any()
    assert empty.fraction(0, 0, 512, 512) == 0.0


def test_bad_slide_parameters_are_rejected(tmp_path: Path) -> None:
    path = write_slide(tmp_path / "p.tif", white_image(64, 64))
    with open_slide(path) as slide:
        with pytest.raises(ConfigError, match=r"p\.tif: downsample must be a finite number > 0"):
            tissue_mask(slide, downsample=0)
        with pytest.raises(
            ConfigError, match=r"p\.tif: min_mask_side must be an integer >= 1, got 0"
        ):
            tissue_mask(slide, min_mask_side=0)
        with pytest.raises(ConfigError, match=r"p\.tif: min_object_um2 must be >= 0, got -1"):
            tissue_mask(slide, min_object_um2=-1)


# -- real slides ----------------------------------------------------------------------------------

REAL_SLIDES = {
    "camelyon16_tumor_001_level5.tif": (0.03, 0.15),  # lymph node in a large fat/glass field
    "cmu_small_region.svs": (0.2, 0.5),
    "tcga_cr_7395_ts1_j2k.svs": (0.45, 0.8),  # the section fills most of the field
}


@pytest.fixture(scope="module")
def real_masks(real_fixtures: Path) -> dict[str, tuple[TissueMask, tuple[int, int]]]:
    """Tissue mask and level-0 size of every real slide (computed once: the reads dominate)."""
    masks = {}
    for name in REAL_SLIDES:
        with open_slide(real_fixtures / "slides" / name) as slide:
            masks[name] = (tissue_mask(slide), slide.dimensions)
    return masks


@pytest.mark.parametrize("name", sorted(REAL_SLIDES))
def test_tissue_found_on_real_slides(real_masks: dict, name: str) -> None:
    tissue, (width, height) = real_masks[name]
    low, high = REAL_SLIDES[name]
    assert max(tissue.mask.shape) >= 1024
    assert low < tissue.fraction(0, 0, width, height) < high


def test_camelyon_background_is_rejected_and_metastases_are_tissue(
    real_fixtures: Path, real_masks: dict
) -> None:
    tissue, _ = real_masks["camelyon16_tumor_001_level5.tif"]
    assert tissue.fraction(0, 0, 3072, 1000) < 0.005  # top: glass, label edge and marker crosses
    assert tissue.fraction(0, 5800, 3072, 1368) < 0.005  # bottom: empty glass
    assert tissue.fraction(1000, 1200, 1000, 500) < 0.005  # empty (white) slide area
    lesions = read_asap(real_fixtures / "annotations" / "tumor_001.xml").tumor
    for polygon in lesions:  # level-0 px of the real slide; the fixture is its level 5
        x0, y0 = polygon.min(axis=0) / 32
        x1, y1 = polygon.max(axis=0) / 32
        assert tissue.fraction(x0, y0, x1 - x0, y1 - y0) > 0.8
