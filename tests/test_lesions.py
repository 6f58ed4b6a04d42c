"""CAMELYON16 lesions: evaluation mask, ITCs, detections and hits on hand-made maps (and MONAI)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from lymphnode.evaluation.lesions import (
    Detection,
    detect_lesions,
    evaluation_mask,
    isolated_tumor_cells,
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


def test_a_plateau_gives_detections_that_cover_it_and_are_radius_apart() -> None:
    probs = np.zeros((80, 80), np.float32)
    probs[10:70, 10:70] = 1.0  # every plateau pixel is a local maximum
    dets = detect_lesions(probs, downsample=1, threshold=0.5, radius_px=5.0)
    pts = np.array([[d.y - 0.5, d.x - 0.5] for d in dets])  # (row, col) map pixels
    dist = np.sqrt(((pts[:, None] - pts[None]) ** 2).sum(-1))
    assert dist[np.triu_indices(len(pts), 1)].min() > 5.0  # none suppressed wrongly kept
    rows, cols = np.nonzero(probs)
    plateau = np.stack([rows, cols], 1)
    nearest = np.sqrt(((plateau[:, None] - pts[None]) ** 2).sum(-1)).min(1)
    assert nearest.max() <= 5.0  # every suppressed pixel had an accepted one within the radius
    assert all(d.probability == 1.0 for d in dets)
