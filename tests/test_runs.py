"""Reading results.json files: new fields, their absence in older files, statuses, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lymphnode.evaluation.runs import ReportError, collect_runs


def _write(root: Path, name: str, **fields: object) -> None:
    run_dir = root / name
    run_dir.mkdir(parents=True)
    result = {
        "status": "completed",
        "init": "scratch",
        "labeled_size": 40,
        "fold": 0,
        "seed": 0,
        "metrics": {"test/seg_precision": 0.5, "test/seg_recall": 0.8, "test/seg_f1": 0.6},
        "metrics_last": {"test/seg_precision": 0.4, "test/seg_recall": 0.0, "test/seg_f1": 0.0},
        **fields,
    }
    (run_dir / "results.json").write_text(json.dumps(result))


def test_new_fields_are_read(tmp_path: Path) -> None:
    _write(tmp_path, "a", selection="val_loss", steps={"selected": 120, "last": 400},
           collapsed=False, metrics={"test/seg_precision": 0.5, "test/seg_recall": 0.8,
                                     "test/seg_f1": 0.6, "test/baseline_all_tumour_f1": 0.63})  # fmt: skip
    (run,) = collect_runs([tmp_path])
    assert (run.selection, run.steps_selected, run.steps_last) == ("val_loss", 120, 400)
    assert run.collapsed is False and run.baseline_f1 == pytest.approx(0.63)


def test_older_files_get_none_and_a_derived_collapse_flag(tmp_path: Path) -> None:
    _write(tmp_path, "a", metrics={"test/seg_precision": 0.0, "test/seg_recall": 0.0,
                                   "test/seg_f1": 0.0})  # fmt: skip
    (run,) = collect_runs([tmp_path])
    assert run.selection is None and run.steps_selected is None and run.steps_last is None
    assert run.baseline_f1 is None
    assert run.collapsed is True  # derived from test/seg_recall == 0


def test_last_checkpoint_is_selection_last_with_its_own_collapse(tmp_path: Path) -> None:
    _write(tmp_path, "a", selection="val_f1", collapsed=False)
    (run,) = collect_runs([tmp_path], checkpoint="last")
    assert run.selection == "last"
    assert run.metrics["f1"] == 0.0 and run.collapsed is True  # metrics_last's recall is 0


def test_interrupted_and_debug_runs_are_not_completed(tmp_path: Path) -> None:
    _write(tmp_path, "a", status="interrupted")
    _write(tmp_path, "b", status="debug")
    runs = {r.name: r for r in collect_runs([tmp_path])}
    assert runs["a"].status == "interrupted" and runs["a"].metrics == {}
    assert runs["b"].status == "failed"


def test_unknown_checkpoint_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match=r"checkpoint='middle' is not one of best, last"):
        collect_runs([tmp_path], checkpoint="middle")


def test_last_checkpoint_without_metrics_last_is_an_error(tmp_path: Path) -> None:
    _write(tmp_path, "a", metrics_last=None)
    with pytest.raises(ReportError, match="no 'metrics_last' block"):
        collect_runs([tmp_path], checkpoint="last")


@pytest.mark.parametrize("text", ["{truncated", "[0.5, 0.6]"])
def test_an_unreadable_results_json_is_a_failed_run_naming_why(tmp_path: Path, text: str) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "results.json").write_text(text)
    (run,) = collect_runs([tmp_path])
    assert run.status == "failed" and run.name == "a"
    assert run.error is not None and run.error.startswith("unreadable results.json (")
    assert "results.json is not a" in run.error
