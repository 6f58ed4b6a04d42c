"""Pixel metrics: counts per slide, summed, and precision/recall/F1 with their empty cases."""

from __future__ import annotations

import numpy as np
import pytest

from lymphnode.evaluation.pixels import PixelCounts


def test_counts_of_a_slide_and_their_sum() -> None:
    probs = np.array([[0.9, 0.6], [0.4, 0.1]], np.float32)
    tumor = np.array([[True, False], [True, False]])
    counts = PixelCounts.of(probs, tumor, threshold=0.5)
    assert (counts.tp, counts.fp, counts.fn) == (1, 1, 1)
    total = counts + PixelCounts.of(probs, tumor, threshold=0.05)  # 2 tp, 2 fp, 0 fn
    assert (total.tp, total.fp, total.fn) == (3, 3, 1)
    assert total.precision == pytest.approx(0.5)
    assert total.recall == pytest.approx(0.75)
    assert total.f1 == pytest.approx(2 * 0.5 * 0.75 / 1.25)


def test_threshold_is_inclusive() -> None:
    counts = PixelCounts.of(np.array([[0.5]]), np.array([[True]]), threshold=0.5)
    assert counts.tp == 1


def test_nothing_predicted_and_no_tumor_give_zero_not_nan() -> None:
    empty = PixelCounts(tp=0, fp=0, fn=4)
    assert (empty.precision, empty.recall, empty.f1) == (0.0, 0.0, 0.0)
    assert PixelCounts(tp=0, fp=3, fn=0).recall == 0.0
