"""Reading results.json files: new fields, their absence in older files, statuses, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lymphnode.evaluation.runs import (
    ReportError,
    arm_pretext,
    collect_runs,
    expected_missing,
    order_arms,
    scratch_of,
    split_arm,
)


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


def test_runs_of_another_network_or_method_are_their_own_arms(tmp_path: Path) -> None:
    """Issue 19: different arms never share a folder, nor a table column."""
    _write(tmp_path, "scratch/size40/fold0/seed0")
    _write(tmp_path, "scratch@smpunet/size40/fold0/seed0", network="smpunet")
    _write(tmp_path, "pretrained-masked@smpunet+semi/size40/fold0/seed0", init="pretrained",
           pretext="masked", network="smpunet", method="semi")  # fmt: skip
    _write(tmp_path, "pretrained/size40/fold0/seed0", init="pretrained", network="unet")
    arms = sorted(r.arm for r in collect_runs([tmp_path]))
    assert arms == ["pretrained", "pretrained-masked@smpunet+semi", "scratch", "scratch@smpunet"]
    assert expected_missing(collect_runs([tmp_path])) == []  # every arm has its one run


def test_arm_names_split_into_base_network_and_method() -> None:
    assert split_arm("pretrained-masked@smpunet+semi") == ("pretrained-masked", "smpunet", "semi")
    assert split_arm("scratch+semi") == ("scratch", None, "semi")
    assert arm_pretext("pretrained-dense_contrastive@vitunet") == "dense_contrastive"
    assert arm_pretext("pretrained@vitunet") == "reconstruction"
    assert arm_pretext("scratch@vitunet") is None
    assert scratch_of("pretrained-masked@smpunet") == "scratch@smpunet"
    assert order_arms(["scratch@smpunet", "pretrained-masked", "pretrained", "scratch"]) == [
        "scratch", "pretrained", "pretrained-masked", "scratch@smpunet"]  # fmt: skip


def test_a_corrupt_record_in_a_variant_folder_is_counted_in_its_own_arm(tmp_path: Path) -> None:
    _write(tmp_path, "scratch@smpunet/size40/fold1/seed0", network="smpunet")
    (tmp_path / "scratch@smpunet/size40/fold1/seed0/results.json").write_text("{trunc")
    (run,) = collect_runs([tmp_path])
    assert (run.status, run.arm, run.fold) == ("failed", "scratch@smpunet", 1)


def test_a_network_variant_is_compared_with_its_own_scratch_arm_and_titled_by_it(
    tmp_path: Path,
) -> None:
    from lymphnode.evaluation.table import summarize
    from lymphnode.evaluation.table_output import arm_title, csv_comparison_name

    for fold in (0, 1):
        _write(tmp_path, f"scratch/size40/fold{fold}/seed0", fold=fold)
        _write(tmp_path, f"pretrained/size40/fold{fold}/seed0", init="pretrained", fold=fold)
        _write(tmp_path, f"scratch@smpunet/size40/fold{fold}/seed0", network="smpunet", fold=fold)
        _write(tmp_path, f"pretrained@smpunet/size40/fold{fold}/seed0", init="pretrained",
               network="smpunet", fold=fold)  # fmt: skip
    report = summarize(collect_runs([tmp_path]))
    assert report.arms == ["scratch", "pretrained", "scratch@smpunet", "pretrained@smpunet"]
    assert ("pretrained@smpunet", "scratch@smpunet") in report.comparisons
    assert ("pretrained@smpunet", "scratch") not in report.comparisons
    assert arm_title(report, "scratch@smpunet") == "Without pretraining (@smpunet)"
    assert csv_comparison_name("pretrained@smpunet", "scratch@smpunet") == (
        "reconstruction-scratch@smpunet"
    )
