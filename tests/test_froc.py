"""The CAMELYON16 FROC on hand-made cases whose answers are known, and against MONAI."""

from __future__ import annotations

import numpy as np
import pytest

from lymphnode.evaluation.froc import FP_RATES, SlideFroc, froc


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
