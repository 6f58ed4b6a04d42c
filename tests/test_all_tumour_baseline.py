"""The all-tumour baseline (lymphnode.tasks.callbacks.AllTumourBaseline): the F1 of predicting
tumour on every test pixel, 2p / (1 + p), logged as ``test/baseline_all_tumour_f1``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tiny_runs import run, write_caches

from lymphnode.patches.cache import PatchCache
from lymphnode.tasks.callbacks import all_tumour_f1


def test_all_tumour_f1_is_the_f1_of_precision_p_and_recall_1() -> None:
    p = 0.25
    precision, recall = p, 1.0
    assert all_tumour_f1(p) == pytest.approx(2 * precision * recall / (precision + recall))
    assert all_tumour_f1(0.0) == 0.0 and all_tumour_f1(1.0) == 1.0
    with pytest.raises(ValueError, match=r"tumour_fraction=1.5 is not a fraction in \[0, 1\]"):
        all_tumour_f1(1.5)


def test_finetuning_records_the_baseline_of_the_test_masks(tmp_path: Path) -> None:
    caches = write_caches(tmp_path / "caches")
    outcome, results = run(tmp_path, caches, "trainer.max_steps=2")
    assert not isinstance(outcome, BaseException), results["error"]
    test = PatchCache(caches / "test")
    masks = np.stack([test[i][1] for i in range(len(test))])  # (N, P, P) {0, 1}
    p = float(masks.mean())
    assert 0.0 < p < 0.5
    expected = 2 * p / (1 + p)
    assert results["metrics"]["test/baseline_all_tumour_f1"] == pytest.approx(expected, rel=1e-6)
    assert results["metrics_last"]["test/baseline_all_tumour_f1"] == pytest.approx(expected)
