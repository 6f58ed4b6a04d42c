"""The report on hand-made results.json files with known means, stds, a missing and a failed run."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from lymphnode.evaluation.runs import ReportError, collect_runs
from lymphnode.evaluation.table import summarize
from lymphnode.evaluation.table_output import PAPER_TABLE, to_markdown
from lymphnode.report import main


def _write_run(root: Path, init: str, size: int, fold: int, f1: float, *, seed: int = 0,
               status: str = "completed", precision: float = 0.5, recall: float = 0.8,
               last_f1: float | None = None, **extra: object) -> Path:  # fmt: skip
    """A run folder with its results.json; ``extra`` adds top-level fields (selection, steps,
    collapsed) and ``baseline`` the all-tumour baseline metric."""
    run_dir = root / init / f"size{size}" / f"fold{fold}" / f"seed{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics = {"test/seg_precision": precision, "test/seg_recall": recall, "test/seg_f1": f1}
    if "baseline" in extra:
        metrics["test/baseline_all_tumour_f1"] = extra.pop("baseline")  # type: ignore[assignment]
    result = {
        "status": status,
        "experiment": "finetune" if init == "pretrained" else "scratch",
        "init": init,
        "labeled_size": size,
        "fold": fold,
        "seed": seed,
        "metrics": metrics if status == "completed" else {},
        "metrics_last": {**metrics, "test/seg_f1": f1 if last_f1 is None else last_f1},
        "error": None if status == "completed" else "RuntimeError: boom",
        **extra,
    }
    (run_dir / "results.json").write_text(json.dumps(result))
    return run_dir


@pytest.fixture()
def sweep(tmp_path: Path) -> Path:
    """2 sizes × 3 folds × 2 inits with known F1s; size 80 fold 2 scratch failed, pretrained missing."""
    f1 = {
        ("scratch", 40): [0.40, 0.50, 0.60],
        ("pretrained", 40): [0.50, 0.60, 0.70],
        ("scratch", 80): [0.55, 0.65],
        ("pretrained", 80): [0.70, 0.72],
    }
    for (init, size), values in f1.items():
        for fold, value in enumerate(values):
            _write_run(tmp_path, init, size, fold, value)
    _write_run(tmp_path, "scratch", 80, 2, 0.0, status="failed")
    # the pretraining run sits beside the sweep and is not part of the table
    (tmp_path / "pretrain").mkdir()
    (tmp_path / "pretrain" / "results.json").write_text(
        json.dumps({"status": "completed", "init": "pretrain", "metrics": {"val/recon_mse": 0.1}})
    )
    return tmp_path


def test_means_and_sample_stds_over_folds(sweep: Path) -> None:
    report = summarize(collect_runs([sweep]))
    cell = report.cells[(40, "scratch", "f1")]
    assert cell.n == 3
    assert cell.mean == pytest.approx(0.5)
    assert cell.std == pytest.approx(np.std([0.4, 0.5, 0.6], ddof=1))
    assert report.cells[(80, "pretrained", "f1")].mean == pytest.approx(0.71)
    assert report.cells[(80, "scratch", "f1")].n == 2  # the failed fold is not averaged
    assert report.sizes == [40, 80]


def test_failed_and_missing_runs_are_listed_by_name(sweep: Path) -> None:
    report = summarize(collect_runs([sweep]))
    assert [r.name for r in report.failed] == ["scratch/size80/fold2/seed0"]
    assert [r.name for r in report.missing] == ["pretrained/size80/fold2/seed0"]
    text = to_markdown(report)
    assert "Failed runs (1" in text and "scratch/size80/fold2/seed0: RuntimeError: boom" in text
    assert "Missing runs (1" in text and "pretrained/size80/fold2/seed0" in text


def test_paired_difference_uses_only_folds_both_inits_completed(sweep: Path) -> None:
    report = summarize(collect_runs([sweep]))
    pair40 = report.paired[(40, "pretrained", "scratch", "f1")]
    assert pair40.n == 3
    assert pair40.mean == pytest.approx(0.1)
    assert pair40.p_value is None  # a constant difference: no t-test, no invented p
    assert "zero variance" in pair40.p_note
    pair80 = report.paired[(80, "pretrained", "scratch", "f1")]
    assert pair80.n == 2
    assert pair80.mean == pytest.approx(((0.70 - 0.55) + (0.72 - 0.65)) / 2)
    assert 0.0 < pair80.p_value < 1.0


def test_orphan_hydra_run_dir_without_results_is_missing(sweep: Path) -> None:
    orphan = sweep / "multirun" / "7"
    (orphan / ".hydra").mkdir(parents=True)
    (orphan / ".hydra" / "config.yaml").write_text("seed: 0\n")
    (orphan / ".hydra" / "overrides.yaml").write_text(
        "- init=scratch\n- data.labeled_size=40\n- data.fold=9\n"
    )
    report = summarize(collect_runs([sweep]))
    names = [r.name for r in report.missing]
    assert "multirun/7" in names


def test_last_checkpoint_metrics_can_be_reported(tmp_path: Path) -> None:
    _write_run(tmp_path, "scratch", 40, 0, 0.3, last_f1=0.9)
    _write_run(tmp_path, "scratch", 40, 1, 0.5, last_f1=0.7)
    best = summarize(collect_runs([tmp_path], checkpoint="best"), checkpoint="best")
    last = summarize(collect_runs([tmp_path], checkpoint="last"), checkpoint="last")
    assert best.cells[(40, "scratch", "f1")].mean == pytest.approx(0.4)
    assert last.cells[(40, "scratch", "f1")].mean == pytest.approx(0.8)
    assert math.isnan(best.cells[(40, "scratch", "f1")].std) is False


def test_another_selection_is_reported_from_metrics_by_selection(tmp_path: Path) -> None:
    def by_selection(f1: float) -> dict:
        metrics = {"test/seg_precision": 0.5, "test/seg_recall": 0.8, "test/seg_f1": f1}
        return {"val_loss": {"step": 100, "metrics": metrics}}

    _write_run(tmp_path, "scratch", 40, 0, 0.3, selection="val_f1",
               metrics_by_selection=by_selection(0.6))  # fmt: skip
    _write_run(tmp_path, "scratch", 40, 1, 0.5, selection="val_f1",
               metrics_by_selection=by_selection(0.8))  # fmt: skip
    own = summarize(collect_runs([tmp_path], checkpoint="val_f1"), checkpoint="val_f1")
    other = summarize(collect_runs([tmp_path], checkpoint="val_loss"), checkpoint="val_loss")
    assert own.cells[(40, "scratch", "f1")].mean == pytest.approx(0.4)  # the run's own selection
    assert other.cells[(40, "scratch", "f1")].mean == pytest.approx(0.7)
    assert other.selections == {"val_loss": 2}
    _write_run(
        tmp_path, "scratch", 40, 2, 0.5, selection="val_f1"
    )  # trained without the comparison
    with pytest.raises(
        ReportError, match=r"no metrics_by_selection\['val_loss'\].*compare_selections"
    ):
        collect_runs([tmp_path], checkpoint="val_loss")


def test_cli_writes_table_csv_and_plot(sweep: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "report_out"
    assert main([str(sweep), "--out", str(out), "--paper"]) == 0
    printed = capsys.readouterr().out
    table_rows = [line for line in printed.splitlines() if re.match(r"\| \d+ \|", line)]
    assert [row.split("|")[1].strip() for row in table_rows] == ["80", "40"]
    assert f"{PAPER_TABLE[40]['pretrained']['f1']:.2f}" in (out / "table.md").read_text()
    rows = list(csv.DictReader((out / "table.csv").open()))
    f1_40 = [
        r
        for r in rows
        if r["labeled_size"] == "40" and r["init"] == "scratch" and r["metric"] == "f1"
    ]
    assert float(f1_40[0]["mean"]) == pytest.approx(0.5)
    assert (out / "f1_vs_labels.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # written atomically: only the three outputs, no temp left beside them
    assert sorted(p.name for p in out.iterdir()) == ["f1_vs_labels.png", "table.csv", "table.md"]


def test_no_completed_runs_is_an_error(tmp_path: Path, capsys) -> None:
    _write_run(tmp_path, "scratch", 40, 0, 0.0, status="failed")
    with pytest.raises(ReportError, match="no completed fine-tuning run"):
        summarize(collect_runs([tmp_path]))
    assert main([str(tmp_path)]) == 1
    assert "no completed fine-tuning run" in capsys.readouterr().err


def test_missing_sweep_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match=r"nope does not exist"):
        collect_runs([tmp_path / "nope"])


@pytest.fixture()
def new_sweep(tmp_path: Path) -> Path:
    """Size 40 × 3 folds × 2 inits with the issue-9 fields: selection, steps, collapse, baseline.

    scratch: F1 .4/.5/.0 (fold 2 collapsed: recall 0, flag absent → derived), steps last 400/400/300;
    pretrained: F1 .6/.7/.8, selected 100/200/300, last 400; fold 2 flagged collapsed although its
    recall is not 0 (the recorded flag wins); baseline .63 on every run; one pretrained fold 3
    interrupted.
    """
    for fold, (f1, recall, last) in enumerate([(0.4, 0.8, 400), (0.5, 0.8, 400), (0.0, 0.0, 300)]):
        _write_run(tmp_path, "scratch", 40, fold, f1, recall=recall, selection="val_f1",
                   steps={"selected": None, "last": last}, baseline=0.63)  # fmt: skip
    for fold, f1 in enumerate([0.6, 0.7, 0.8]):
        _write_run(tmp_path, "pretrained", 40, fold, f1, selection="val_loss",
                   steps={"selected": 100 * (fold + 1), "last": 400}, collapsed=fold == 2,
                   baseline=0.63)  # fmt: skip
    _write_run(tmp_path, "pretrained", 40, 3, 0.9, status="interrupted", error=None)
    return tmp_path


def test_collapsed_runs_are_counted_per_cell_and_listed_by_name(new_sweep: Path) -> None:
    report = summarize(collect_runs([new_sweep]))
    assert report.cells[(40, "scratch", "f1")].collapsed == 1
    assert report.cells[(40, "pretrained", "recall")].collapsed == 1
    assert report.cells[(40, "scratch", "f1")].mean == pytest.approx(0.3)  # averaged, visibly
    assert sorted(r.name for r in report.collapsed) == [
        "pretrained/size40/fold2/seed0",
        "scratch/size40/fold2/seed0",
    ]
    text = to_markdown(report)
    assert "30.0 ± 26.5 (n=3, 1 collapsed)" in text
    assert "Collapsed runs (2" in text and "- scratch/size40/fold2/seed0" in text


def test_interrupted_runs_are_listed_not_averaged(new_sweep: Path) -> None:
    report = summarize(collect_runs([new_sweep]))
    assert [r.name for r in report.interrupted] == ["pretrained/size40/fold3/seed0"]
    assert report.cells[(40, "pretrained", "f1")].n == 3
    assert report.failed == []
    # the grid expects a scratch fold 3 beside the interrupted pretrained one
    assert [r.name for r in report.missing] == ["scratch/size40/fold3/seed0"]
    text = to_markdown(report)
    assert "Interrupted runs (1, not averaged):" in text
    assert "- pretrained/size40/fold3/seed0: stopped before the end" in text


def test_selection_steps_and_baseline_are_shown(new_sweep: Path) -> None:
    report = summarize(collect_runs([new_sweep]))
    assert report.selections == {"val_f1": 3, "val_loss": 3}
    assert report.steps[(40, "scratch")].selected is None
    assert report.steps[(40, "scratch")].last == 400  # median of 400, 400, 300
    assert report.steps[(40, "pretrained")].selected == 200
    assert report.baseline[40].mean == pytest.approx(0.63) and report.baseline[40].n == 6
    text = to_markdown(report)
    assert "Checkpoint selection: val_f1 (3 runs), val_loss (3 runs)." in text
    assert "- 40: scratch – / 400, pretrained 200 / 400" in text
    header = text.splitlines()[0]
    assert "All-tumour baseline F1 (%)" in header
    row = next(line for line in text.splitlines() if line.startswith("| 40 |"))
    assert row.split("|")[-2].strip() == "63.0 ± 0.0 (n=6)"


def test_csv_has_selection_steps_collapse_and_baseline_rows(
    new_sweep: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    assert main([str(new_sweep), "--out", str(out)]) == 0
    rows = list(csv.DictReader((out / "table.csv").open()))
    by = {(r["init"], r["metric"]): r for r in rows}
    assert by[("scratch", "f1")]["selection"] == "val_f1"
    assert by[("scratch", "f1")]["median_last_step"] == "400"
    assert by[("scratch", "f1")]["median_selected_step"] == ""
    assert by[("pretrained", "f1")]["median_selected_step"] == "200"
    assert by[("pretrained", "f1")]["collapsed"] == "1"
    assert float(by[("all_tumour_baseline", "f1")]["mean"]) == pytest.approx(0.63)


def test_last_checkpoint_report_says_last_and_derives_collapse_from_it(tmp_path: Path) -> None:
    # selected checkpoint fine (recall .8), flagged not collapsed; the last one has recall 0
    for fold in range(2):
        run = _write_run(tmp_path, "scratch", 40, fold, 0.5, selection="val_f1", collapsed=False)
        result = json.loads((run / "results.json").read_text())
        result["metrics_last"]["test/seg_recall"] = 0.0 if fold == 0 else 0.7
        (run / "results.json").write_text(json.dumps(result))
    best = summarize(collect_runs([tmp_path], checkpoint="best"), checkpoint="best")
    last = summarize(collect_runs([tmp_path], checkpoint="last"), checkpoint="last")
    assert best.collapsed == []
    assert [r.name for r in last.collapsed] == ["scratch/size40/fold0/seed0"]
    assert "Checkpoint: the last one (metrics_last) of every run." in to_markdown(last)


def test_older_results_without_the_new_fields_still_report(sweep: Path) -> None:
    report = summarize(collect_runs([sweep]))
    text = to_markdown(report)
    assert "All-tumour baseline" not in text
    assert "Median optimizer step" not in text
    assert "Checkpoint selection: not recorded (10 runs)." in text
    assert report.collapsed == []


def test_zero_variance_difference_prints_n_a_and_why(sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main([str(sweep), "--out", str(out)]) == 0
    text = (out / "table.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| 40 |"))
    assert "+10.0 (p=n/a, n=3)" in row
    assert "p = n/a at 40: the 3 paired differences are all equal (zero variance)" in text
    rows = list(csv.DictReader((out / "table.csv").open()))
    diff = next(r for r in rows if r["init"] == "pretrained-scratch" and r["labeled_size"] == "40"
                and r["metric"] == "f1")  # fmt: skip
    assert diff["p_value"] == "" and "zero variance" in diff["p_note"]
