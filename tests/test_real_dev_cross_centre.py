"""experiments/real_dev/cross_centre.py on a tiny run: re-stained test caches per centre and
method, and evaluation that agrees with the run's own test metrics."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lymphnode.patches.cache import PatchCache
from tests import tiny_runs
from tests.test_cross_centre import STAINS_A, STAINS_B, stained_image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments" / "real_dev"))

import cross_centre  # noqa: E402

pytestmark = pytest.mark.slow


def test_centre_crops_groups_by_centre(tmp_path: Path) -> None:
    for name in ("centre_1_patient_1_node_1_0_0.png", "centre_0_patient_2_node_1_0_0.png",
                 "centre_1_patient_1_node_1_0_1.png", "other.png"):  # fmt: skip
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / name)
    crops = cross_centre.centre_crops(tmp_path)
    assert list(crops) == ["0", "1"] and [len(v) for v in crops.values()] == [1, 2]


def test_build_and_evaluate_a_tiny_run(tmp_path: Path) -> None:
    root = tmp_path / "patch"
    caches = tiny_runs.write_caches(root / "caches")
    data = tmp_path / "data"
    (data / "unlabeled").mkdir(parents=True)
    for c, stains in (("0", STAINS_A), ("1", STAINS_B)):
        for k in range(3):
            image = stained_image(stains, seed=10 * int(c) + k, size=64)
            Image.fromarray(image).save(data / "unlabeled" / f"centre_{c}_patient_0_node_0_{k}.png")
    cross_centre.build(root, data, methods=("macenko", "reinhard"))
    names = ["macenko_centre0", "macenko_centre1", "reinhard_centre0", "reinhard_centre1"]
    test = PatchCache(caches / "test")
    for name in names:
        restained = PatchCache(root / "cross_centre" / "caches" / name)
        assert len(restained) == len(test)
        order = np.argsort(restained.index[["slide", "x", "y"]], order=["slide", "x", "y"])
        base = np.argsort(test.index[["slide", "x", "y"]], order=["slide", "x", "y"])
        changed = 0
        for i, j in zip(order, base, strict=True):
            image, mask = restained[int(i)][:2]
            orig, orig_mask = test[int(j)][:2]
            np.testing.assert_array_equal(mask, orig_mask)  # labels never move
            changed += int(not np.array_equal(image, orig))
        assert changed == len(test), name  # every patch re-stained
    assert (root / "cross_centre" / "restained.jpg").is_file()

    _, results = tiny_runs.run(root, caches, "trainer.max_steps=4", "trainer.max_epochs=-1")
    assert results["status"] == "completed", results.get("error")
    figures = cross_centre.evaluate(root, ("none", "adabn"))
    assert len(figures) == 2 * (1 + len(names))
    unshifted = next(f for f in figures if f.target == "unshifted" and f.adapt == "none")
    assert unshifted.counts.f1 == pytest.approx(results["metrics"]["test/seg_f1"], abs=1e-6)
    rows = list(csv.DictReader((root / "cross_centre" / "cross_centre.csv").open()))
    assert {r["target"] for r in rows} == {"unshifted", *names}
    assert "| scratch | 10 | source |" in (root / "cross_centre" / "cross_centre.md").read_text()
    # a second evaluation reuses the memo: same figures without loading the checkpoint
    again = cross_centre.evaluate(root, ("none", "adabn"))
    assert [f.counts for f in again] == [f.counts for f in figures]
