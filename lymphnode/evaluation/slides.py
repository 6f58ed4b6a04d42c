"""CAMELYON16 slide classification: ROC AUC and ROC curve of per-slide tumor scores."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def roc_auc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Area under the ROC curve (ties count one half); NaN when only one class is present."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    pos, neg = s[y], s[~y]
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (pos.size * neg.size))


def roc_curve(scores: Sequence[float], labels: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates over every threshold, from (0, 0) to (1, 1)."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    thresholds = np.unique(s)[::-1]
    n_pos, n_neg = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    fpr = [0.0] + [float(((s >= t) & ~y).sum() / n_neg) for t in thresholds]
    tpr = [0.0] + [float(((s >= t) & y).sum() / n_pos) for t in thresholds]
    return np.asarray(fpr), np.asarray(tpr)
