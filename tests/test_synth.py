"""Tests of lymphnode.synth: synthetic CAMELYON16-like slides and the `python -m lymphnode.synth` CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import openslide
import pytest

from lymphnode.core.errors import ConfigError
from lymphnode.synth import (
    CAMELYON_MPP,
    MANIFEST_NAME,
    SlideStyle,
    generate_slides,
    make_slide,
    slide_names,
    slide_seed,
)
from lymphnode.wsi.annotations import Annotations, read_asap

SIDE = 2048  # level-0 px of the test slides (500 µm); 5 pyramid levels
PROJECT_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two tumor slides and one normal slide, made once for the module."""
    folder = tmp_path_factory.mktemp("synth")
    made = {
        "tumor": make_slide(folder / "tumor_a.tif", size=(SIDE, SIDE), seed=11, tumor=True),
        "tumor_b": make_slide(folder / "tumor_b.tif", width=SIDE, height=SIDE, seed=12, tumor=True),
        "normal": make_slide(folder / "normal_a.tif", size=(SIDE, SIDE), seed=13, tumor=False),
    }
    return made


def _level(path: Path, level: int) -> np.ndarray:
    with openslide.OpenSlide(path) as slide:
        w, h = slide.level_dimensions[level]
        return np.asarray(slide.read_region((0, 0), level, (w, h)).convert("RGB"))


def _tissue(rgb: np.ndarray) -> np.ndarray:
    """Stained (saturated) pixels: tissue without background and fat vacuoles."""
    saturation = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1]
    return cv2.GaussianBlur(saturation, (0, 0), 2) > 25


def _patches(rgb: np.ndarray, label: np.ndarray, tissue: np.ndarray, size: int = 40):
    """Patches fully inside the lesion and fully in lesion-free tissue, as two lists."""
    tumor, normal = [], []
    for y in range(0, rgb.shape[0] - size, size // 4):
        for x in range(0, rgb.shape[1] - size, size // 4):
            lab = label[y : y + size, x : x + size]
            if lab.all():
                tumor.append(rgb[y : y + size, x : x + size])
            elif not lab.any() and tissue[y : y + size, x : x + size].all():
                normal.append(rgb[y : y + size, x : x + size])
    return tumor, normal


def _detail(patch: np.ndarray) -> float:
    """Fine-scale contrast: standard deviation of a difference of Gaussians (nuclear detail)."""
    gray = cv2.cvtColor(patch, cv2.COLOR_RGB2GRAY).astype(np.float32)
    return float((cv2.GaussianBlur(gray, (0, 0), 1.5) - cv2.GaussianBlur(gray, (0, 0), 3)).std())


# --------------------------------------------------------------------------------------------------
# make_slide


def test_slide_opens_as_generic_tiff_with_camelyon_mpp_and_pyramid(slides: dict) -> None:
    with openslide.OpenSlide(slides["tumor"].path) as slide:
        assert slide.properties["openslide.vendor"] == "generic-tiff"
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(CAMELYON_MPP)
        assert float(slide.properties["openslide.mpp-y"]) == pytest.approx(CAMELYON_MPP)
        assert slide.dimensions == (SIDE, SIDE)
        assert slide.level_count >= 4
        assert slide.level_downsamples[:4] == pytest.approx((1, 2, 4, 8))


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path: Path) -> None:
    first = make_slide(tmp_path / "a.tif", size=(1024, 768), seed=5, tumor=True)
    again = make_slide(tmp_path / "b.tif", size=(1024, 768), seed=5, tumor=True)
    other = make_slide(tmp_path / "c.tif", size=(1024, 768), seed=6, tumor=True)
    assert first.path.read_bytes() == again.path.read_bytes()
    assert first.annotation_path.read_bytes() == again.annotation_path.read_bytes()
    assert first.path.read_bytes() != other.path.read_bytes()
    assert first.style != other.style


def test_xml_round_trips_and_lesions_lie_inside_tissue(slides: dict) -> None:
    info = slides["tumor"]
    assert info.annotation_path == info.path.with_suffix(".xml")
    read = read_asap(info.annotation_path)
    assert len(read.tumor) == len(info.tumor) >= 2
    for got, made in zip(read.tumor + read.exclusion, info.tumor + info.exclusion):
        np.testing.assert_allclose(got, made)
    tissue = _tissue(_level(info.path, 2))  # downsample 4
    for polygon in info.tumor:
        inside = Annotations(tumor=[polygon], exclusion=[]).mask(0, 0, SIDE, SIDE, 4)
        assert tissue[inside].mean() > 0.97  # lesions are drawn inside the tissue, not on glass
    assert 0.03 < info.tumor_fraction < 0.2  # enough tumor for class-balanced patch sampling


def test_exclusion_polygons_lie_inside_a_lesion_and_are_drawn_as_normal_node(
    tmp_path: Path,
) -> None:
    info = next(
        i
        for seed in range(20, 40)
        if (
            i := make_slide(tmp_path / f"s{seed}.tif", size=(SIDE, SIDE), seed=seed, tumor=True)
        ).exclusion
    )
    outline = Annotations(tumor=info.tumor, exclusion=[]).mask(0, 0, SIDE, SIDE, 2)
    islands = Annotations(tumor=info.exclusion, exclusion=[]).mask(0, 0, SIDE, SIDE, 2)
    assert islands.any() and outline[islands].all()
    label = Annotations(tumor=info.tumor, exclusion=info.exclusion).mask(0, 0, SIDE, SIDE, 2)
    assert not label[islands].any()  # tumor minus exclusion


def test_normal_slide_has_no_lesions_and_no_xml(slides: dict) -> None:
    info = slides["normal"]
    assert info.tumor == [] and info.exclusion == [] and info.annotation_path is None
    assert not info.path.with_suffix(".xml").exists()
    assert info.tumor_fraction == 0.0
    assert 0.1 < info.tissue_fraction < 0.8


def test_lesions_differ_from_node_in_texture_not_in_mean_colour(slides: dict) -> None:
    for key in ("tumor", "tumor_b"):
        info = slides[key]
        rgb = _level(info.path, 1)  # downsample 2, the demo's training level
        label = Annotations(tumor=info.tumor, exclusion=info.exclusion).mask(0, 0, SIDE, SIDE, 2)
        tumor, normal = _patches(rgb, label, _tissue(rgb))
        assert len(tumor) >= 5 and len(normal) >= 50
        tumor_colour = np.mean([p.reshape(-1, 3).mean(0) for p in tumor], axis=0)
        normal_colour = np.mean([p.reshape(-1, 3).mean(0) for p in normal], axis=0)
        colour_gap = np.abs(tumor_colour - normal_colour)
        detail_tumor = np.median([_detail(p) for p in tumor])
        detail_normal = np.median([_detail(p) for p in normal])
        # large pale crowded nuclei: much less fine dark-on-light detail than packed lymphocytes ...
        assert detail_tumor < 0.8 * detail_normal, (key, detail_tumor, detail_normal)
        # ... while the mean colour stays within the spread of normal tissue itself
        spread = np.std([p.reshape(-1, 3).mean(0) for p in normal], axis=0)
        assert np.all(colour_gap < np.maximum(1.5 * spread, 8)), (key, colour_gap, spread)


def test_slides_differ_in_stain_like_different_centres(slides: dict) -> None:
    means = []
    for key in ("tumor", "tumor_b", "normal"):
        rgb = _level(slides[key].path, 2)
        means.append(rgb[_tissue(rgb)].mean(axis=0))
    gaps = [np.abs(a - b).max() for i, a in enumerate(means) for b in means[i + 1 :]]
    assert min(gaps) > 4, means  # every pair differs in tissue colour
    assert max(gaps) > 10, means
    styles = [slides[k].style for k in ("tumor", "tumor_b", "normal")]
    assert len({s.blur_sigma for s in styles}) == 3 and len({s.jpeg_quality for s in styles}) >= 2


def test_style_can_be_given_and_changes_only_the_colour(tmp_path: Path) -> None:
    base = make_slide(tmp_path / "a.tif", size=(1024, 1024), seed=3, tumor=False)
    pale = SlideStyle(**{**base.style.__dict__, "stain_e": (0.03, 0.5, 0.06)})
    pink = SlideStyle(**{**base.style.__dict__, "stain_e": (0.1, 1.6, 0.2)})
    a = make_slide(tmp_path / "b.tif", size=(1024, 1024), seed=3, tumor=False, style=pale)
    b = make_slide(tmp_path / "c.tif", size=(1024, 1024), seed=3, tumor=False, style=pink)
    assert a.style == pale and b.style == pink
    assert a.tissue_fraction == b.tissue_fraction == base.tissue_fraction  # same layout
    rgb_a, rgb_b = _level(a.path, 0), _level(b.path, 0)
    tissue = _tissue(rgb_b)
    assert rgb_b[tissue][:, 1].mean() < rgb_a[tissue][:, 1].mean() - 15  # eosin absorbs green
    assert abs(rgb_b[tissue][:, 2].mean() - rgb_a[tissue][:, 2].mean()) < 15


def test_another_mpp_is_written_to_the_pyramid(tmp_path: Path) -> None:
    info = make_slide(tmp_path / "a.tif", size=(1024, 1024), seed=4, tumor=False, mpp=0.5)
    with openslide.OpenSlide(info.path) as slide:
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"size": (256, 2048)}, "width must be an integer >= 512 px, got 256"),
        ({"size": (2048, 2048.5)}, "height must be an integer >= 512 px, got 2048.5"),
        ({"size": (1024, 1024), "width": 1024}, "either size=.* or width= and height="),
        ({"width": 1024}, r"size=\(width, height\) or both width= and height= needed"),
        (
            {"size": (1024, 1024), "mpp": 0.0},
            r"mpp must be a finite number in 0.05..5 µm/px, got 0.0",
        ),
        ({"size": (1024, 1024), "seed": -1}, "seed must be an integer >= 0, got -1"),
    ],
)
def test_bad_arguments_raise_config_error(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        make_slide(tmp_path / "bad.tif", **{"seed": 0, "tumor": True, **kwargs})
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------------
# slide sets and the CLI


def test_slide_names_follow_camelyon16_and_seeds_depend_on_set_seed_and_name() -> None:
    assert slide_names(2, 1) == [("tumor_001", True), ("tumor_002", True), ("normal_001", False)]
    assert slide_seed(0, "tumor_001") == slide_seed(0, "tumor_001")
    assert slide_seed(0, "tumor_001") != slide_seed(0, "tumor_002")
    assert slide_seed(0, "tumor_001") != slide_seed(1, "tumor_001")


def test_parallel_and_serial_runs_write_identical_slides(tmp_path: Path) -> None:
    common = {"n_tumor": 1, "n_normal": 1, "width": 768, "height": 768, "seed": 2}
    generate_slides(tmp_path / "serial", workers=0, progress=False, **common)
    generate_slides(tmp_path / "parallel", workers=2, progress=False, **common)
    for name in ("slides/tumor_001.tif", "slides/normal_001.tif", "annotations/tumor_001.xml"):
        assert (tmp_path / "serial" / name).read_bytes() == (
            tmp_path / "parallel" / name
        ).read_bytes()
    manifests = [
        json.loads((tmp_path / run / "slides" / MANIFEST_NAME).read_text())
        for run in ("serial", "parallel")
    ]
    assert manifests[0]["config"] == manifests[1]["config"]
    seeds = {n: s["seed"] for n, s in manifests[0]["slides"].items()}
    assert seeds == {n: slide_seed(2, n) for n in ("tumor_001", "normal_001")}


def test_other_config_is_refused_naming_the_keys_and_overwrite_replaces(tmp_path: Path) -> None:
    common = {"n_normal": 0, "height": 768, "workers": 0, "progress": False}
    generate_slides(tmp_path, n_tumor=2, width=768, seed=0, **common)
    with pytest.raises(
        ConfigError, match=r"differing keys: seed: 0 → 1; width: 768 → 1024\); use another out_dir"
    ):
        generate_slides(tmp_path, n_tumor=2, width=1024, seed=1, **common)
    generate_slides(tmp_path, n_tumor=1, width=1024, seed=1, overwrite=True, **common)
    assert sorted(p.name for p in (tmp_path / "slides").glob("*.tif")) == ["tumor_001.tif"]
    assert sorted(p.name for p in (tmp_path / "annotations").iterdir()) == ["tumor_001.xml"]
    with openslide.OpenSlide(tmp_path / "slides" / "tumor_001.tif") as slide:
        assert slide.dimensions == (1024, 768)


def test_slides_not_written_by_synth_are_not_overwritten(tmp_path: Path) -> None:
    (tmp_path / "slides").mkdir()
    (tmp_path / "slides" / "tumor_001.tif").write_bytes(b"someone else's slide")
    with pytest.raises(ConfigError, match=r"already holds tumor_001.tif without a synth_manifest"):
        generate_slides(tmp_path, n_tumor=1, n_normal=0, width=768, height=768, seed=0)
    assert (tmp_path / "slides" / "tumor_001.tif").read_bytes() == b"someone else's slide"


def test_missing_slide_is_remade_on_rerun(tmp_path: Path) -> None:
    common = {"n_tumor": 1, "n_normal": 1, "width": 768, "height": 768, "seed": 0, "workers": 0}
    generate_slides(tmp_path, progress=False, **common)
    normal = tmp_path / "slides" / "normal_001.tif"
    tumor = tmp_path / "slides" / "tumor_001.tif"
    before, tumor_mtime = normal.read_bytes(), tumor.stat().st_mtime_ns
    normal.unlink()  # as if the run had been killed before this slide
    generate_slides(tmp_path, progress=False, **common)
    assert normal.read_bytes() == before
    assert tumor.stat().st_mtime_ns == tumor_mtime  # finished slides are not redrawn


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_tumor": -1}, "n_tumor must be an integer >= 0, got -1"),
        ({"width": 100}, "synth: width must be an integer >= 512 px, got 100"),
        ({"workers": -2}, "workers must be an integer >= 0, got -2"),
        ({"seed": -5}, "seed must be an integer >= 0, got -5"),
        ({"n_tumor": 0, "n_normal": 0}, "at least 1, got 0 slides"),
        ({"mpp": "0.25"}, "mpp must be a finite number in 0.05..5 µm/px, got '0.25'"),
    ],
)
def test_bad_set_parameters_raise_config_error(tmp_path: Path, kwargs: dict, match: str) -> None:
    params = {"n_tumor": 1, "n_normal": 1, "width": 768, "height": 768, "seed": 0, **kwargs}
    with pytest.raises(ConfigError, match=match):
        generate_slides(tmp_path / "out", **params)
    assert not (tmp_path / "out").exists()


def _cli(*overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "lymphnode.synth", *overrides],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_writes_slides_skips_on_rerun_and_refuses_another_config(tmp_path: Path) -> None:
    args = ("out_dir=out", "n_tumor=1", "n_normal=1", "width=768", "height=768", "workers=2")
    first = _cli(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    out = tmp_path / "out"
    assert sorted(p.name for p in (out / "slides").iterdir()) == [
        "normal_001.tif",
        "synth_manifest.json",
        "tumor_001.tif",
    ]
    assert sorted(p.name for p in (out / "annotations").iterdir()) == ["tumor_001.xml"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no Hydra outputs/ or logs
    mtime = (out / "slides" / "tumor_001.tif").stat().st_mtime_ns

    again = _cli(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "2 of 2 slides already in" in again.stdout
    assert (out / "slides" / "tumor_001.tif").stat().st_mtime_ns == mtime

    other = _cli(*args, "seed=7", cwd=tmp_path)
    assert other.returncode == 1
    assert "differing keys: seed: 0 → 7" in other.stderr
    assert (out / "slides" / "tumor_001.tif").stat().st_mtime_ns == mtime
