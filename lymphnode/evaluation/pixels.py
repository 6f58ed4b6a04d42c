"""Pixel metrics of a heatmap against its tumor mask: counts summed over slides, then P/R/F1."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PixelCounts:
    """True-positive, false-positive and false-negative pixel counts (at heatmap resolution)."""

    tp: int = 0
    fp: int = 0
    fn: int = 0

    @classmethod
    def of(cls, probabilities: np.ndarray, tumor: np.ndarray, threshold: float) -> PixelCounts:
        """Counts of one slide: a pixel is predicted tumor when its probability is ≥ ``threshold``.

        ``probabilities`` (H, W) float in [0, 1] and ``tumor`` (H, W) bool share one grid.
        """
        predicted = np.asarray(probabilities) >= threshold
        tumor = np.asarray(tumor, dtype=bool)
        return cls(
            tp=int((predicted & tumor).sum()),
            fp=int((predicted & ~tumor).sum()),
            fn=int((~predicted & tumor).sum()),
        )

    def __add__(self, other: PixelCounts) -> PixelCounts:
        return PixelCounts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn)

    @property
    def precision(self) -> float:
        """TP / (TP + FP); 0.0 when nothing was predicted tumor."""
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0

    @property
    def recall(self) -> float:
        """TP / (TP + FN); 0.0 when there is no tumor pixel."""
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0

    @property
    def f1(self) -> float:
        """Harmonic mean of precision and recall; 0.0 when both are 0."""
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0
