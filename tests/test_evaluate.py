"""evaluate: hand-made heatmaps and annotations with known FROC, AUC and pixel F1, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lymphnode.core.errors import ConfigError, EvaluationError
from lymphnode.evaluation.camelyon16 import EvaluationSettings, evaluate
from lymphnode.inference.heatmap import Heatmap, heatmap_path, read_heatmap, write_heatmap
from lymphnode.wsi.annotations import write_asap

DS = 32.0
MPP = 0.243
SIZE = (128 * 32, 96 * 32)  # level-0 (w, h) → a 128 × 96 heatmap


def _square(x0: float, y0: float, side: float) -> np.ndarray:
    return np.array([[x0, y0], [x0 + side, y0], [x0 + side, y0 + side], [x0, y0 + side]], float)


@pytest.fixture()
def case(tmp_path: Path) -> dict:
    """Two tumor slides and two normal slides with a known answer.

    tumor_001: lesion A (found, p 0.9) and lesion B (missed); tumor_002: lesion C (found, p 0.8) and
    one FP (p 0.7); normal_001: one FP (p 0.6); normal_002: nothing above 0.3.
    """
    heat, ann = tmp_path / "heatmaps", tmp_path / "annotations"
    heat.mkdir()
    ann.mkdir()
    side = 40 * DS  # 40 heatmap px ≈ 311 µm: not an isolated-tumor-cell lesion
    write_asap(
        ann / "tumor_001.xml",
        [_square(5 * DS, 5 * DS, side), _square(70 * DS, 10 * DS, side)],
    )
    write_asap(ann / "tumor_002.xml", [_square(10 * DS, 4 * DS, side)])
    maps = {
        name: np.zeros((96, 128), np.float32)
        for name in ("tumor_001", "tumor_002", "normal_001", "normal_002")
    }
    maps["tumor_001"][5:45, 5:45] = 0.9  # covers lesion A exactly
    maps["tumor_002"][4:44, 10:50] = 0.8  # lesion C
    maps["tumor_001"][25, 25] = 0.95  # each lesion's heat has one peak (a flat plateau would give
    maps["tumor_002"][24, 30] = 0.85  # a detection per corner)
    maps["tumor_002"][90, 120] = 0.7  # FP far from C
    maps["normal_001"][20, 20] = 0.6
    maps["normal_002"][10, 10] = 0.3
    for name, probs in maps.items():
        write_heatmap(heatmap_path(heat, name), Heatmap(name, probs, DS, SIZE, MPP))
    return {"heatmaps": heat, "annotations": ann, "out": tmp_path / "eval"}


def test_heatmap_round_trip_keeps_metadata_and_quantised_probabilities(tmp_path: Path) -> None:
    probs = np.linspace(0, 1, 128 * 96, dtype=np.float32).reshape(96, 128)
    write_heatmap(tmp_path / "s.heatmap.tif", Heatmap("s", probs, DS, SIZE, MPP))
    back = read_heatmap(tmp_path / "s.heatmap.tif")
    assert back.slide == "s" and back.downsample == DS and back.level0_size == SIZE
    assert back.mpp == MPP
    assert np.abs(back.probabilities - probs).max() <= 0.5 / 255 + 1e-6


def test_known_froc_auc_and_pixel_f1(case: dict) -> None:
    summary = evaluate(case["heatmaps"], case["annotations"], case["out"])
    # lesions: A (p .9), B (missed), C (p .8); FPs: .7 (tumor_002), .6 (normal_001); 4 slides.
    # At threshold .8: 0 FP, sensitivity 2/3; at .7: 0.25 FP/slide; at .6: 0.5 FP/slide, 2/3.
    assert summary["n_lesions"] == 3
    sens = summary["sensitivity_at_fp"]
    assert sens["0.25"] == pytest.approx(2 / 3)
    assert sens["8"] == pytest.approx(2 / 3)
    assert summary["froc"] == pytest.approx(2 / 3)
    # slide scores: tumors .9, .8; normals .6, .3 → perfect separation
    assert summary["slide_auc"] == pytest.approx(1.0)
    # pixel F1: lesion A exact (1600 px), lesion C exact (1600 px), lesion B missed, 2 FP pixels
    tp, fp, fn = 3200, 2, 1600
    assert summary["pixel_precision"] == pytest.approx(tp / (tp + fp))
    assert summary["pixel_recall"] == pytest.approx(tp / (tp + fn))
    out = case["out"]
    assert json.loads((out / "evaluation.json").read_text())["froc"] == pytest.approx(2 / 3)
    assert (out / "froc.png").stat().st_size > 0 and (out / "roc.png").stat().st_size > 0
    rows = (out / "detections" / "tumor_002.csv").read_text().splitlines()
    assert rows[0] == "probability,x,y" and len(rows) == 3


def test_heatmap_without_its_annotation_is_an_error(case: dict) -> None:
    (case["annotations"] / "tumor_002.xml").rename(case["annotations"] / "Tumor_002.xml")
    with pytest.raises(
        EvaluationError, match=r"tumor_002 has no annotation .*did you mean Tumor_002\.xml"
    ):
        evaluate(case["heatmaps"], case["annotations"], case["out"])
    assert not (case["out"] / "evaluation.json").exists()


def test_heatmap_whose_slide_name_differs_from_its_file_is_an_error(case: dict) -> None:
    os.rename(
        case["heatmaps"] / "normal_002.heatmap.tif", case["heatmaps"] / "normal_009.heatmap.tif"
    )
    with pytest.raises(EvaluationError, match=r"heatmap of slide 'normal_002', not 'normal_009'"):
        evaluate(case["heatmaps"], case["annotations"], case["out"])


def test_reference_csv_decides_normal_slides(case: dict, tmp_path: Path) -> None:
    for name in ("normal_001", "normal_002"):
        os.rename(
            case["heatmaps"] / f"{name}.heatmap.tif", case["heatmaps"] / f"x{name}.heatmap.tif"
        )
        probs = read_heatmap(case["heatmaps"] / f"x{name}.heatmap.tif").probabilities
        write_heatmap(
            case["heatmaps"] / f"x{name}.heatmap.tif", Heatmap(f"x{name}", probs, DS, SIZE, MPP)
        )
    with pytest.raises(EvaluationError, match="normal slide must be named normal_"):
        evaluate(case["heatmaps"], case["annotations"], case["out"])
    ref = tmp_path / "reference.csv"
    ref.write_text(
        "xnormal_001,Normal\nxnormal_002,Normal\ntumor_001,Tumor,Macro\ntumor_002,Tumor,Micro\n"
    )
    summary = evaluate(case["heatmaps"], case["annotations"], case["out"], reference=ref)
    assert summary["froc"] == pytest.approx(2 / 3)


def test_heatmap_of_another_slide_size_is_an_error(case: dict) -> None:
    probs = np.zeros((10, 10), np.float32)
    write_heatmap(
        heatmap_path(case["heatmaps"], "tumor_001"), Heatmap("tumor_001", probs, DS, SIZE, MPP)
    )
    with pytest.raises(EvaluationError, match="heatmap and slide do not match"):
        evaluate(case["heatmaps"], case["annotations"], case["out"])


def test_a_file_that_is_not_a_heatmap_is_refused(tmp_path: Path) -> None:
    import tifffile

    tifffile.imwrite(tmp_path / "x.heatmap.tif", np.zeros((8, 8), np.uint8))
    with pytest.raises(EvaluationError, match="is not a lymphnode heatmap"):
        read_heatmap(tmp_path / "x.heatmap.tif")


def test_cli_writes_evaluation_and_exits_nonzero_on_bad_input(case: dict) -> None:
    env = {**os.environ, "WANDB_MODE": "offline"}
    ok = subprocess.run(
        [sys.executable, "-m", "lymphnode.evaluate", f"heatmaps={case['heatmaps']}",
         f"annotations={case['annotations']}", f"out_dir={case['out']}"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "FROC 0.667" in ok.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "lymphnode.evaluate", f"heatmaps={case['heatmaps'] / 'nope'}",
         f"annotations={case['annotations']}"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 1
    assert "nope does not exist" in bad.stdout + bad.stderr


def test_detection_threshold_changes_detections_not_pixels(case: dict) -> None:
    default = evaluate(case["heatmaps"], case["annotations"], case["out"])
    strict = evaluate(
        case["heatmaps"],
        case["annotations"],
        case["out"],
        settings=EvaluationSettings(detection_threshold=0.95),  # above every stored peak (0.949)
    )
    assert strict["froc"] == pytest.approx(0.0)
    assert strict["pixel_f1"] == pytest.approx(default["pixel_f1"])
    assert strict["settings"]["detection_threshold"] == 0.95


def test_pixel_threshold_changes_pixels_not_detections(case: dict) -> None:
    summary = evaluate(
        case["heatmaps"],
        case["annotations"],
        case["out"],
        settings=EvaluationSettings(threshold=0.95),  # no pixel reaches it
    )
    assert summary["froc"] == pytest.approx(2 / 3)
    assert summary["pixel_recall"] == 0.0


def test_froc_curve_reaches_below_the_pixel_threshold(case: dict) -> None:
    # Lesion B gets weak heat (0.3, peak 0.35): below the pixel threshold 0.5, above the default
    # detection threshold 0.1. Lesions A .95, B .35, C .85; FPs .7, .6 and .3 (normal_002), 4 slides:
    # at threshold .35 the curve has 0.5 FPs per slide and sensitivity 3/3.
    path = heatmap_path(case["heatmaps"], "tumor_001")
    probs = read_heatmap(path).probabilities.copy()
    probs[10:50, 70:110] = 0.3
    probs[30, 90] = 0.35
    write_heatmap(path, Heatmap("tumor_001", probs, DS, SIZE, MPP))
    summary = evaluate(case["heatmaps"], case["annotations"], case["out"])
    sens = summary["sensitivity_at_fp"]
    assert sens["0.25"] == pytest.approx(2 / 3)
    assert sens["1"] == pytest.approx(1.0) and sens["8"] == pytest.approx(1.0)
    slides = {s["slide"]: s for s in summary["slides"]}
    assert slides["tumor_001"]["lesions_hit"] == 2
    assert slides["normal_002"]["false_positives"] == 1  # its 0.3 maximum is a detection now
    # the pixel metrics still use 0.5: lesion B's pixels are false negatives
    assert summary["pixel_recall"] == pytest.approx(3200 / 4800)
    old_rule = evaluate(
        case["heatmaps"],
        case["annotations"],
        case["out"],
        settings=EvaluationSettings(detection_threshold=0.5),
    )
    assert old_rule["sensitivity_at_fp"]["8"] == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"detection_threshold": 0.0}, r"detection_threshold=0.0 must be in \(0, 1\]"),
        ({"detection_threshold": 1.5}, r"detection_threshold=1.5 must be in \(0, 1\]"),
        ({"threshold": -0.1}, r"threshold=-0.1 must be a probability in \[0, 1\]"),
    ],
)
def test_bad_thresholds_are_refused_by_name(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        EvaluationSettings(**kwargs)


def test_froc_on_real_camelyon16_outlines_equals_monai(real_fixtures: Path, tmp_path: Path) -> None:
    """Real lesion outlines (tumor_064: 8 lesions, 3 ITCs; tumor_106: 35 lesions, 28 ITCs;
    tumor_110: 6 lesions, 1 ITC at downsample 64) with noisy heatmaps, and a normal slide: the
    FROC of ``evaluate`` equals MONAI's official-code port on the same detections and masks."""
    metrics = pytest.importorskip("monai.metrics", reason="MONAI (the dev extra) is the reference")
    from scipy import ndimage

    from lymphnode.evaluation.lesions import detect_lesions, evaluation_mask, isolated_tumor_cells
    from lymphnode.wsi.annotations import read_asap

    ds, level = 64.0, 6  # MONAI maps level-0 coordinates by 2**level
    pixel_um = MPP * ds
    rng = np.random.default_rng(0)
    heat = tmp_path / "heatmaps"
    heat.mkdir()
    masks = {}
    for name in ("tumor_064", "tumor_106", "tumor_110", "normal_001"):
        source = "tumor_110" if name == "normal_001" else name  # a slide of the same size
        ann = read_asap(real_fixtures / "annotations" / f"{source}.xml")
        x1, y1 = ann.bounds()[2:]  # type: ignore[index]
        size = (int(x1) + 2000, int(y1) + 2000)
        tumor = ann.mask(0, 0, *size, downsample=ds)
        if name == "normal_001":
            tumor[:] = False
        noise = ndimage.gaussian_filter(rng.uniform(size=tumor.shape), 4)
        noise = (noise - noise.min()) / (noise.max() - noise.min())
        probs = (0.55 * noise**3 + 0.45 * tumor).astype(np.float32)  # few maxima ≥ 0.1 off tumor
        write_heatmap(heatmap_path(heat, name), Heatmap(name, probs, ds, size, MPP))
        masks[name] = tumor
    summary = evaluate(heat, real_fixtures / "annotations", tmp_path / "eval")

    fp_all, tp_all, n_targets = [], [], 0
    for name, tumor in masks.items():
        probs = read_heatmap(heatmap_path(heat, name)).probabilities  # as evaluate saw them
        labels = evaluation_mask(tumor, pixel_um)
        itc = isolated_tumor_cells(labels, pixel_um)
        dets = detect_lesions(probs, ds, threshold=0.1, radius_px=200.0 / pixel_um)
        p = np.asarray([d.probability for d in dets])
        fp, tp, n = metrics.compute_fp_tp_probs(
            p, np.asarray([d.y for d in dets]), np.asarray([d.x for d in dets]), labels,
            labels_to_exclude=sorted(itc), resolution_level=level,
        )  # fmt: skip
        fp_all.append(np.asarray(fp, np.float64))
        tp_all.append(np.asarray(tp, np.float64))
        n_targets += n
    fps, sens = metrics.compute_froc_curve_data(
        np.concatenate(fp_all), np.concatenate(tp_all), n_targets, len(masks)
    )
    expected = float(metrics.compute_froc_score(fps, sens))
    assert summary["n_lesions"] == n_targets == (8 - 3) + (35 - 28) + (6 - 1)
    assert summary["froc"] == pytest.approx(expected, abs=1e-9)
    assert 0.0 < summary["froc"] < 1.0


def test_a_failed_rerun_leaves_the_previous_outputs_whole(
    case: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lymphnode.evaluation import camelyon16

    evaluate(case["heatmaps"], case["annotations"], case["out"])
    out = Path(case["out"])
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert {"evaluation.json", "froc.png", "roc.png"} <= {str(p) for p in before}

    def broken_roc(*args: object) -> None:
        raise RuntimeError("plotting failed")

    monkeypatch.setattr(camelyon16, "roc_curve", broken_roc)
    with pytest.raises(RuntimeError, match="plotting failed"):
        evaluate(
            case["heatmaps"],
            case["annotations"],
            case["out"],
            settings=EvaluationSettings(detection_threshold=0.95),
        )
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # no file replaced (this rerun would change them), no temp left
