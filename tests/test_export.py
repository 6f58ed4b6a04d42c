"""export: heatmap -> lesion outlines (QuPath GeoJSON, ASAP XML), the round trip, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import shapely

from lymphnode.core.errors import ConfigError, EvaluationError
from lymphnode.evaluation.export import ExportSettings, export
from lymphnode.inference.heatmap import Heatmap, heatmap_path, write_heatmap
from lymphnode.inference.lesions import lesion_polygons
from lymphnode.synth import make_slide
from lymphnode.wsi.annotations import read_asap
from lymphnode.wsi.geojson import read_features

SIDE = 2048  # level-0 px of the synthetic slide
DS = 8.0  # level-0 px per heatmap px
MPP = 0.243


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A synthetic tumor slide and its ground-truth heatmap (1 inside the lesions, 0 outside)."""
    root = tmp_path_factory.mktemp("export")
    slides = root / "slides"
    make_slide(slides / "tumor_a.tif", size=(SIDE, SIDE), seed=11, tumor=True)
    truth = read_asap(slides / "tumor_a.xml")
    assert truth.exclusion, "the fixture needs a lesion with a hole (seed 11 has one)"
    probs = truth.mask(0, 0, SIDE, SIDE, DS).astype(np.float32)
    heat = root / "heatmaps"
    write_heatmap(heatmap_path(heat, "tumor_a"), Heatmap("tumor_a", probs, DS, (SIDE, SIDE), MPP))
    return {"root": root, "slides": slides, "heatmaps": heat, "truth": truth}


def _raster_geometry(geometry: shapely.Geometry, ds: float) -> np.ndarray:
    """Pixel-centre raster of a shapely geometry on the slide at ``ds`` level-0 px per px."""
    n = int(SIDE / ds)
    centres = (np.arange(n) + 0.5) * ds
    xx, yy = np.meshgrid(centres, centres)
    return shapely.contains_xy(geometry, xx, yy)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


@pytest.mark.parametrize("ds", [DS, DS / 2])  # at map resolution and finer than it
def test_round_trip_of_ground_truth_heatmap_through_geojson_and_asap(
    synthetic: dict, tmp_path: Path, ds: float
) -> None:
    settings = ExportSettings(thresholds=(0.5,), tolerance_um=1.0, detections=False)
    [summary] = export(synthetic["heatmaps"], synthetic["slides"], tmp_path, settings)
    truth = synthetic["truth"].mask(0, 0, SIDE, SIDE, ds)
    features = read_features(tmp_path / "tumor_a.lesions.geojson")
    assert len(features) == summary["lesions"]["0.5"] >= 1
    assert {f.class_name for f in features} == {"Tumor"}
    assert any(len(f.geometry.interiors) for f in features), "the lesion's hole is kept"
    from_geojson = _raster_geometry(shapely.union_all([f.geometry for f in features]), ds)
    assert _iou(from_geojson, truth) >= 0.95
    from_xml = read_asap(tmp_path / "tumor_a.lesions.xml").mask(0, 0, SIDE, SIDE, ds)
    assert _iou(from_xml, truth) >= 0.95


def test_geojson_has_the_qupath_layout_and_measurements(synthetic: dict, tmp_path: Path) -> None:
    settings = ExportSettings(thresholds=(0.5, 0.9), tolerance_um=2.0, detection_threshold=0.5)
    [summary] = export(synthetic["heatmaps"], synthetic["slides"], tmp_path, settings)
    data = json.loads((tmp_path / "tumor_a.lesions.geojson").read_text())
    assert data["type"] == "FeatureCollection"
    polygons = [f for f in data["features"] if f["geometry"]["type"] == "Polygon"]
    points = [f for f in data["features"] if f["geometry"]["type"] == "Point"]
    assert len(polygons) == sum(summary["lesions"].values()) and summary["lesions"]["0.9"] >= 1
    assert len(points) == summary["detections"] >= 1
    truth_area = sum(shapely.Polygon(p).area for p in synthetic["truth"].tumor) * MPP**2
    for f in polygons:
        props = f["properties"]
        assert props["objectType"] == "annotation"
        assert props["classification"] == {"name": "Tumor", "color": [200, 0, 0]}
        m = props["measurements"]
        assert m["Threshold"] in (0.5, 0.9)
        assert m["Max probability"] == pytest.approx(1.0) and 0.5 <= m["Mean probability"] <= 1
        area = shapely.geometry.shape(f["geometry"]).area * MPP**2
        assert m["Area µm^2"] == pytest.approx(area) and 0 < area < truth_area
    assert all(p["properties"]["objectType"] == "detection" for p in points)
    assert all(p["properties"]["measurements"]["Probability"] >= 0.5 for p in points)
    assert len({f["id"] for f in data["features"]}) == len(data["features"])
    # one ASAP file per threshold when there are several
    assert (tmp_path / "tumor_a.lesions.p0.5.xml").is_file()
    assert (tmp_path / "tumor_a.lesions.p0.9.xml").is_file()
    again = tmp_path / "again"
    export(synthetic["heatmaps"], synthetic["slides"], again, settings)
    assert (again / "tumor_a.lesions.geojson").read_bytes() == (
        tmp_path / "tumor_a.lesions.geojson"
    ).read_bytes()


def test_tolerance_simplifies_within_its_distance() -> None:
    yy, xx = np.mgrid[:200, :200]
    disc = ((xx - 100) ** 2 + (yy - 100) ** 2 < 80**2).astype(np.float32)
    [exact] = lesion_polygons(disc, 4.0, 0.5, tolerance_um=0.0)
    [coarse] = lesion_polygons(disc, 4.0, 0.5, tolerance_um=10.0)  # 20 level-0 px
    assert len(coarse.polygon.exterior.coords) < len(exact.polygon.exterior.coords) / 4
    assert coarse.polygon.hausdorff_distance(exact.polygon) <= 20.0 + 1e-6
    assert coarse.area_um2 == pytest.approx(exact.area_um2, rel=0.02)


def test_separate_components_and_a_lesion_inside_a_hole_are_separate_lesions() -> None:
    probs = np.zeros((40, 40), np.float32)
    probs[5:35, 5:35] = 0.8
    probs[10:30, 10:30] = 0.0  # a hole ...
    probs[18:22, 18:22] = 0.95  # ... with an island in it
    lesions = lesion_polygons(probs, 2.0, 1.0, (0.5,))
    assert len(lesions) == 2
    ring, island = lesions
    assert len(ring.polygon.interiors) == 1 and not island.polygon.interiors
    assert ring.polygon.disjoint(island.polygon)
    assert island.max_probability == pytest.approx(0.95) and ring.mean_probability == (
        pytest.approx(0.8)
    )


def test_asap_export_warns_about_a_lesion_inside_a_hole(
    synthetic: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    n = int(SIDE / DS)
    probs = np.zeros((n, n), np.float32)
    probs[20:120, 20:120] = 0.9
    probs[40:100, 40:100] = 0.0
    probs[60:80, 60:80] = 0.9  # inside the hole
    heat = tmp_path / "heat"
    write_heatmap(heatmap_path(heat, "tumor_a"), Heatmap("tumor_a", probs, DS, (SIDE, SIDE), MPP))
    with caplog.at_level("WARNING"):
        [summary] = export(heat, synthetic["slides"], tmp_path / "out")
    assert summary["lesions"] == {"0.5": 2}
    assert "1 lesion(s) at p>=0.5 lie inside holes of other lesions" in caplog.text
    features = read_features(tmp_path / "out" / "tumor_a.lesions.geojson")
    assert sum(f.geometry.geom_type == "Polygon" for f in features) == 2


def test_empty_heatmap_gives_an_empty_feature_collection_and_says_so(
    synthetic: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    heat = tmp_path / "heat"
    zeros = np.zeros((int(SIDE / DS),) * 2, np.float32)
    write_heatmap(heatmap_path(heat, "tumor_a"), Heatmap("tumor_a", zeros, DS, (SIDE, SIDE), MPP))
    with caplog.at_level("INFO"):
        [summary] = export(heat, synthetic["slides"], tmp_path / "out")
    assert summary["lesions"] == {"0.5": 0} and summary["detections"] == 0
    data = json.loads((tmp_path / "out" / "tumor_a.lesions.geojson").read_text())
    assert data == {"type": "FeatureCollection", "features": []}
    assert read_asap(tmp_path / "out" / "tumor_a.lesions.xml").is_empty
    assert "no lesion at thresholds [0.5]" in caplog.text


def test_heatmap_without_its_slide_is_refused_and_writes_nothing(
    synthetic: dict, tmp_path: Path
) -> None:
    empty = tmp_path / "slides"
    empty.mkdir()
    with pytest.raises(EvaluationError, match=r"tumor_a\.heatmap\.tif has no slide: no tumor_a\."):
        export(synthetic["heatmaps"], empty, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(EvaluationError, match=r"slides=.*missing does not exist"):
        export(synthetic["heatmaps"], tmp_path / "missing", tmp_path / "out")


def test_heatmap_of_another_size_than_its_slide_is_refused(synthetic: dict, tmp_path: Path) -> None:
    heat = tmp_path / "heat"
    probs = np.zeros((64, 64), np.float32)
    write_heatmap(heatmap_path(heat, "tumor_a"), Heatmap("tumor_a", probs, 16, (1024, 1024), MPP))
    with pytest.raises(EvaluationError, match=r"1024 x 1024 px slide, but .*2048 x 2048 px"):
        export(heat, synthetic["slides"], tmp_path / "out")


def test_missing_heatmaps_are_refused(tmp_path: Path) -> None:
    with pytest.raises(EvaluationError, match=r"heatmaps=.*nowhere does not exist"):
        export(tmp_path / "nowhere", tmp_path, tmp_path / "out")
    with pytest.raises(EvaluationError, match=r"no \*\.heatmap\.tif files in heatmaps="):
        export(tmp_path, tmp_path, tmp_path / "out")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"thresholds": (0.0,)}, r"thresholds\[0\] must be a finite number in \(0, 1\]"),
        ({"thresholds": (1.5,)}, r"thresholds\[0\] must be .*got 1\.5"),
        ({"thresholds": ()}, r"thresholds must be a non-empty list"),
        ({"thresholds": (0.5, 0.5)}, r"thresholds must not repeat a value"),
        ({"thresholds": ("high",)}, r"thresholds\[0\] must be a finite number.*'high'"),
        ({"tolerance_um": -1.0}, r"tolerance_um must be a finite number >= 0 µm, got -1"),
        ({"tolerance_um": float("nan")}, r"tolerance_um must be a finite number"),
        ({"formats": ("shp",)}, r"formats must be a non-empty subset of \['geojson', 'asap'\]"),
        ({"object_type": "cell"}, r"object_type must be one of \['annotation', 'detection'\]"),
        ({"detection_threshold": 0.0}, r"detection_threshold must be a finite number in \(0, 1\]"),
        ({"nms_radius_um": -5.0}, r"nms_radius_um must be a finite number >= 0"),
        ({"mpp": 0.0}, r"mpp must be a finite number > 0"),
        ({"color": (300, 0, 0)}, r"color must be \[r, g, b\] integers in 0\.\.255"),
    ],
)
def test_bad_settings_are_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ExportSettings(**kwargs)


def test_lesion_polygons_refuses_a_map_that_is_not_2d() -> None:
    with pytest.raises(ConfigError, match=r"probabilities must be a 2-D map, got shape \(4,\)"):
        lesion_polygons(np.zeros(4), 8.0, 0.25)


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run(
        [sys.executable, "-m", "lymphnode.export", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_exports_and_refuses_bad_thresholds_with_one_error_line(
    synthetic: dict, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    ok = _cli(
        f"heatmaps={synthetic['heatmaps']}",
        f"slides={synthetic['slides']}",
        f"out_dir={out}",
        "thresholds=[0.5]",
        "formats=[geojson]",
        cwd=tmp_path,
    )
    assert ok.returncode == 0, ok.stderr
    assert "exported 1 heatmaps" in ok.stdout
    assert (out / "tumor_a.lesions.geojson").is_file()
    assert not (out / "tumor_a.lesions.xml").exists()
    bad = _cli(
        f"heatmaps={synthetic['heatmaps']}",
        f"slides={synthetic['slides']}",
        f"out_dir={tmp_path / 'bad'}",
        "thresholds=[0.5,2]",
        cwd=tmp_path,
    )
    assert bad.returncode == 1
    assert "error: thresholds[1] must be a finite number in (0, 1]" in bad.stderr
    assert "Traceback" not in bad.stderr
    assert not (tmp_path / "bad").exists()
