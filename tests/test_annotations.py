"""Tests of lymphnode.wsi.annotations (ASAP XML, masks) and the lymphnode.annotations to-mask CLI."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lymphnode.annotations import main
from lymphnode.core.errors import AnnotationError, SlideError
from lymphnode.wsi.annotations import Annotations, read_asap, to_mask, write_asap

# --------------------------------------------------------------------------------------------------
# Helpers


def asap_xml(*annotations: tuple[str, str, str, list[tuple[object, object]]]) -> str:
    """ASAP XML text for (name, type, group, [(x, y), ...]) tuples; Order follows list order."""
    parts = ['<?xml version="1.0"?>\n<ASAP_Annotations><Annotations>']
    for name, kind, group, vertices in annotations:
        parts.append(f'<Annotation Name="{name}" Type="{kind}" PartOfGroup="{group}"><Coordinates>')
        parts += [f'<Coordinate Order="{k}" X="{x}" Y="{y}"/>' for k, (x, y) in enumerate(vertices)]
        parts.append("</Coordinates></Annotation>")
    parts.append("</Annotations><AnnotationGroups/></ASAP_Annotations>\n")
    return "".join(parts)


def write_text(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def square(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)


def centre_grid(x: int, y: int, rows: int, cols: int, ds: float) -> tuple[np.ndarray, np.ndarray]:
    """Level-0 (cx, cy) of the pixel centres of a mask grid, each (rows, cols)."""
    jj, ii = np.meshgrid(np.arange(cols), np.arange(rows))
    return x + (jj + 0.5) * ds, y + (ii + 0.5) * ds


def winding_inside(cx: np.ndarray, cy: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """Brute-force non-zero winding test of every point (Sunday's algorithm, as ASAP uses)."""
    w = np.zeros(cx.shape, dtype=int)
    for (ax, ay), (bx, by) in zip(polygon, np.roll(polygon, -1, axis=0)):
        left = (bx - ax) * (cy - ay) - (cx - ax) * (by - ay)
        w += ((ay <= cy) & (by > cy) & (left > 0)).astype(int)
        w -= ((ay > cy) & (by <= cy) & (left < 0)).astype(int)
    return w != 0


# --------------------------------------------------------------------------------------------------
# Real CAMELYON files


@pytest.mark.parametrize(
    ("name", "n_tumor", "n_exclusion"),
    [("tumor_001", 2, 0), ("tumor_064", 11, 24), ("tumor_106", 228, 0), ("tumor_110", 21, 18)],
)
def test_real_camelyon16_files_have_their_documented_polygons(
    real_fixtures: Path, name: str, n_tumor: int, n_exclusion: int
) -> None:
    ann = read_asap(real_fixtures / "annotations" / f"{name}.xml")
    assert len(ann.tumor) == n_tumor
    assert len(ann.exclusion) == n_exclusion
    assert all(p.dtype == np.float64 and p.ndim == 2 and p.shape[1] == 2 for p in ann.tumor)
    assert ann.path == real_fixtures / "annotations" / f"{name}.xml"


def test_tumor_001_has_2512_vertices(real_fixtures: Path) -> None:
    ann = read_asap(real_fixtures / "annotations" / "tumor_001.xml")
    assert sum(len(p) for p in ann.tumor) == 2512


def test_tumor_064_has_18883_tumor_vertices(real_fixtures: Path) -> None:
    ann = read_asap(real_fixtures / "annotations" / "tumor_064.xml")
    assert sum(len(p) for p in ann.tumor) == 18883


def test_camelyon17_file_keeps_float_coordinates_in_group_tumor(real_fixtures: Path) -> None:
    ann = read_asap(real_fixtures / "annotations" / "camelyon17_patient_004_node_4.xml")
    assert len(ann.tumor) == 3 and not ann.exclusion
    assert sum(len(p) for p in ann.tumor) == 35
    x0, y0, x1, y1 = ann.bounds()
    assert (round(x0), round(x1), round(y0), round(y1)) == (10626, 13483, 75345, 89161)
    assert ann.tumor[0][0] == pytest.approx([12711.2998, 88778.1016])  # first vertex, not rounded
    assert not float(ann.tumor[0][0, 0]).is_integer()


def test_unconfigured_groups_are_ignored_with_one_warning_naming_them(
    real_fixtures: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="lymphnode.wsi.annotations"):
        ann = read_asap(real_fixtures / "annotations" / "asap_shape_types.xml")
    assert ann.is_empty and not ann.exclusion
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "'None' (5)" in warnings[0].getMessage()


def test_polygon_rectangle_and_spline_enclose_areas_dot_and_measurement_do_not(
    real_fixtures: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="lymphnode.wsi.annotations"):
        ann = read_asap(
            real_fixtures / "annotations" / "asap_shape_types.xml", tumor_groups=("None",)
        )
    assert ann.tumor_names == ["Annotation 1", "Annotation 2", "Annotation 3"]  # rect, poly, spline
    assert [len(p) for p in ann.tumor] == [4, 5, 4]  # the spline is its vertices, not densified
    np.testing.assert_array_equal(
        ann.tumor[0], square(5954.99219, 24058.1719, 8336.99023, 26360.7676)
    )
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("'Dot': 1, 'Measurement': 1" in r.getMessage() for r in caplog.records)


def test_tumor_001_mask_outlines_the_pale_metastases_on_the_real_level5_image(
    real_fixtures: Path,
) -> None:
    tifffile = pytest.importorskip("tifffile")
    cv2 = pytest.importorskip("cv2")
    image = tifffile.imread(real_fixtures / "slides" / "camelyon16_tumor_001_level5.tif")
    assert image.shape == (7168, 3072, 3)
    ann = read_asap(real_fixtures / "annotations" / "tumor_001.xml")
    mask = ann.mask(0, 0, 3072 * 32, 7168 * 32, downsample=32)
    assert mask.shape == image.shape[:2]

    count, labels = cv2.connectedComponents(mask.astype(np.uint8))
    assert count - 1 == 2  # the two metastases, separate at this resolution
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
    saturation, value = hsv[..., 1], hsv[..., 2]
    tissue = saturation > 30  # the glass is grey/white (S ~ 0-20), H&E tissue S ~ 60-100
    kernel = np.ones((61, 61), np.uint8)  # ring of ~30 px (~1 mm) around each lesion
    for k in (1, 2):
        lesion = labels == k
        assert tissue[lesion].mean() > 0.95  # the outline lies on tissue, not on glass
        ring = cv2.dilate(lesion.astype(np.uint8), kernel).astype(bool) & ~mask & tissue
        # Metastases are paler than the lymphoid tissue around them (measured: V 192 vs 171
        # and 181 vs 149); a misplaced outline (wrong scale or offset) would not be.
        assert np.median(value[lesion]) >= np.median(value[ring]) + 10


# --------------------------------------------------------------------------------------------------
# Masks


def test_exclusion_polygons_are_subtracted() -> None:
    ann = Annotations(tumor=[square(0, 0, 100, 100)], exclusion=[square(25, 25, 75, 75)])
    mask = ann.mask(0, 0, 100, 100)
    assert mask.sum() == 100 * 100 - 50 * 50
    assert not mask[25:75, 25:75].any() and mask[:25].all() and mask[75:].all()
    assert ann.mask(0, 0, 100, 100, downsample=5).sum() == 20 * 20 - 10 * 10


@pytest.mark.parametrize("downsample", [1, 2, 3, 4, 2.5, 7, 32])
def test_mask_pixel_is_inside_when_its_centre_is_inside(downsample: float) -> None:
    x0, y0, x1, y1 = 10, 20, 50, 44  # level-0 rectangle [10, 50) x [20, 44)
    ann = Annotations(tumor=[square(x0, y0, x1, y1)])
    mask = ann.mask(3, 5, 60, 50, downsample=downsample)
    cx, cy = centre_grid(3, 5, *mask.shape, downsample)
    expected = (cx >= x0) & (cx < x1) & (cy >= y0) & (cy < y1)  # left/top in, right/bottom out
    np.testing.assert_array_equal(mask, expected)


def test_mask_centre_convention_by_hand() -> None:
    ann = Annotations(tumor=[square(10, 20, 50, 44)])
    mask = ann.mask(0, 0, 64, 64, downsample=4)  # centres at 2, 6, 10, 14, ..., 62
    expected = np.zeros((16, 16), dtype=bool)
    expected[5:11, 2:12] = True  # x centres 10..46, y centres 22..42
    np.testing.assert_array_equal(mask, expected)


def test_mask_shape_rounds_up_partial_pixels() -> None:
    ann = Annotations(tumor=[square(0, 0, 1000, 1000)])
    assert ann.mask(0, 0, 301, 300, downsample=32).shape == (10, 10)
    assert ann.mask(0, 0, 300, 301, downsample=2.5).shape == (121, 120)
    assert ann.mask(0, 0, 7, 5).shape == (5, 7)


def test_mask_of_a_region_is_the_matching_window_of_a_larger_mask() -> None:
    rng = np.random.default_rng(0)
    ann = Annotations(tumor=[rng.uniform(0, 400, (40, 2)), square(50, 60, 300, 310)])
    full = ann.mask(0, 0, 400, 400, downsample=2)
    np.testing.assert_array_equal(ann.mask(100, 60, 120, 90, downsample=2), full[30:75, 50:110])


def test_mask_matches_a_brute_force_winding_number_test_on_random_polygons() -> None:
    rng = np.random.default_rng(42)
    for _ in range(100):
        polygons = [rng.uniform(0, 80, (int(rng.integers(3, 12)), 2)) for _ in range(2)]
        holes = [rng.uniform(10, 70, (5, 2))]
        ds = float(rng.choice([1.0, 2.0, 3.0, 2.5]))
        x, y = int(rng.integers(-8, 8)), int(rng.integers(-8, 8))
        mask = Annotations(tumor=polygons, exclusion=holes).mask(x, y, 80, 70, downsample=ds)
        cx, cy = centre_grid(x, y, *mask.shape, ds)
        expected = (winding_inside(cx, cy, polygons[0]) | winding_inside(cx, cy, polygons[1])) & (
            ~winding_inside(cx, cy, holes[0])
        )
        np.testing.assert_array_equal(mask, expected)


def test_overlapping_polygons_of_opposite_orientation_are_united() -> None:
    a = square(0, 0, 20, 20)
    b = square(10, 10, 30, 30)[::-1]  # clockwise vs counter-clockwise
    mask = Annotations(tumor=[a, b]).mask(0, 0, 30, 30)
    assert mask.sum() == 400 + 400 - 100


def test_self_intersecting_polygon_uses_the_non_zero_winding_rule() -> None:
    # A pentagram drawn in one stroke: its centre has winding number 2 (filled, as in ASAP).
    angles = np.pi / 2 + np.arange(5) * 4 * np.pi / 5
    star = np.c_[50 + 40 * np.cos(angles), 50 + 40 * np.sin(angles)]
    mask = Annotations(tumor=[star]).mask(0, 0, 100, 100)
    assert mask[50, 50]


def test_mask_outside_every_polygon_is_all_false() -> None:
    ann = Annotations(tumor=[square(0, 0, 10, 10)])
    assert not ann.mask(1000, 1000, 300, 300).any()
    assert not Annotations(tumor=[]).mask(0, 0, 300, 300).any()


def test_mask_follows_polygons_added_after_the_first_mask() -> None:
    ann = Annotations(tumor=[square(0, 0, 10, 10)])
    assert ann.mask(0, 0, 40, 40).sum() == 100
    ann.tumor.append(square(20, 20, 30, 30))
    assert ann.mask(0, 0, 40, 40).sum() == 200


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((0, 0, 0, 10, 1.0), "w and h must be positive"),
        ((0, 0, 10, -1, 1.0), "w and h must be positive"),
        ((0.5, 0, 10, 10, 1.0), "x must be an integer"),
        ((0, 0, 10, 10, 0.0), r"downsample must be a finite number > 0, got 0\.0"),
        ((0, 0, 10, 10, float("nan")), "downsample must be a finite number > 0, got nan"),
    ],
)
def test_mask_rejects_bad_arguments(args: tuple, match: str) -> None:
    with pytest.raises(AnnotationError, match=match):
        Annotations(tumor=[square(0, 0, 10, 10)]).mask(*args)


@pytest.mark.parametrize(
    ("polygon", "match"),
    [
        (np.zeros((2, 2)), r"tumor polygon 0: expected an \(N, 2\) array"),
        (np.zeros((4, 3)), r"tumor polygon 0: expected an \(N, 2\) array"),
        (np.array([[0, 0], [1, np.nan], [1, 1]]), "tumor polygon 0: vertices must be finite"),
    ],
)
def test_annotations_reject_malformed_polygons(polygon: np.ndarray, match: str) -> None:
    with pytest.raises(AnnotationError, match=match):
        Annotations(tumor=[polygon])


def test_bounds_and_is_empty() -> None:
    ann = Annotations(tumor=[square(5, 6, 10, 12), square(40, 1, 41, 2)])
    assert ann.bounds() == (5.0, 1.0, 41.0, 12.0)
    assert not ann.is_empty
    holes_only = Annotations(tumor=[], exclusion=[square(0, 0, 1, 1)])
    assert holes_only.is_empty and holes_only.bounds() is None


def test_validate_within_names_the_annotation_its_bbox_and_the_slide_size() -> None:
    ann = Annotations(
        tumor=[square(0, 0, 10, 10), square(90, 5, 130, 20)],
        tumor_names=["inside", "Annotation 7"],
    )
    ann.validate_within(200, 100)
    with pytest.raises(
        AnnotationError,
        match=r"'Annotation 7' has bounding box x 90\.\.130, y 5\.\.20 .* 'a\.tif' of 120 x 100 px",
    ):
        ann.validate_within(120, 100, "a.tif")
    ann.validate_within(120, 100, tolerance=10)


def test_validate_within_checks_exclusions_and_negative_coordinates() -> None:
    ann = Annotations(tumor=[square(0, 0, 10, 10)], exclusion=[square(-3, 2, 4, 4)])
    with pytest.raises(AnnotationError, match="exclusion annotation 'exclusion polygon 0'"):
        ann.validate_within(100, 100)


# --------------------------------------------------------------------------------------------------
# Reading: ordering, formats, groups


def test_coordinates_are_sorted_by_order(tmp_path: Path) -> None:
    text = (
        '<ASAP_Annotations><Annotations><Annotation Name="a" Type="Polygon" PartOfGroup="_0">'
        '<Coordinates><Coordinate Order="2" X="10" Y="10"/><Coordinate Order="0" X="0" Y="0"/>'
        '<Coordinate Order="3" X="0" Y="10"/><Coordinate Order="1" X="10" Y="0"/>'
        "</Coordinates></Annotation></Annotations></ASAP_Annotations>"
    )
    ann = read_asap(write_text(tmp_path / "a.xml", text))
    np.testing.assert_array_equal(ann.tumor[0], square(0, 0, 10, 10))


def test_decimal_comma_coordinates_are_accepted(tmp_path: Path) -> None:
    xml = asap_xml(("a", "Polygon", "Tumor", [("12,5", "1,25"), ("20", "1"), ("20,75", "30")]))
    ann = read_asap(write_text(tmp_path / "a.xml", xml))
    np.testing.assert_array_equal(ann.tumor[0], [[12.5, 1.25], [20, 1], [20.75, 30]])


def test_exclusion_groups_are_configurable(tmp_path: Path) -> None:
    xml = asap_xml(
        ("t", "Polygon", "_1", [(0, 0), (9, 0), (9, 9)]),
        ("e", "Rectangle", "Exclusion", [(1, 1), (2, 1), (2, 2), (1, 2)]),
        ("m", "Polygon", "metastasis", [(0, 0), (5, 0), (5, 5)]),
    )
    path = write_text(tmp_path / "a.xml", xml)
    ann = read_asap(path)
    assert ann.tumor_names == ["t"] and ann.exclusion_names == ["e"]
    ann = read_asap(path, tumor_groups=("metastasis",), exclusion_groups=("_1",))
    assert ann.tumor_names == ["m"] and ann.exclusion_names == ["t"]


def test_a_group_cannot_be_both_tumor_and_exclusion(tmp_path: Path) -> None:
    path = write_text(tmp_path / "a.xml", asap_xml())
    with pytest.raises(AnnotationError, match=r"groups \['_2'\] are in both"):
        read_asap(path, tumor_groups=("_0", "_2"))


# --------------------------------------------------------------------------------------------------
# Reading: bad input


BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
]>
<ASAP_Annotations><Annotations><Annotation Name="&lol4;" Type="Polygon" PartOfGroup="_0">
<Coordinates/></Annotation></Annotations></ASAP_Annotations>
"""


def test_entity_bomb_is_refused(tmp_path: Path) -> None:
    path = write_text(tmp_path / "bomb.xml", BILLION_LAUGHS)
    with pytest.raises(AnnotationError, match=r"bomb\.xml: refused unsafe XML \(EntitiesForbidden"):
        read_asap(path)


def test_external_entity_is_refused(tmp_path: Path) -> None:
    secret = write_text(tmp_path / "secret.txt", "12")
    text = (
        f'<?xml version="1.0"?>\n<!DOCTYPE a [<!ENTITY x SYSTEM "file://{secret}">]>\n'
        '<ASAP_Annotations><Annotations><Annotation Name="a" Type="Polygon" PartOfGroup="_0">'
        '<Coordinates><Coordinate Order="0" X="&x;" Y="0"/></Coordinates></Annotation>'
        "</Annotations></ASAP_Annotations>"
    )
    with pytest.raises(AnnotationError, match=r"xxe\.xml: refused unsafe XML"):
        read_asap(write_text(tmp_path / "xxe.xml", text))


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("<ASAP_Annotations><Annotations>", r"bad\.xml: not well-formed XML"),
        ("not xml at all", r"bad\.xml: not well-formed XML"),
        ("<ASAP_Annotations><Other/></ASAP_Annotations>", r"bad\.xml: no <Annotations> element"),
        (
            asap_xml(("Annotation 3", "Polygon", "_0", [(0, 0), ("abc", 1), (2, 2)])),
            r"bad\.xml: annotation 'Annotation 3' has X='abc'; expected a finite number",
        ),
        (
            asap_xml(("Annotation 4", "Polygon", "_0", [(0, 0), (1, "inf"), (2, 2)])),
            r"annotation 'Annotation 4' has Y='inf'",
        ),
        (
            asap_xml(("two", "Polygon", "_2", [(0, 0), (1, 1)])),
            r"bad\.xml: annotation 'two' \(Polygon\) has 2 vertices; .* at least 3",
        ),
        (
            asap_xml(("odd", "Ellipse", "_0", [(0, 0), (1, 1), (2, 0)])),
            r"annotation 'odd' has Type='Ellipse'; expected one of Polygon",
        ),
        (
            '<ASAP_Annotations><Annotations><Annotation Name="nox" Type="Polygon" '
            'PartOfGroup="_0"><Coordinates><Coordinate Order="0" Y="1"/></Coordinates>'
            "</Annotation></Annotations></ASAP_Annotations>",
            r"annotation 'nox' has a Coordinate without X",
        ),
    ],
)
def test_malformed_files_raise_annotation_error_naming_file_and_annotation(
    tmp_path: Path, text: str, match: str
) -> None:
    with pytest.raises(AnnotationError, match=match):
        read_asap(write_text(tmp_path / "bad.xml", text))


def test_missing_file_raises_annotation_error(tmp_path: Path) -> None:
    with pytest.raises(AnnotationError, match=r"nothere\.xml: annotation file not found"):
        read_asap(tmp_path / "nothere.xml")


def test_points_outside_the_configured_groups_are_not_validated(tmp_path: Path) -> None:
    # A 2-vertex polygon in an ignored group is not an error: it is not used.
    xml = asap_xml(("ruler", "Polygon", "notes", [(0, 0), (1, 1)]))
    assert read_asap(write_text(tmp_path / "a.xml", xml)).is_empty


# --------------------------------------------------------------------------------------------------
# Writing


def test_write_asap_round_trips_exactly(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    tumor = [rng.uniform(0, 1e5, (50, 2)), square(1, 2, 3, 4)]
    exclusion = [rng.uniform(0, 1e5, (7, 2)) + 0.1]
    path = tmp_path / "sub" / "slide.xml"
    write_asap(path, tumor, exclusion)
    ann = read_asap(path)
    assert len(ann.tumor) == 2 and len(ann.exclusion) == 1
    for got, want in zip(ann.tumor + ann.exclusion, tumor + exclusion):
        np.testing.assert_array_equal(got, want)
    assert ann.tumor_names == ["Annotation 0", "Annotation 1"]
    assert ann.exclusion_names == ["Annotation 2"]
    text = path.read_text()
    assert 'PartOfGroup="_0"' in text and 'PartOfGroup="_2"' in text
    assert '<Group Name="_0"' in text and '<Group Name="_2"' in text
    assert 'X="1" Y="2"' in text  # integers written without a trailing ".0"
    assert sorted(p.name for p in path.parent.iterdir()) == ["slide.xml"]  # no temp file left


def test_write_asap_refuses_bad_polygons_and_leaves_no_file(tmp_path: Path) -> None:
    path = tmp_path / "out.xml"
    with pytest.raises(AnnotationError, match=r"exclusion polygon 0: expected an \(N, 2\) array"):
        write_asap(path, [square(0, 0, 1, 1)], [np.zeros((2, 2))])
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


def test_write_asap_replaces_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "a.xml"
    write_asap(path, [square(0, 0, 1, 1)])
    write_asap(path, [square(0, 0, 5, 5), square(7, 7, 8, 8)])
    assert len(read_asap(path).tumor) == 2


# --------------------------------------------------------------------------------------------------
# to-mask CLI


@pytest.fixture
def tiny_slide(tmp_path: Path) -> Path:
    """A 1024 x 768 px pyramidal tiled RGB TIFF at 0.25 µm/px (4 levels: until both sides < 256)."""
    from lymphnode.wsi.pyramid import write_pyramid

    image = np.full((768, 1024, 3), 230, dtype=np.uint8)
    path = tmp_path / "slide.tif"
    write_pyramid(path, image, mpp=0.25, tile_size=128, min_size=256)
    return path


@pytest.fixture
def tiny_xml(tmp_path: Path) -> Path:
    path = tmp_path / "slide.xml"
    write_asap(path, [square(256, 128, 512, 384)], [square(300, 200, 340, 240)])
    return path


def test_to_mask_cli_writes_a_pyramidal_0_255_mask_that_openslide_opens(
    tmp_path: Path, tiny_slide: Path, tiny_xml: Path, capsys: pytest.CaptureFixture
) -> None:
    openslide = pytest.importorskip("openslide")
    out = tmp_path / "masks" / "slide_mask.tif"
    assert main(["to-mask", str(tiny_slide), str(tiny_xml), str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    with openslide.OpenSlide(str(out)) as mask_slide:
        assert mask_slide.level_count > 1
        assert mask_slide.dimensions == (1024, 768)
        assert float(mask_slide.properties["openslide.mpp-x"]) == pytest.approx(0.25)
        level0 = np.asarray(mask_slide.read_region((0, 0), 0, (1024, 768)))[..., 0]
    assert set(np.unique(level0)) == {0, 255}
    expected = np.zeros((768, 1024), dtype=bool)
    expected[128:384, 256:512] = True
    expected[200:240, 300:340] = False
    np.testing.assert_array_equal(level0 == 255, expected)
    assert sorted(p.name for p in out.parent.iterdir()) == ["slide_mask.tif"]  # no temp left


def test_to_mask_at_a_higher_level_uses_its_grid_and_mpp(
    tmp_path: Path, tiny_slide: Path, tiny_xml: Path
) -> None:
    openslide = pytest.importorskip("openslide")
    out = to_mask(tiny_slide, tiny_xml, tmp_path / "m1.tif", level=1)
    with openslide.OpenSlide(str(out)) as mask_slide:
        assert mask_slide.dimensions == (512, 384)
        assert float(mask_slide.properties["openslide.mpp-x"]) == pytest.approx(0.5)
        level0 = np.asarray(mask_slide.read_region((0, 0), 0, (512, 384)))[..., 0]
    expected = read_asap(tiny_xml).mask(0, 0, 1024, 768, downsample=2)
    np.testing.assert_array_equal(level0 == 255, expected)


def test_to_mask_in_bands_equals_one_raster(tmp_path: Path, tiny_slide: Path) -> None:
    tifffile = pytest.importorskip("tifffile")
    rng = np.random.default_rng(5)
    xml = tmp_path / "random.xml"
    write_asap(xml, [rng.uniform(0, 768, (60, 2)), rng.uniform(200, 760, (30, 2))])
    out = to_mask(tiny_slide, xml, tmp_path / "bands.tif", band_pixels=1000)  # 1-row bands
    expected = read_asap(xml).mask(0, 0, 1024, 768)
    np.testing.assert_array_equal(tifffile.imread(out, key=0) == 255, expected)


def test_to_mask_refuses_annotations_outside_the_slide(tmp_path: Path, tiny_slide: Path) -> None:
    xml = tmp_path / "other.xml"
    write_asap(xml, [square(900, 700, 5000, 6000)])
    out = tmp_path / "m.tif"
    with pytest.raises(AnnotationError, match=r"'Annotation 0' has bounding box .* 1024 x 768 px"):
        to_mask(tiny_slide, xml, out)
    assert not out.exists()


def test_to_mask_refuses_a_level_the_slide_lacks(
    tmp_path: Path, tiny_slide: Path, tiny_xml: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "m.tif"
    with pytest.raises(SlideError, match=r"level 7 requested, the slide has levels 0-3"):
        to_mask(tiny_slide, tiny_xml, out, level=7)
    assert main(["to-mask", str(tiny_slide), str(tiny_xml), str(out), "--level", "-1"]) == 1
    assert "level -1 requested" in capsys.readouterr().err
    assert not out.exists()


def test_to_mask_module_entry_point_exits_non_zero_with_the_error(
    tmp_path: Path, tiny_slide: Path
) -> None:
    bad = write_text(tmp_path / "bad.xml", "<ASAP_Annotations>")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lymphnode.annotations",
            "to-mask",
            str(tiny_slide),
            str(bad),
            str(tmp_path / "m.tif"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "bad.xml: not well-formed XML" in result.stderr
    assert not (tmp_path / "m.tif").exists()
