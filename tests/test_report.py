"""The report on hand-made results.json files with known means, stds, a missing and a failed run."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from lymphnode.report import (
    PAPER_TABLE,
    ReportError,
    collect_runs,
    main,
    summarize,
    to_markdown,
)


def _write_run(root: Path, init: str, size: int, fold: int, f1: float, *, seed: int = 0,
               status: str = "completed", precision: float = 0.5, recall: float = 0.8,
               last_f1: float | None = None) -> Path:  # fmt: skip
    run_dir = root / init / f"size{size}" / f"fold{fold}" / f"seed{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics = {"test/seg_precision": precision, "test/seg_recall": recall, "test/seg_f1": f1}
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
    pair40 = report.paired[(40, "f1")]
    assert pair40.n == 3
    assert pair40.mean == pytest.approx(0.1)
    assert pair40.p_value == 0.0  # a constant positive difference
    pair80 = report.paired[(80, "f1")]
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


def test_no_completed_runs_is_an_error(tmp_path: Path, capsys) -> None:
    _write_run(tmp_path, "scratch", 40, 0, 0.0, status="failed")
    with pytest.raises(ReportError, match="no completed fine-tuning run"):
        summarize(collect_runs([tmp_path]))
    assert main([str(tmp_path)]) == 1
    assert "no completed fine-tuning run" in capsys.readouterr().err


def test_missing_sweep_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match=r"nope does not exist"):
        collect_runs([tmp_path / "nope"])
