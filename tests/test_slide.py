"""Tests of lymphnode.wsi.slide: tiny pyramidal TIFFs written here, plus the real fixtures."""

from __future__ import annotations

import multiprocessing
import os
import pickle
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile

import lymphnode.wsi.slide as slide_module
from lymphnode.core.errors import LymphnodeError, SlideError
from lymphnode.wsi.slide import Slide, open_handle_count, open_slide

MPP = 0.243
W, H = 640, 400  # level-0 size of the synthetic slides (px)


def gradient_image(width: int = W, height: int = H) -> np.ndarray:
    """(H, W, 3) uint8 with every pixel's colour a function of its position (smooth: JPEG-safe)."""
    yy, xx = np.mgrid[0:height, 0:width]
    return np.dstack(
        [xx * 255 // (width - 1), yy * 255 // (height - 1), np.full_like(xx, 128)]
    ).astype(np.uint8)


def write_tiff(
    path: Path,
    image: np.ndarray,
    *,
    levels: int = 3,
    compression: str | None = "jpeg",
    mpp: float | None = MPP,
    tile: int = 128,
    extrasamples: list[str] | None = None,
) -> Path:
    """A pyramidal tiled TIFF: level 0 then halved pages with subfiletype=1 (generic-tiff)."""
    options: dict = {
        "tile": (tile, tile),
        "compression": compression,
        "photometric": "rgb",
        "metadata": None,
    }
    if mpp is not None:
        options["resolution"] = (1e4 / mpp, 1e4 / mpp)
        options["resolutionunit"] = "CENTIMETER"
    if extrasamples is not None:
        options["extrasamples"] = extrasamples
    with tifffile.TiffWriter(path) as tif:
        level = image
        for index in range(levels):
            tif.write(level, subfiletype=1 if index else 0, **options)
            level = level[::2, ::2]
    return path


@pytest.fixture()
def tiff_path(tmp_path: Path) -> Path:
    return write_tiff(tmp_path / "slide.tif", gradient_image())


@pytest.fixture()
def lossless_path(tmp_path: Path) -> Path:
    return write_tiff(tmp_path / "lossless.tif", gradient_image(), compression="zlib")


# -- opening and metadata -------------------------------------------------------------------------


def test_synthetic_pyramid_opens_as_generic_tiff_with_levels_and_mpp(tiff_path: Path) -> None:
    assert openslide.OpenSlide.detect_format(str(tiff_path)) == "generic-tiff"
    with open_slide(tiff_path) as slide:
        assert slide.vendor == "generic-tiff"
        assert slide.dimensions == (W, H)
        assert slide.level_count == 3
        assert slide.level_dimensions == ((640, 400), (320, 200), (160, 100))
        assert slide.level_downsamples == pytest.approx((1.0, 2.0, 4.0))
        assert slide.mpp == pytest.approx(MPP)
        assert slide.properties["openslide.vendor"] == "generic-tiff"


def test_properties_are_read_only(tiff_path: Path) -> None:
    slide = open_slide(tiff_path)
    with pytest.raises(TypeError):
        slide.properties["openslide.mpp-x"] = "1"  # type: ignore[index]


def test_mpp_argument_overrides_the_file(tiff_path: Path) -> None:
    assert open_slide(tiff_path, mpp=0.5).mpp == 0.5


def test_slide_without_resolution_has_no_mpp(tmp_path: Path) -> None:
    path = write_tiff(tmp_path / "nompp.tif", gradient_image(), mpp=None)
    assert open_slide(path).mpp is None


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), "abc"])
def test_bad_mpp_override_is_rejected(tiff_path: Path, bad: object) -> None:
    with pytest.raises(SlideError, match=r"slide\.tif: mpp must be a"):
        open_slide(tiff_path, mpp=bad)  # type: ignore[arg-type]


def test_repr_names_path_size_levels_and_mpp(tiff_path: Path) -> None:
    text = repr(open_slide(tiff_path))
    assert str(tiff_path) in text
    assert "640x400" in text
    assert "levels=3" in text
    assert "mpp=0.243" in text


def test_slide_error_is_a_lymphnode_error() -> None:
    assert issubclass(SlideError, LymphnodeError)


# -- levels -------------------------------------------------------------------------------------


def test_best_level_is_the_largest_downsample_not_above_the_request(tiff_path: Path) -> None:
    slide = open_slide(tiff_path)
    assert slide.best_level(0.5) == 0
    assert slide.best_level(1.0) == 0
    assert slide.best_level(1.9) == 0
    assert slide.best_level(2.0) == 1
    assert slide.best_level(3.9) == 1
    assert slide.best_level(4.0) == 2
    assert slide.best_level(1000.0) == 2


@pytest.mark.parametrize("bad", [0, -2.0, float("inf")])
def test_best_level_rejects_non_positive_downsample(tiff_path: Path, bad: float) -> None:
    with pytest.raises(SlideError, match=r"slide\.tif: downsample must be"):
        open_slide(tiff_path).best_level(bad)


def test_level_for_mpp_picks_the_nearest_level(tiff_path: Path) -> None:
    slide = open_slide(tiff_path)
    assert slide.level_for_mpp(0.243) == 0
    assert slide.level_for_mpp(0.5) == 1  # 0.486, 3 % off
    assert slide.level_for_mpp(0.972) == 2
    assert slide.level_mpps() == pytest.approx((0.243, 0.486, 0.972))


def test_level_for_mpp_error_lists_the_available_mpps(tiff_path: Path) -> None:
    slide = open_slide(tiff_path)
    with pytest.raises(
        SlideError, match=r"no level at 0\.7 µm/px.*level 0: 0\.243.*level 2: 0\.972"
    ):
        slide.level_for_mpp(0.7)
    with pytest.raises(SlideError, match=r"no level at 0\.5 µm/px \(tolerance 1%\)"):
        slide.level_for_mpp(0.5, tolerance=0.01)


def test_level_for_mpp_without_mpp_says_how_to_pass_one(tmp_path: Path) -> None:
    path = write_tiff(tmp_path / "nompp.tif", gradient_image(), mpp=None)
    with pytest.raises(SlideError, match=r"nompp\.tif has no mpp.*slide_mpp=<µm/px>"):
        open_slide(path).level_for_mpp(0.5)
    assert open_slide(path, mpp=0.25).level_for_mpp(0.5) == 1


@pytest.mark.parametrize(("mpp", "tolerance"), [(0, 0.1), (-1, 0.1), (0.5, -0.1)])
def test_level_for_mpp_rejects_bad_arguments(tiff_path: Path, mpp: float, tolerance: float) -> None:
    with pytest.raises(SlideError, match=r"slide\.tif: (mpp|tolerance) must be"):
        open_slide(tiff_path).level_for_mpp(mpp, tolerance)


# -- reading ------------------------------------------------------------------------------------


def test_read_returns_rgb_uint8_matching_the_image(lossless_path: Path) -> None:
    image = gradient_image()
    slide = open_slide(lossless_path)
    region = slide.read(100, 50, 64, 32)
    assert region.shape == (32, 64, 3)
    assert region.dtype == np.uint8
    assert region.flags.c_contiguous
    np.testing.assert_array_equal(region, image[50:82, 100:164])


def test_read_at_a_level_takes_level0_origin_and_level_size(lossless_path: Path) -> None:
    level1 = gradient_image()[::2, ::2]
    region = open_slide(lossless_path).read(200, 100, 40, 30, level=1)
    assert region.shape == (30, 40, 3)
    np.testing.assert_array_equal(region, level1[50:80, 100:140])


def test_jpeg_read_is_close_to_the_image(tiff_path: Path) -> None:
    region = open_slide(tiff_path).read(0, 0, W, H).astype(int)
    assert np.abs(region - gradient_image()).mean() < 2


def test_read_level_returns_the_whole_level(lossless_path: Path) -> None:
    slide = open_slide(lossless_path)
    np.testing.assert_array_equal(slide.read_level(2), gradient_image()[::2, ::2][::2, ::2])
    with pytest.raises(SlideError, match=r"level 0 is 640x400 px, more than max_pixels=1000"):
        slide.read_level(0, max_pixels=1000)


def test_region_partly_outside_is_padded_white(lossless_path: Path) -> None:
    image = gradient_image()
    slide = open_slide(lossless_path)
    region = slide.read(-10, -5, 30, 20)
    assert (region[:5] == 255).all() and (region[:, :10] == 255).all()
    np.testing.assert_array_equal(region[5:, 10:], image[:15, :20])
    corner = slide.read(W - 4, H - 4, 10, 10)
    np.testing.assert_array_equal(corner[:4, :4], image[-4:, -4:])
    assert (corner[4:] == 255).all() and (corner[:, 4:] == 255).all()


@pytest.mark.parametrize(
    ("x", "y", "w", "h", "level"),
    [(W, 0, 10, 10, 0), (0, H, 10, 10, 0), (-10, 0, 10, 10, 0), (0, -40, 10, 10, 2)],
)
def test_region_wholly_outside_is_an_error(
    tiff_path: Path, x: int, y: int, w: int, h: int, level: int
) -> None:
    with pytest.raises(SlideError, match=rf"slide\.tif: region x={x}, y={y}.*wholly outside"):
        open_slide(tiff_path).read(x, y, w, h, level)


@pytest.mark.parametrize(("w", "h"), [(0, 10), (10, 0), (-5, 10)])
def test_empty_or_negative_region_size_is_an_error(tiff_path: Path, w: int, h: int) -> None:
    with pytest.raises(SlideError, match=rf"slide\.tif: region size must be positive, got w={w}"):
        open_slide(tiff_path).read(0, 0, w, h)


@pytest.mark.parametrize("level", [3, -1])
def test_level_out_of_range_is_an_error(tiff_path: Path, level: int) -> None:
    slide = open_slide(tiff_path)
    with pytest.raises(SlideError, match=rf"slide\.tif: level {level} is out of range.*levels 0-2"):
        slide.read(0, 0, 10, 10, level=level)
    with pytest.raises(SlideError, match=rf"level {level} is out of range"):
        slide.read_level(level)


def test_non_integer_coordinates_are_an_error(tiff_path: Path) -> None:
    slide = open_slide(tiff_path)
    with pytest.raises(SlideError, match=r"slide\.tif: x must be an integer.*10\.5"):
        slide.read(10.5, 0, 10, 10)  # type: ignore[arg-type]
    # integral floats and numpy integers are fine
    assert slide.read(np.int64(10), 0.0, 4, 4).shape == (4, 4, 3)  # type: ignore[arg-type]


def test_huge_region_is_refused(tiff_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(slide_module, "MAX_READ_PIXELS", 100)
    with pytest.raises(SlideError, match=r"region 20x20 px at level 0 is larger than 100 px"):
        open_slide(tiff_path).read(0, 0, 20, 20)


def test_transparent_pixels_become_white(tmp_path: Path) -> None:
    rgb = gradient_image(256, 256)
    alpha = np.full((256, 256), 255, np.uint8)
    alpha[:64, :64] = 0  # transparent
    alpha[64:128, :64] = 128  # half transparent
    path = write_tiff(
        tmp_path / "rgba.tif",
        np.dstack([rgb, alpha]),
        levels=1,
        compression="zlib",
        extrasamples=["UNASSALPHA"],
    )
    region = open_slide(path).read(0, 0, 256, 256).astype(int)
    assert (region[:64, :64] == 255).all()
    blended = (rgb[64:128, :64].astype(int) * 128 + 255 * 127) / 255
    assert np.abs(region[64:128, :64] - blended).max() <= 2
    np.testing.assert_array_equal(region[128:], rgb[128:])


def test_public_read_path_gives_the_same_pixels(
    tmp_path: Path, lossless_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    alpha = np.full((128, 128), 255, np.uint8)
    alpha[:32] = 0
    alpha[32:64] = 100
    rgba_path = write_tiff(
        tmp_path / "rgba.tif",
        np.dstack([gradient_image(128, 128), alpha]),
        levels=1,
        compression="zlib",
        extrasamples=["UNASSALPHA"],
    )
    direct = [open_slide(p).read(-8, -8, 100, 90) for p in (lossless_path, rgba_path)]
    monkeypatch.setattr(slide_module, "_DIRECT_READ", False)
    public = [open_slide(p).read(-8, -8, 100, 90) for p in (lossless_path, rgba_path)]
    np.testing.assert_array_equal(direct[0], public[0])
    # un-premultiplying then compositing rounds twice: off by at most 1 on half-transparent pixels
    assert np.abs(direct[1].astype(int) - public[1]).max() <= 1


# -- lifetime, pickling, handles ------------------------------------------------------------------


def test_context_manager_closes_and_reads_after_close_fail(tiff_path: Path) -> None:
    with open_slide(tiff_path) as slide:
        assert slide.read(0, 0, 8, 8).shape == (8, 8, 3)
    assert slide.closed
    assert "closed" in repr(slide)
    with pytest.raises(SlideError, match=r"slide\.tif is closed"):
        slide.read(0, 0, 8, 8)
    with pytest.raises(SlideError, match=r"slide\.tif is closed"), slide:
        pass
    slide.close()  # idempotent


def test_pickled_slide_carries_metadata_only_and_reads(tiff_path: Path) -> None:
    slide = open_slide(tiff_path)
    data = pickle.dumps(slide)
    assert len(data) < 4096
    clone = pickle.loads(data)
    assert isinstance(clone, Slide)
    assert clone.dimensions == slide.dimensions and clone.mpp == slide.mpp
    np.testing.assert_array_equal(clone.read(5, 5, 16, 16), slide.read(5, 5, 16, 16))


def _read_in_worker(args: tuple[Slide, int]) -> tuple[int, np.ndarray]:
    slide, x = args
    return os.getpid(), slide.read(x, 0, 16, 16)


def test_slides_read_in_forked_and_spawned_workers(lossless_path: Path) -> None:
    slide = open_slide(lossless_path)  # its handle sits in this process's LRU before the fork
    expected = [slide.read(x, 0, 16, 16) for x in (0, 100, 200)]
    for method in ("fork", "spawn"):
        with multiprocessing.get_context(method).Pool(2) as pool:
            results = pool.map(_read_in_worker, [(slide, x) for x in (0, 100, 200)])
        assert all(pid != os.getpid() for pid, _ in results)
        for (_, region), want in zip(results, expected, strict=True):
            np.testing.assert_array_equal(region, want)


def test_open_handles_are_bounded_per_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(slide_module, "MAX_OPEN_HANDLES", 3)
    image = gradient_image(64, 64)
    slides = [open_slide(write_tiff(tmp_path / f"s{i}.tif", image, levels=1)) for i in range(6)]
    for slide in slides:
        slide.read(0, 0, 8, 8)
        assert open_handle_count() <= 3
    # an evicted slide reopens lazily
    np.testing.assert_array_equal(slides[0].read(0, 0, 8, 8), slides[5].read(0, 0, 8, 8))


def test_slide_file_replaced_after_open_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_tiff(tmp_path / "s.tif", gradient_image(64, 64), levels=1)
    slide = open_slide(path)
    os.replace(write_tiff(tmp_path / "new.tif", gradient_image(96, 96), levels=1), path)
    monkeypatch.setattr(slide_module, "MAX_OPEN_HANDLES", 1)
    open_slide(write_tiff(tmp_path / "other.tif", gradient_image(64, 64), levels=1))  # evicts
    with pytest.raises(SlideError, match=r"s\.tif changed on disk since it was opened"):
        slide.read(0, 0, 8, 8)
    assert open_slide(path).dimensions == (96, 96)


# -- bad input ------------------------------------------------------------------------------------


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SlideError, match=r"slide not found: .*nope\.tif"):
        open_slide(tmp_path / "nope.tif")


def test_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SlideError, match=r"slide .* is a directory, expected a slide file"):
        open_slide(tmp_path)


def test_text_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "notes.tif"
    path.write_text("not a slide\n")
    with pytest.raises(
        SlideError, match=r"cannot open slide .*notes\.tif: it is not a slide format"
    ):
        open_slide(path)


def test_stripped_tiff_is_an_error_asking_for_a_tiled_pyramid(tmp_path: Path) -> None:
    path = tmp_path / "stripped.tif"
    tifffile.imwrite(path, gradient_image(), photometric="rgb")
    with pytest.raises(
        SlideError, match=r"stripped\.tif: it is a stripped \(non-tiled\) TIFF.*tiled pyramidal"
    ):
        open_slide(path)


def _tile_cut(path: Path) -> int:
    """Byte offset in the middle of level 0's tile data."""
    with tifffile.TiffFile(path) as tif:
        offsets = tif.pages.first.dataoffsets
    return int(offsets[len(offsets) // 2]) + 10


def test_truncated_pyramid_fails_at_open(tmp_path: Path) -> None:
    path = write_tiff(tmp_path / "cut.tif", gradient_image())
    data = path.read_bytes()
    path.write_bytes(data[: _tile_cut(path)])
    with pytest.raises(SlideError, match=r"cut\.tif: it is truncated: its tile data ends at byte"):
        open_slide(path)


def test_truncated_single_level_tiff_fails_at_open(tmp_path: Path) -> None:
    path = write_tiff(tmp_path / "cut1.tif", gradient_image(), levels=1)
    data = path.read_bytes()
    path.write_bytes(data[: _tile_cut(path)])
    with pytest.raises(SlideError, match=r"cannot open slide .*cut1\.tif: .*(truncated|damaged)"):
        open_slide(path)


@pytest.mark.parametrize("tile_reader", [True, False])
def test_slide_cut_mid_tile_data_fails_on_read_and_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tile_reader: bool
) -> None:
    # An interrupted, preallocated download: the tail is zeros. OpenSlide opens it (the first IFD
    # is intact), then fails on the first tile past the cut.
    monkeypatch.setattr(slide_module, "TILE_READER", tile_reader)
    path = write_tiff(tmp_path / "partial.tif", gradient_image(), tile=64)
    data = path.read_bytes()
    cut = _tile_cut(path)
    path.write_bytes(data[:cut] + bytes(len(data) - cut))
    slide = open_slide(path)
    assert slide.read(0, 0, 64, 64).shape == (64, 64, 3)  # before the cut
    with pytest.raises(
        SlideError, match=r"partial\.tif: reading region x=0, y=320, w=64, h=64 at level 0 failed"
    ):
        slide.read(0, 320, 64, 64)
    # the broken handle was evicted: a good region reads again
    assert slide.read(0, 0, 64, 64).shape == (64, 64, 3)


# -- direct tile reads of tiled JPEG TIFFs ----------------------------------------------------------


def _openslide_only(path: Path, monkeypatch: pytest.MonkeyPatch) -> Slide:
    with monkeypatch.context() as patch:
        patch.setattr(slide_module, "TILE_READER", False)
        return open_slide(path)


def test_tiled_jpeg_levels_are_read_by_the_tile_reader(
    tiff_path: Path, lossless_path: Path
) -> None:
    assert open_slide(tiff_path)._tile_pages == {0: 0, 1: 1, 2: 2}
    assert open_slide(lossless_path)._tile_pages == {}  # zlib tiles: OpenSlide reads them


def test_tile_reader_is_pixel_identical_to_openslide(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (700, 900, 3), dtype=np.uint8)  # noisy: JPEG rounding shows
    image = (image // 2 + gradient_image(900, 700) // 2).astype(np.uint8)
    path = write_tiff(tmp_path / "noisy.tif", image, tile=96)
    fast, reference = open_slide(path), _openslide_only(path, monkeypatch)
    assert fast._tile_pages and not reference._tile_pages
    regions = [(-20, -30, 150, 100, 0), (850, 650, 100, 100, 0), (0, 0, 900, 700, 0)]
    regions += [(2 * 101, 2 * 57, 120, 90, 1), (4 * 33, 4 * 11, 100, 80, 2), (301, 17, 50, 40, 1)]
    for _ in range(20):
        regions.append((*rng.integers(-50, [850, 650]), *rng.integers(1, 200, size=2), 0))
    for x, y, w, h, level in regions:
        np.testing.assert_array_equal(
            fast.read(x, y, w, h, level), reference.read(x, y, w, h, level), f"{x, y, w, h, level}"
        )


def test_tile_reader_matches_openslide_on_real_camelyon_tiles(
    real_fixtures: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = real_fixtures / "slides" / "camelyon16_tumor_001_level5.tif"
    fast, reference = open_slide(path), _openslide_only(path, monkeypatch)
    assert fast._tile_pages == {0: 0}
    for x, y in [(0, 0), (1000, 3000), (2000, 4100), (2900, 7000)]:
        np.testing.assert_array_equal(fast.read(x, y, 600, 300), reference.read(x, y, 600, 300))


# -- real fixtures --------------------------------------------------------------------------------


def test_real_camelyon_level5_image(real_fixtures: Path) -> None:
    with open_slide(real_fixtures / "slides" / "camelyon16_tumor_001_level5.tif") as slide:
        assert slide.vendor == "generic-tiff"
        assert slide.level_count == 1
        assert slide.dimensions == (3072, 7168)
        assert slide.mpp is None
        region = slide.read(1000, 3000, 256, 256)
        assert region.shape == (256, 256, 3)
        assert region.std() > 5  # tissue there, not a blank tile
        assert (slide.read(1500, 1200, 64, 64) > 230).all()  # empty (white) slide area


def test_real_aperio_cmu_region(real_fixtures: Path) -> None:
    with open_slide(real_fixtures / "slides" / "cmu_small_region.svs") as slide:
        assert slide.vendor == "aperio"
        assert slide.level_count == 1
        assert slide.dimensions == (2220, 2967)
        assert slide.mpp == pytest.approx(0.499)
        assert slide.properties["aperio.AppMag"] == "20"
        assert slide.level_for_mpp(0.5) == 0
        assert slide.read(1000, 1000, 128, 128).shape == (128, 128, 3)


def test_real_tcga_jpeg2000_slide(real_fixtures: Path) -> None:
    with open_slide(real_fixtures / "slides" / "tcga_cr_7395_ts1_j2k.svs") as slide:
        assert slide.vendor == "aperio"
        assert slide.level_count == 2
        assert slide.dimensions == (4443, 3567)
        assert slide.level_downsamples == pytest.approx((1.0, 2.001), abs=1e-3)
        assert slide.mpp is None
        assert slide.best_level(2.0) == 1  # 2.0005 counts as 2
        region = slide.read(1500, 1500, 200, 200, level=1)
        assert region.shape == (200, 200, 3)
        assert region.std() > 5
