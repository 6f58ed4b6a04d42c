"""The table's statistics: the paired difference and its t-test, hand-computed."""

from __future__ import annotations

import math

import pytest

from lymphnode.evaluation.table import paired_difference


def test_paired_t_test_on_two_folds_matches_the_hand_computed_p() -> None:
    # differences .1 and .3: mean .2, sd √.02, t = .2 / (√.02 / √2) = 2 on 1 degree of freedom;
    # the t distribution with 1 df is Cauchy: two-sided p = 1 − (2/π)·atan(2)
    pair = paired_difference({(0, 0): 0.5, (1, 0): 0.4}, {(0, 0): 0.6, (1, 0): 0.7})
    assert pair is not None
    assert pair.mean == pytest.approx(0.2)
    assert pair.std == pytest.approx(math.sqrt(0.02))
    assert pair.p_value == pytest.approx(1 - 2 / math.pi * math.atan(2))
    assert pair.p_note is None


def test_constant_difference_has_no_p_value() -> None:
    pair = paired_difference(
        {(f, 0): 0.1 * f for f in range(4)}, {(f, 0): 0.1 * f + 0.2 for f in range(4)}
    )
    assert pair is not None and pair.p_value is None
    assert pair.mean == pytest.approx(0.2)
    assert "4 paired differences are all equal (zero variance)" in pair.p_note


def test_identical_inits_have_no_p_value_either() -> None:
    same = {(f, 0): 0.5 for f in range(3)}
    pair = paired_difference(same, dict(same))
    assert pair is not None and pair.p_value is None and pair.mean == 0.0


def test_one_pair_has_no_p_value() -> None:
    pair = paired_difference({(0, 0): 0.5, (1, 0): 0.4}, {(0, 0): 0.6})
    assert pair is not None and pair.n == 1 and pair.p_value is None
    assert "needs two" in pair.p_note


def test_no_common_fold_gives_no_pair() -> None:
    assert paired_difference({(0, 0): 0.5}, {(1, 0): 0.6}) is None
