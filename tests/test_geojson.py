"""QuPath GeoJSON: reading QuPath's layouts (hand-made fixtures), the class mapping, writing, and
prepare building labeled patches from ``<slide>.geojson``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import shapely

from lymphnode.core.errors import AnnotationError, ConfigError
from lymphnode.patches.build import build_caches
from lymphnode.patches.cache import PatchCache
from lymphnode.synth import make_slide
from lymphnode.wsi.geojson import (
    UNCLASSIFIED,
    QupathClasses,
    point_feature,
    polygon_feature,
    read_features,
    read_qupath,
    write_geojson,
)

FIXTURES = Path(__file__).parent / "fixtures" / "qupath"
SIDE = 2048


def _expected_mask() -> np.ndarray:
    """The fixture's tumour at level 0, drawn by hand (pixel (i, j) has its centre at j + 0.5,
    i + 0.5, so a rectangle [a, b) covers pixels a..b-1)."""
    m = np.zeros((SIDE, SIDE), dtype=bool)
    m[200:1000, 200:1000] = True  # Metastasis 1 ...
    m[504:704, 504:704] = False  # ... its hole
    m[800:1000, 200:400] = False  # Stroma cuts its corner out
    m[200:400, 1200:1400] = True  # Metastasis 2, two parts
    m[200:400, 1504:1704] = True
    return m  # the Region* outline, the detection and the points add nothing


@pytest.mark.parametrize("name", ["slide_q.geojson", "slide_q_v02.json"])
def test_qupath_layouts_give_the_hand_drawn_mask(name: str) -> None:
    ann = read_qupath(FIXTURES / name)
    assert ann.mask(0, 0, SIDE, SIDE, 1.0).tolist() == _expected_mask().tolist()
    assert ann.mask(0, 0, SIDE, SIDE, 8.0).tolist() == _expected_mask()[4::8, 4::8].tolist()


def test_features_keep_class_object_type_and_both_measurement_layouts() -> None:
    new = read_features(FIXTURES / "slide_q.geojson")
    assert [f.class_name for f in new] == ["Tumor", "Tumor", "Stroma", "Region*", "Tumor", "Tumor"]
    assert [f.object_type for f in new].count("detection") == 1
    assert new[1].geometry.geom_type == "MultiPolygon"
    assert new[1].measurements == {"Area µm^2": 4723.0}
    old = read_features(FIXTURES / "slide_q_v02.json")
    assert {f.object_type for f in old} == {"annotation"}
    assert old[1].measurements == {"Area µm^2": 4723.0} and old[1].name == "#1"


def test_unknown_class_is_refused_naming_slide_classes_and_keys(tmp_path: Path) -> None:
    data = json.loads((FIXTURES / "slide_q.geojson").read_text())
    data["features"][2]["properties"]["classification"]["name"] = "Lymphocytes"
    del data["features"][3]["properties"]["classification"]
    path = tmp_path / "s.geojson"
    path.write_text(json.dumps(data))
    with pytest.raises(
        AnnotationError,
        match=r"slide 'slides/s\.tif': .*s\.geojson: annotations of unknown QuPath classes "
        r"'Lymphocytes' \(1\), 'Unclassified' \(1\); add each to qupath\.tumor_classes "
        r"\['Tumor'\], qupath\.exclusion_classes .* or qupath\.ignored_classes",
    ):
        read_qupath(path, slide="slides/s.tif")
    mapped = QupathClasses(exclusion=("Lymphocytes",), ignored=(UNCLASSIFIED,))
    assert read_qupath(path, mapped).mask(0, 0, SIDE, SIDE, 8.0).any()


def test_class_mapping_decides_tumour_and_exclusion(tmp_path: Path) -> None:
    # Stroma counted as tumour: the corner is no longer cut out.
    stroma_is_tumour = QupathClasses(tumor=("Tumor", "Stroma"), exclusion=())
    m = read_qupath(FIXTURES / "slide_q.geojson", stroma_is_tumour).mask(0, 0, SIDE, SIDE, 8.0)
    assert m[900 // 8, 300 // 8] and not _expected_mask()[900, 300]


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        ({"tumor_classes": ["Tumor"], "exclusion_classes": ["Tumor"]}, r"class 'Tumor' is in both"),
        ({"tumour_classes": ["Tumor"]}, r"qupath has unknown keys \['tumour_classes'\]"),
        ({"ignored_classes": "Region*"}, r"qupath\.ignored_classes must be a list of class names"),
        ({"tumor_classes": [1]}, r"qupath\.tumor_classes must be a list of class names"),
    ],
)
def test_bad_class_mapping_is_refused(cfg: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        QupathClasses.from_config(cfg)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{not json", r"not valid JSON"),
        ('{"type": "Polygon", "coordinates": []}', r"top-level GeoJSON is 'Polygon'"),
        ('{"type": "FeatureCollection"}', r"FeatureCollection without a 'features' list"),
        ('[{"type": "Feature", "properties": {"name": "A"}}]', r"Feature 'A' has no geometry"),
        ('[{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1]]]}}]',
         r"Feature '#0' has an unreadable Polygon geometry"),
        ('[{"type": "Feature", "geometry": {"type": "Point", "coordinates": [NaN, 1]}}]',
         r"Feature '#0' has non-finite coordinates"),
        ('[{"type": "Polygon"}]', r"item #0 is not a GeoJSON Feature"),
    ],
)  # fmt: skip
def test_malformed_geojson_is_refused_naming_the_file(
    tmp_path: Path, text: str, match: str
) -> None:
    path = tmp_path / "bad.geojson"
    path.write_text(text)
    with pytest.raises(AnnotationError, match=rf"bad\.geojson: {match}"):
        read_qupath(path)


def test_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(AnnotationError, match=r"nope\.geojson: annotation file not found"):
        read_features(tmp_path / "nope.geojson")


def test_written_features_read_back(tmp_path: Path) -> None:
    ring = shapely.Polygon([(0, 0), (90, 0), (90, 90), (0, 90)], [[(30, 30), (60, 30), (60, 60)]])
    features = [
        polygon_feature(ring, name="L1", id_seed="s/1", measurements={"Max probability": 0.9}),
        point_feature(12.5, 7.0, name="d1", id_seed="s/d1", measurements={"Probability": 0.7}),
    ]
    path = write_geojson(tmp_path / "out.geojson", features)
    back = read_features(path)
    assert back[0].geometry.equals(ring) and back[0].class_name == "Tumor"
    assert back[0].measurements == {"Max probability": 0.9}
    assert back[1].object_type == "detection" and back[1].geometry.equals(shapely.Point(12.5, 7))
    ann = read_qupath(path)
    assert len(ann.tumor) == 1 and len(ann.exclusion) == 1
    with pytest.raises(ConfigError, match=r"object_type must be one of annotation, detection"):
        polygon_feature(ring, name="x", id_seed="x", object_type="cell")
    with pytest.raises(ConfigError, match=r"color must be \[r, g, b\] in 0\.\.255"):
        polygon_feature(ring, name="x", id_seed="x", color=(0, 0))


# --------------------------------------------------------------------------------------------------
# prepare with <slide>.geojson

PREPARE = {
    "caches": ["labeled"],
    "patch_size": 64,
    "level": 0,
    "counts": {"labeled": 12},
    "codec": "raw",
    "workers": 0,
    "split": {"test_slides": ["normal_t"]},
}


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("qupath_prepare")
    make_slide(root / "slides" / "slide_q.tif", size=(SIDE, SIDE), seed=3, tumor=False)
    make_slide(root / "slides" / "normal_t.tif", size=(SIDE, SIDE), seed=4, tumor=False)
    return root


def _annotations(tmp_path: Path, *files: Path) -> Path:
    folder = tmp_path / "annotations"
    folder.mkdir()
    for f in files:
        shutil.copy(f, folder / f"slide_q{f.suffix}")
    return folder


def test_prepare_cuts_labeled_patches_from_qupath_geojson(slides: Path, tmp_path: Path) -> None:
    annotations = _annotations(tmp_path, FIXTURES / "slide_q.geojson")
    caches = build_caches(
        PREPARE,
        slides_dir=slides / "slides",
        annotations_dir=annotations,
        cache_dir=tmp_path / "caches",
        progress=False,
    )
    cache = PatchCache(caches["labeled"])
    assert cache.slides == ("slide_q",) and len(cache) == 12
    assert cache.config["qupath"]["exclusion_classes"][0] == "Exclusion"
    expected = _expected_mask()
    labels = set()
    for i in range(len(cache)):
        _, mask = cache[i]
        x, y = int(cache.index["x"][i]), int(cache.index["y"][i])
        assert mask.tolist() == expected[y : y + 64, x : x + 64].tolist()
        labels.add(int(cache.index["label"][i]))
    assert labels == {0, 1}


def test_prepare_refuses_unknown_classes_before_writing(slides: Path, tmp_path: Path) -> None:
    data = json.loads((FIXTURES / "slide_q.geojson").read_text())
    data["features"][0]["properties"]["classification"]["name"] = "Tumour"
    bad = tmp_path / "slide_q.geojson"
    bad.write_text(json.dumps(data))
    annotations = _annotations(tmp_path, bad)
    with pytest.raises(
        AnnotationError, match=r"slide_q\.tif.*unknown QuPath classes 'Tumour' \(1\).*qupath\."
    ):
        build_caches(
            PREPARE,
            slides_dir=slides / "slides",
            annotations_dir=annotations,
            cache_dir=tmp_path / "caches",
            progress=False,
        )
    assert not (tmp_path / "caches").exists()
    ok = {**PREPARE, "qupath": {"tumor_classes": ["Tumor", "Tumour"]}}
    caches = build_caches(
        ok,
        slides_dir=slides / "slides",
        annotations_dir=annotations,
        cache_dir=tmp_path / "caches",
        progress=False,
    )
    assert PatchCache(caches["labeled"]).config["qupath"]["tumor_classes"] == ["Tumor", "Tumour"]


def test_prepare_refuses_a_slide_with_both_xml_and_geojson(slides: Path, tmp_path: Path) -> None:
    annotations = _annotations(tmp_path, FIXTURES / "slide_q.geojson")
    (annotations / "slide_q.xml").write_text("<ASAP_Annotations><Annotations/></ASAP_Annotations>")
    with pytest.raises(
        ConfigError, match=r"slide 'slide_q' has two annotation files, slide_q\.geojson and slide_q"
    ):
        build_caches(
            PREPARE,
            slides_dir=slides / "slides",
            annotations_dir=annotations,
            cache_dir=tmp_path / "caches",
            progress=False,
        )


def test_tumour_inside_a_hole_is_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ring = shapely.Polygon(
        [(0, 0), (100, 0), (100, 100), (0, 100)], [[(20, 20), (80, 20), (80, 80), (20, 80)]]
    )
    island = shapely.box(40, 40, 60, 60)
    path = write_geojson(
        tmp_path / "s.geojson",
        [polygon_feature(g, name=n, id_seed=n) for g, n in ((ring, "ring"), (island, "island"))],
    )
    with caplog.at_level("WARNING"):
        ann = read_qupath(path)
    assert "1 tumor region(s) lie inside holes of other tumor regions" in caplog.text
    assert len(ann.tumor) == 2 and len(ann.exclusion) == 1
