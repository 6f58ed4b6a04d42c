"""The CAMELYON16 protocol on hand-made cases whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from lymphnode.evaluation.froc import (
    FP_RATES,
    Detection,
    SlideFroc,
    detect_lesions,
    evaluation_mask,
    froc,
    isolated_tumor_cells,
    roc_auc,
    score_slide,
)

PIXEL_UM = 0.243 * 32  # CAMELYON16 level 5


def test_evaluation_mask_grows_lesions_by_half_the_margin_and_labels_them() -> None:
    tumor = np.zeros((100, 100), dtype=bool)
    tumor[10:20, 10:20] = True
    tumor[10:20, 60:70] = True
    labels = evaluation_mask(tumor, PIXEL_UM, margin_um=75.0)
    assert labels.max() == 2
    grow_px = 75.0 / (PIXEL_UM * 2)  # 4.82 px
    # a pixel 4 px left of the square is inside (4 < 4.82), 5 px is outside
    assert labels[15, 10 - 4] == labels[15, 15]
    assert labels[15, 10 - 5] == 0
    assert 4 < grow_px < 5


def test_evaluation_mask_merges_lesions_closer_than_the_margin_and_fills_holes() -> None:
    tumor = np.zeros((60, 60), dtype=bool)
    tumor[10:30, 10:30] = True
    tumor[15:25, 15:25] = False  # a hole
    tumor[10:30, 36:40] = True  # 6 px away: the grown regions touch
    labels = evaluation_mask(tumor, PIXEL_UM)
    assert labels.max() == 1
    assert labels[20, 20] == 1  # the hole is filled


def test_isolated_tumor_cells_are_lesions_shorter_than_275_um() -> None:
    tumor = np.zeros((200, 200), dtype=bool)
    tumor[10:13, 10:13] = True  # tiny: ~ (3 + 2*4.8) px ≈ 98 µm < 275 µm
    tumor[100:160, 100:110] = True  # 60 px ≈ 467 µm long
    labels = evaluation_mask(tumor, PIXEL_UM)
    itc = isolated_tumor_cells(labels, PIXEL_UM)
    assert itc == {int(labels[11, 11])}
    assert int(labels[130, 105]) not in itc


def test_detect_lesions_returns_local_maxima_with_nms_in_level0_px() -> None:
    probs = np.zeros((50, 50), dtype=np.float32)
    probs[10, 10] = 0.9
    probs[10, 12] = 0.8  # within the radius of a stronger maximum: suppressed
    probs[40, 30] = 0.7
    probs[45, 45] = 0.4  # below threshold
    dets = detect_lesions(probs, downsample=32, threshold=0.5, radius_px=3)
    assert [round(d.probability, 2) for d in dets] == [0.9, 0.7]
    assert (dets[0].x, dets[0].y) == (10.5 * 32, 10.5 * 32)
    assert (dets[1].x, dets[1].y) == (30.5 * 32, 40.5 * 32)


def test_score_slide_counts_hits_fps_and_ignores_itc() -> None:
    labels = np.zeros((10, 10), dtype=np.int32)
    labels[0:3, 0:3] = 1
    labels[6:9, 6:9] = 2  # treated as ITC
    ds = 10.0
    dets = [
        Detection(0.9, 15, 15),  # lesion 1
        Detection(0.6, 5, 5),  # lesion 1 again (lower): keep the best
        Detection(0.8, 75, 75),  # ITC: neither
        Detection(0.7, 55, 5),  # background: FP
    ]
    scored = score_slide(dets, labels, itc={2}, downsample=ds)
    assert scored.fp_probs == [0.7]
    assert scored.lesion_probs == [0.9]


def test_froc_drops_the_lowest_probability_as_the_official_code() -> None:
    # Every lesion hit, no FP: the official thresholds are {0.8, 0.9} without the lowest (0.8), so
    # only "≥ 0.9" (sensitivity 1/2 at 0 FPs) and the closing (0, 0) are on the curve.
    slides = [SlideFroc(fp_probs=[], lesion_probs=[0.9, 0.8]), SlideFroc(fp_probs=[])]
    result = froc(slides)
    assert result.froc == pytest.approx(0.5)
    assert list(result.fps_per_slide) == [0.0, 0.0]
    assert list(result.sensitivity) == [0.0, 0.5]


def test_a_missed_lesion_makes_zero_the_dropped_threshold() -> None:
    # Lesion probs 0.9, 0.8, 0 (missed): 0 is the lowest value and the one dropped, 0.8 stays.
    result = froc([SlideFroc(fp_probs=[], lesion_probs=[0.9, 0.8, 0.0])])
    assert result.froc == pytest.approx(2 / 3)


def test_an_isolated_tumor_cell_lesion_puts_zero_among_the_thresholds() -> None:
    # As the official TP_probs, an ITC label holds 0.0: with it 0 is dropped instead of 0.8.
    with_itc = froc([SlideFroc(fp_probs=[], lesion_probs=[0.9, 0.8], n_itc=1)])
    without = froc([SlideFroc(fp_probs=[], lesion_probs=[0.9, 0.8])])
    assert with_itc.froc == pytest.approx(1.0)
    assert without.froc == pytest.approx(0.5)
    assert with_itc.n_lesions == 2


def _random_slides(rng: np.random.Generator) -> list[SlideFroc]:
    """1–6 slides with 0–8 FPs and 0–4 lesions each (≥ 1 lesion overall), ties, misses and ITCs."""
    grid = rng.integers(0, 2) == 1  # half the cases draw from a coarse grid: many ties
    slides = []
    for _ in range(int(rng.integers(1, 7))):

        def draw(n: int) -> list[float]:
            values = rng.integers(1, 11, n) / 10 if grid else rng.uniform(0.05, 1.0, n)
            return [float(v) for v in values]

        lesions = draw(int(rng.integers(0, 5)))
        if rng.uniform() < 0.5:  # a missed lesion
            lesions = [0.0 if rng.uniform() < 0.3 else p for p in lesions]
        n_itc = int(rng.integers(0, 3)) if rng.uniform() < 0.3 else 0
        slides.append(SlideFroc(draw(int(rng.integers(0, 9))), lesions, n_itc))
    if not any(s.lesion_probs for s in slides):
        slides[0].lesion_probs.append(float(rng.uniform(0.05, 1.0)))
    return slides


def test_froc_equals_monai_on_random_cases() -> None:
    metrics = pytest.importorskip("monai.metrics", reason="MONAI (the dev extra) is the reference")
    rng = np.random.default_rng(0)
    every_lesion_hit = 0
    for _ in range(80):
        slides = _random_slides(rng)
        fp = np.asarray([p for s in slides for p in s.fp_probs], dtype=np.float64)
        # MONAI's (the official) tp_probs: one entry per lesion label, 0.0 for misses and ITCs
        tp = np.asarray(
            [p for s in slides for p in [*s.lesion_probs, *([0.0] * s.n_itc)]], dtype=np.float64
        )
        n_targets = sum(len(s.lesion_probs) for s in slides)
        fps, sens = metrics.compute_froc_curve_data(fp, tp, n_targets, len(slides))
        expected = metrics.compute_froc_score(fps, sens, FP_RATES)
        result = froc(slides)
        np.testing.assert_allclose(result.fps_per_slide, fps[::-1], rtol=0, atol=1e-9)
        np.testing.assert_allclose(result.sensitivity, sens[::-1], rtol=0, atol=1e-9)
        assert abs(result.froc - float(expected)) <= 1e-9
        every_lesion_hit += bool(tp.size and tp.min() > 0)
    assert every_lesion_hit >= 10  # the cases where dropping only probabilities ≤ 0 differed


def test_score_slide_equals_monai_hit_and_fp_assignment() -> None:
    metrics = pytest.importorskip("monai.metrics", reason="MONAI (the dev extra) is the reference")
    rng = np.random.default_rng(1)
    level = 5  # MONAI maps level-0 coordinates by 2**level; our downsample is the same 32
    for _ in range(50):
        tumor = ndimage.binary_dilation(rng.uniform(size=(40, 50)) > 0.985, iterations=2)
        labels, n = ndimage.label(tumor)
        itc = {int(i) for i in range(1, n + 1) if rng.uniform() < 0.25}
        k = int(rng.integers(0, 30))
        # float32-exact probabilities: MONAI keeps the lesion hits as float32
        probs = rng.uniform(0.01, 1.0, k).astype(np.float32).astype(np.float64)
        ys = rng.uniform(0, 40 * 32, k)
        xs = rng.uniform(0, 50 * 32, k)
        dets = [Detection(float(p), float(x), float(y)) for p, x, y in zip(probs, xs, ys)]
        scored = score_slide(dets, labels, itc, downsample=2.0**level)
        fp, tp, n_targets = metrics.compute_fp_tp_probs(
            probs, ys, xs, labels, labels_to_exclude=sorted(itc), resolution_level=level
        )
        keep = [i - 1 for i in range(1, n + 1) if i not in itc]
        assert scored.fp_probs == pytest.approx(list(fp), abs=1e-9)
        assert scored.lesion_probs == pytest.approx([float(tp[i]) for i in keep], abs=1e-9)
        assert len(scored.lesion_probs) == n_targets
        assert scored.n_itc == len(itc)


def test_froc_known_value() -> None:
    # 2 slides, 4 lesions. Lesion probs 0.9, 0.7, 0.3, 0 (missed); FPs 0.8, 0.6, 0.5, 0.2.
    slides = [
        SlideFroc(fp_probs=[0.8, 0.2], lesion_probs=[0.9, 0.3]),
        SlideFroc(fp_probs=[0.6, 0.5], lesion_probs=[0.7, 0.0]),
    ]
    result = froc(slides)
    # thresholds ascending with (FPs/slide, sensitivity):
    # 0.2:(2,.75) 0.3:(1.5,.75) 0.5:(1.5,.5) 0.6:(1,.5) 0.7:(.5,.5) 0.8:(.5,.25) 0.9:(0,.25) then (0,0)
    # interpolation over FPs ascending, np.interp takes the last duplicate x: fp 0 -> 0.25? The
    # curve's x = [0, 0, .5, .5, 1, 1.5, 1.5, 2]; y = [0, .25, .25, .5, .5, .5, .75, .75]
    x = np.array([0, 0, 0.5, 0.5, 1, 1.5, 1.5, 2])
    y = np.array([0, 0.25, 0.25, 0.5, 0.5, 0.5, 0.75, 0.75])
    expected = {r: float(np.interp(r, x, y)) for r in (0.25, 0.5, 1, 2, 4, 8)}
    assert result.sensitivities == pytest.approx(expected)
    assert result.froc == pytest.approx(np.mean(list(expected.values())))
    assert result.n_lesions == 4 and result.n_slides == 2


def test_froc_without_lesions_is_nan() -> None:
    assert np.isnan(froc([SlideFroc(fp_probs=[0.9])]).froc)


def test_roc_auc_known_values() -> None:
    assert roc_auc([0.9, 0.8, 0.1, 0.2], [1, 1, 0, 0]) == 1.0
    assert roc_auc([0.1, 0.2, 0.9, 0.8], [1, 1, 0, 0]) == 0.0
    assert roc_auc([0.5, 0.5], [1, 0]) == 0.5
    assert roc_auc([0.9, 0.4, 0.6, 0.1], [1, 1, 0, 0]) == 0.75
    assert np.isnan(roc_auc([0.3], [1]))
