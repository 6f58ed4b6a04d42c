"""experiments/real_dev/per_slide.py: per-slide pixel counts of a run's test patches sum to the
test F1 the run recorded."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from script_tools import load_script
from tiny_runs import run, write_caches

from lymphnode.core.errors import EvaluationError
from lymphnode.evaluation.pixels import PixelCounts
from lymphnode.patches.cache import PatchCache

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "real_dev" / "per_slide.py"
CROP = 24  # px: the centre crop of the 32-px tiny patches the test step scores


@pytest.fixture(scope="module")
def per_slide():
    return load_script(SCRIPT, "per_slide")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One scratch run (20 steps, F1 ≈ 0.8) whose test cache holds 4 patches each of two slides."""
    root = tmp_path_factory.mktemp("per_slide")
    caches = write_caches(root / "caches", test_slides=("tumor_003", "tumor_005"))
    outcome, results = run(
        root, caches, "trainer.max_steps=20", "trainer.val_check_interval=10", "task.optimizer.lr=0.01",
        f"data.transforms.crop={CROP}", "data.batch_size=3",
    )  # fmt: skip
    assert not isinstance(outcome, BaseException), results["error"]
    return root / "runs", caches / "test", results


def test_counter_counts_per_slide_with_the_strict_threshold(per_slide) -> None:
    # slide a, patch 1: probabilities / truth
    #   0.9 0.2     1 0      -> predicted (p > 0.5) 1 0 : TP 1, FN 1 (0.5 is not > 0.5), FP 1
    #   0.5 0.7     1 0                             0 1
    # slide b, patch 2: all 0.6 on a patch without tumour -> FP 4
    # slide a, patch 3: all 0.1 on all tumour             -> FN 4
    prob = torch.tensor(
        [[[[0.9, 0.2], [0.5, 0.7]]], [[[0.6, 0.6], [0.6, 0.6]]], [[[0.1, 0.1], [0.1, 0.1]]]]
    )  # (3, 1, 2, 2)
    mask = torch.tensor([[[[1, 0], [1, 0]]], [[[0, 0], [0, 0]]], [[[1, 1], [1, 1]]]])
    counter = per_slide.PerSlideCounter(0.5)
    counter.update(prob, mask, ["a", "b", "a"])
    a, b = counter.slides["a"], counter.slides["b"]
    assert (a.n_patches, a.pixels, a.tumour_pixels) == (2, 8, 6)
    assert a.counts == PixelCounts(tp=1, fp=1, fn=5)
    assert a.counts.f1 == pytest.approx(2 * 1 / (2 * 1 + 1 + 5))  # 0.25
    assert a.baseline_f1 == pytest.approx(2 * 0.75 / 1.75)
    assert b.counts == PixelCounts(tp=0, fp=4, fn=0) and b.fp_rate == 1.0
    with pytest.raises(EvaluationError, match=r"and 2 slide ids: expected equal shapes"):
        counter.update(prob, mask, ["a", "b"])  # 2 ids for 3 patches


def test_rows_leave_f1_blank_on_a_slide_without_tumour(per_slide) -> None:
    counter = per_slide.PerSlideCounter(0.5)
    counter.update(torch.full((1, 1, 2, 2), 0.9), torch.zeros(1, 1, 2, 2), ["normal"])
    fig = per_slide.RunFigures(
        run=per_slide.Run("scratch/size10/fold0/seed0", "scratch", 10, 0, 0, "completed"),
        checkpoint=Path("best.ckpt"), slides=counter.slides, recorded_f1=0.0,
    )  # fmt: skip
    (row,) = per_slide.rows_of([fig])
    assert (row["fp"], row["fp_rate"], row["precision"]) == (4, "1.000000", "0.000000")
    assert row["recall"] == row["f1"] == row["baseline_f1"] == ""
    assert "| scratch | 10 | no tumour; FP rate 100.0 ± – (n=1) |" in per_slide.to_markdown(
        [fig], "best", 1e-6
    )


def test_per_slide_counts_sum_to_the_recorded_test_f1(per_slide, tiny_run, tmp_path) -> None:
    runs_dir, test_dir, results = tiny_run
    out = tmp_path / "out"
    assert per_slide.main([str(runs_dir), "--out", str(out)]) == 0
    rows = list(csv.DictReader((out / "per_slide.csv").open()))
    assert [r["slide"] for r in rows] == ["tumor_003", "tumor_005"]
    # by hand from the cache: 4 patches per slide, tumour pixels of the centre 24² of each mask
    cache = PatchCache(test_dir)
    lo = (32 - CROP) // 2
    for row in rows:
        masks = [cache[i][1] for i in np.flatnonzero(cache.index["slide"] == row["slide"])]
        centre = sum(int(m[lo : lo + CROP, lo : lo + CROP].sum()) for m in masks)
        assert (int(row["n_patches"]), int(row["pixels"])) == (4, 4 * CROP * CROP)
        assert int(row["tumour_pixels"]) == centre > 0
        assert int(row["tp"]) + int(row["fn"]) == centre
    tp, fp, fn = (sum(int(r[k]) for r in rows) for k in ("tp", "fp", "fn"))
    assert tp + fp > 0  # the check below compares something the model predicted
    summed = PixelCounts(tp, fp, fn)
    recorded = results["metrics"]
    assert summed.f1 == pytest.approx(recorded["test/seg_f1"], abs=1e-6)
    assert summed.precision == pytest.approx(recorded["test/seg_precision"], abs=1e-6)
    assert summed.recall == pytest.approx(recorded["test/seg_recall"], abs=1e-6)
    markdown = (out / "per_slide.md").read_text()
    assert "| scratch | 10 |" in markdown and "in 1 of 1 runs" in markdown


def test_last_checkpoint_matches_metrics_last(per_slide, tiny_run) -> None:
    runs_dir, _, results = tiny_run
    (run_,) = per_slide.completed_runs(runs_dir, "last")
    fig = per_slide.run_figures(run_, runs_dir, "last")
    assert fig.checkpoint.name == "last.ckpt"
    assert fig.total.f1 == pytest.approx(results["metrics_last"]["test/seg_f1"], abs=1e-6)


def test_bad_runs_folders_are_named(per_slide, tiny_run, tmp_path) -> None:
    with pytest.raises(EvaluationError, match=rf"{tmp_path} holds no completed fine-tuning run"):
        per_slide.completed_runs(tmp_path)
    runs_dir, _, _ = tiny_run
    (run_,) = per_slide.completed_runs(runs_dir)
    # a copy of the run folder whose results.json names a checkpoint that is nowhere
    copy = tmp_path / "runs" / run_.name
    copy.mkdir(parents=True)
    best = str(runs_dir / run_.name / "checkpoints" / "best.ckpt")
    result = (runs_dir / run_.name / "results.json").read_text()
    assert best in result
    (copy / "results.json").write_text(result.replace(best, "/nowhere/nope.ckpt"))
    with pytest.raises(
        EvaluationError, match=r"checkpoints.best=/nowhere/nope.ckpt does not exist"
    ):
        per_slide.run_figures(run_, tmp_path / "runs")


def test_a_run_whose_counts_do_not_sum_to_its_record_fails_the_check(
    per_slide, tiny_run, tmp_path
) -> None:
    runs_dir, _, results = tiny_run
    (run_,) = per_slide.completed_runs(runs_dir)
    copy = tmp_path / "runs" / run_.name
    copy.mkdir(parents=True)
    recorded = results["metrics"]["test/seg_f1"]
    text = (runs_dir / run_.name / "results.json").read_text()
    assert text.count(f'"test/seg_f1": {recorded}') >= 1
    (copy / "results.json").write_text(
        text.replace(f'"test/seg_f1": {recorded}', '"test/seg_f1": 0.5')
    )
    with pytest.raises(EvaluationError, match=r"do not sum to the recorded test F1 in 1 runs"):
        per_slide.main([str(tmp_path / "runs"), "--out", str(tmp_path / "out")])
    assert "summed" in (tmp_path / "out" / "per_slide.md").read_text()  # written before failing
