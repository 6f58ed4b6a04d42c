"""Slide classification: ROC AUC and curve on hand-made scores."""

from __future__ import annotations

import numpy as np

from lymphnode.evaluation.slides import roc_auc, roc_curve


def test_roc_auc_known_values() -> None:
    assert roc_auc([0.9, 0.8, 0.1, 0.2], [1, 1, 0, 0]) == 1.0
    assert roc_auc([0.1, 0.2, 0.9, 0.8], [1, 1, 0, 0]) == 0.0
    assert roc_auc([0.5, 0.5], [1, 0]) == 0.5
    assert roc_auc([0.9, 0.4, 0.6, 0.1], [1, 1, 0, 0]) == 0.75
    assert np.isnan(roc_auc([0.3], [1]))


def test_roc_curve_runs_from_origin_to_one_one() -> None:
    fpr, tpr = roc_curve([0.9, 0.4, 0.6, 0.1], [1, 1, 0, 0])
    # thresholds 0.9, 0.6, 0.4, 0.1: (0, .5), (.5, .5), (.5, 1), (1, 1)
    assert list(fpr) == [0.0, 0.0, 0.5, 0.5, 1.0]
    assert list(tpr) == [0.0, 0.5, 0.5, 1.0, 1.0]
