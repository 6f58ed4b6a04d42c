"""Tests of lymphnode.models.stain: Macenko and Reinhard stain normalisation."""

from __future__ import annotations

import pickle
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pytest

from lymphnode.core.errors import ConfigError
from lymphnode.data.transforms import PreprocessStep
from lymphnode.models.preprocess import Preprocess
from lymphnode.models.stain import (
    MacenkoNormalizer,
    ReinhardNormalizer,
    build_stain_normalizer,
    load_reference_image,
    stain_normalizer_from_state,
)

RUIFROK_H = np.array([0.65, 0.70, 0.29])
RUIFROK_E = np.array([0.07, 0.99, 0.11])


def _unit(v: np.ndarray) -> np.ndarray:
    return np.asarray(v, float) / np.linalg.norm(v)


def synthetic_he(
    seed: int,
    h_vec: np.ndarray = RUIFROK_H,
    e_vec: np.ndarray = RUIFROK_E,
    scale: float = 1.0,
    size: int = 96,
) -> np.ndarray:
    """Smooth random haematoxylin/eosin concentrations on white background (30% of pixels),
    mixed by Beer-Lambert with the given stain vectors."""
    rng = np.random.default_rng(seed)

    def field() -> np.ndarray:
        coarse = rng.random((size // 8, size // 8)).astype(np.float32)
        return cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC).clip(0, 1)

    tissue = field() > 0.3
    conc = np.stack([field() * 1.2, field() * 0.8], axis=-1) * tissue[..., None] * scale
    od = conc @ np.stack([_unit(h_vec), _unit(e_vec)])
    return np.clip(255 * np.exp(-od) + 0.5, 0, 255).astype(np.uint8)


def _tissue_mean_lab(image: np.ndarray) -> np.ndarray:
    lab = cv2.cvtColor(image.astype(np.float32) / 255, cv2.COLOR_RGB2LAB).reshape(-1, 3)
    return lab[lab[:, 0] < 90].mean(axis=0)


REFERENCE = synthetic_he(0)
# another lab: bluer haematoxylin, pinker eosin, 1.6x the stain
SHIFTED = synthetic_he(
    1, h_vec=np.array([0.45, 0.85, 0.30]), e_vec=np.array([0.2, 0.9, 0.4]), scale=1.6
)
NORMALIZERS = [MacenkoNormalizer, ReinhardNormalizer]


@pytest.mark.parametrize("cls", NORMALIZERS)
def test_normalisation_moves_a_stain_shifted_image_toward_the_reference(cls: type) -> None:
    normalizer = cls().fit(REFERENCE)
    out = normalizer.transform(SHIFTED)
    target = _tissue_mean_lab(REFERENCE)
    before = np.linalg.norm(_tissue_mean_lab(SHIFTED) - target)
    after = np.linalg.norm(_tissue_mean_lab(out) - target)
    assert after < 0.5 * before


def test_macenko_output_has_the_reference_stain_vectors() -> None:
    normalizer = MacenkoNormalizer().fit(REFERENCE)
    out = normalizer.transform(SHIFTED)
    fitted_source = MacenkoNormalizer().fit(SHIFTED).stain_matrix
    fitted_out = MacenkoNormalizer().fit(out).stain_matrix
    reference = normalizer.stain_matrix
    assert np.sum(fitted_out * reference, axis=1).min() > 0.99
    assert np.sum(fitted_source * reference, axis=1).min() < 0.97


def test_macenko_orders_haematoxylin_first() -> None:
    matrix = MacenkoNormalizer().fit(REFERENCE).stain_matrix
    assert matrix[0] @ _unit(RUIFROK_H) > 0.98
    assert matrix[0][0] > matrix[1][0]  # haematoxylin absorbs more red


@pytest.mark.parametrize("cls", NORMALIZERS)
def test_normalising_the_reference_changes_little(cls: type) -> None:
    out = cls().fit(REFERENCE).transform(REFERENCE)
    assert np.abs(out.astype(int) - REFERENCE).mean() < 2.0


@pytest.mark.parametrize("cls", NORMALIZERS)
@pytest.mark.parametrize(
    "image",
    [
        np.full((32, 32, 3), 255, np.uint8),  # white background
        np.full((32, 32, 3), 250, np.uint8),  # near white
        np.full((32, 32, 3), (200, 120, 180), np.uint8),  # one flat tissue colour
        np.zeros((32, 32, 3), np.uint8),  # black
        np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8),  # noise
    ],
    ids=["white", "near-white", "flat", "black", "noise"],
)
def test_degenerate_patches_give_finite_uint8_of_the_same_shape(
    cls: type, image: np.ndarray
) -> None:
    out = cls().fit(REFERENCE).transform(image)
    assert out.dtype == np.uint8 and out.shape == image.shape
    if image.min() >= 250:
        assert np.array_equal(out, image)  # no tissue: returned unchanged


def test_macenko_returns_flat_patches_unchanged() -> None:
    flat = np.full((32, 32, 3), (200, 120, 180), np.uint8)
    assert np.array_equal(MacenkoNormalizer().fit(REFERENCE).transform(flat), flat)


@pytest.mark.parametrize("cls", NORMALIZERS)
def test_non_square_shape_is_preserved_inside_albumentations(cls: type) -> None:
    image = np.ascontiguousarray(REFERENCE[:80, :50])
    contract = Preprocess(level=0, patch_size=50, stain=cls().fit(SHIFTED).state())
    pipeline = A.Compose([PreprocessStep(contract, "stain")])
    mask = np.zeros((80, 50), np.uint8)
    out = pipeline(image=image, mask=mask)
    assert out["image"].shape == (80, 50, 3) and out["image"].dtype == np.uint8
    assert np.array_equal(out["mask"], mask)


@pytest.mark.parametrize("cls", NORMALIZERS)
def test_fitted_normaliser_pickles_for_dataloader_workers(cls: type) -> None:
    normalizer = cls().fit(REFERENCE)
    copy = pickle.loads(pickle.dumps(normalizer))
    assert np.array_equal(copy.transform(SHIFTED), normalizer.transform(SHIFTED))


@pytest.mark.parametrize("cls", NORMALIZERS)
def test_fit_on_several_images_equals_fit_on_their_mosaic(cls: type) -> None:
    halves = [np.ascontiguousarray(REFERENCE[:48]), np.ascontiguousarray(REFERENCE[48:])]
    a = cls().fit(halves).transform(SHIFTED)
    b = cls().fit(REFERENCE).transform(SHIFTED)
    assert np.abs(a.astype(int) - b).max() <= 2


@pytest.mark.parametrize("cls", NORMALIZERS)
def test_fit_on_white_reference_raises(cls: type) -> None:
    with pytest.raises(ConfigError, match="stain reference has 0 tissue pixels"):
        cls().fit(np.full((32, 32, 3), 255, np.uint8))


@pytest.mark.parametrize("cls", NORMALIZERS)
def test_transform_before_fit_raises(cls: type) -> None:
    with pytest.raises(ConfigError, match="is not fitted"):
        cls().transform(REFERENCE)


@pytest.mark.parametrize("cls", NORMALIZERS)
def test_bad_images_raise(cls: type) -> None:
    with pytest.raises(
        ConfigError, match=r"image has shape \(8, 8\) .* expected \(H, W, 3\) uint8"
    ):
        cls().fit(REFERENCE).transform(np.zeros((8, 8), np.uint8))
    with pytest.raises(ConfigError, match=r"reference image 0 .* dtype float32"):
        cls().fit([REFERENCE.astype(np.float32)])
    with pytest.raises(ConfigError, match="reference_images is empty"):
        cls().fit([])


def test_bad_method_and_options_raise() -> None:
    with pytest.raises(ConfigError, match=r"stain_norm.method='vahadane' is invalid.*macenko"):
        build_stain_normalizer("vahadane")
    with pytest.raises(ConfigError, match="alpha=60 is invalid"):
        build_stain_normalizer("macenko", alpha=60)
    with pytest.raises(ConfigError, match="tissue_lightness=0 is invalid"):
        build_stain_normalizer("reinhard", tissue_lightness=0)


def test_reference_image_file(tmp_path: Path) -> None:
    path = tmp_path / "reference.png"
    cv2.imwrite(str(path), cv2.cvtColor(REFERENCE, cv2.COLOR_RGB2BGR))
    assert np.array_equal(load_reference_image(path), REFERENCE)
    with pytest.raises(ConfigError, match=r"stain_norm.reference='.*missing.png' does not exist"):
        load_reference_image(tmp_path / "missing.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ConfigError, match="cannot be read as an image"):
        load_reference_image(tmp_path / "broken.png")


def test_macenko_on_real_he_finds_haematoxylin_and_eosin(real_fixtures: Path) -> None:
    """The CMU-1 Aperio sample is real H&E: the fitted vectors are near Ruifrok's H and E."""
    tifffile = pytest.importorskip("tifffile")
    with tifffile.TiffFile(real_fixtures / "slides" / "cmu_small_region.svs") as tif:
        page = tif.pages[0].asarray()
    region = np.ascontiguousarray(page[1000:1512, 800:1312, :3])
    matrix = MacenkoNormalizer().fit(region).stain_matrix
    assert matrix[0] @ _unit(RUIFROK_H) > 0.9
    assert matrix[1] @ _unit(RUIFROK_E) > 0.85
    out = ReinhardNormalizer().fit(REFERENCE).transform(region)
    assert out.shape == region.shape and out.dtype == np.uint8


@pytest.mark.parametrize("cls", NORMALIZERS)
def test_state_round_trip_normalises_identically(cls: type) -> None:
    normalizer = cls().fit(REFERENCE)
    state = pickle.loads(pickle.dumps(normalizer.state()))
    rebuilt = stain_normalizer_from_state(state)
    assert type(rebuilt) is cls
    assert np.array_equal(rebuilt.transform(SHIFTED), normalizer.transform(SHIFTED))


def test_bad_state_raises() -> None:
    bad = {"method": "macenko", "options": {}, "stain_matrix": [1, 2], "max_concentrations": [1]}
    with pytest.raises(ConfigError, match=r"stain normaliser state .* is invalid .*must be 2x3"):
        stain_normalizer_from_state(bad)
    with pytest.raises(ConfigError, match=r"state .* is invalid \('method'\)"):
        stain_normalizer_from_state({})
