"""Checkpoint selection (lymphnode.tasks.checkpointing): last.ckpt is the final step, best.ckpt is
what ``selection`` picks, results.json records both steps, the selection and collapse."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_runs import (
    FINETUNE,
    RECORDER,
    STEPS_PER_EPOCH,
    TINY,
    Recorder,
    compose_train,
    run,
    write_caches,
)

from lymphnode.core.errors import ConfigError
from lymphnode.tasks.checkpointing import SelectionCheckpoint, check_selection, is_better
from lymphnode.train import train


@pytest.fixture(scope="module")
def caches(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_caches(tmp_path_factory.mktemp("caches"))


def _step_and_epoch(path: str | Path) -> tuple[int, int]:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return ckpt["global_step"], ckpt["epoch"]


# --- input checks --------------------------------------------------------------------------------
def test_unknown_selection_is_rejected_naming_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"selection='best' is not supported; expected one of "
                       r"\['val_f1', 'val_loss', 'last'\]"):  # fmt: skip
        check_selection("best")
    with pytest.raises(ConfigError, match=r"selection='f1' is not supported"):
        SelectionCheckpoint(dirpath="unused", selection="f1")


def test_pretraining_refuses_f1_selection() -> None:
    with pytest.raises(
        ConfigError, match=r"selection='val_f1' needs val/seg_f1, which pretraining"
    ):
        check_selection("val_f1", "pretrain")
    assert check_selection("val_loss", "pretrain") == "val_loss"


def test_bad_selection_is_refused_before_the_run_writes_anything(
    tmp_path: Path, caches: Path
) -> None:
    cfg = compose_train("experiment=scratch", f"paths.root={tmp_path}",
                        f"paths.cache_dir={caches}", *TINY, *FINETUNE, "selection=median")  # fmt: skip
    with pytest.raises(ConfigError, match="selection='median'"):
        train(cfg)
    assert not list(tmp_path.rglob("results.json"))


def test_is_better_is_strict_and_never_picks_nan() -> None:
    assert is_better(0.6, 0.5, "max") and not is_better(0.5, 0.5, "max")
    assert is_better(0.4, 0.5, "min") and not is_better(0.6, 0.5, "min")
    assert not is_better(float("nan"), 0.5, "max") and is_better(0.1, None, "max")


# --- last.ckpt -----------------------------------------------------------------------------------
def test_last_ckpt_is_the_final_step_also_between_validations(tmp_path: Path, caches: Path) -> None:
    # 7 steps, validation every 3: Lightning alone leaves last.ckpt at step 3 or 6.
    outcome, results = run(tmp_path, caches, "trainer.max_steps=7", "trainer.val_check_interval=3")
    assert not isinstance(outcome, BaseException), results["error"]
    run_dir = tmp_path / "runs" / "scratch" / "size10" / "fold0" / "seed0"
    step, epoch = _step_and_epoch(run_dir / "checkpoints" / "last.ckpt")
    # 2 steps per epoch: step 7 is the first of the 4th epoch (0-based epoch 3)
    assert step == 7 and epoch == (7 - 1) // STEPS_PER_EPOCH == 3
    assert results["steps"]["last"] == 7
    best_step, _ = _step_and_epoch(run_dir / "checkpoints" / "best.ckpt")
    assert results["steps"]["selected"] == best_step and best_step in (3, 6, 7)


# --- selection -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("selection", "key", "pick"), [("val_f1", "val/seg_f1", max),
                                                         ("val_loss", "val/loss", min)])  # fmt: skip
def test_selection_picks_the_best_validation_including_the_final_step(
    tmp_path: Path, caches: Path, selection: str, key: str, pick: object
) -> None:
    outcome, results = run(
        tmp_path, caches, f"selection={selection}", "trainer.max_steps=9",
        "trainer.val_check_interval=2", RECORDER,
    )  # fmt: skip
    assert not isinstance(outcome, BaseException), results["error"]
    assert results["selection"] == selection
    scores = {step: m[key] for step, m in Recorder.validations}  # steps 2, 4, 6, 8
    assert sorted(scores) == [2, 4, 6, 8]
    scores[9] = results["metrics_last"][key]  # the final step is a candidate too
    best = pick(scores.values())  # type: ignore[operator]
    expected = min(step for step, value in scores.items() if value == best)  # ties: earliest
    assert results["steps"]["selected"] == expected
    assert results["metrics"][key] == pytest.approx(scores[expected], abs=1e-6)
    best_ckpt = Path(results["checkpoints"]["best"])
    assert best_ckpt.name == "best.ckpt" and _step_and_epoch(best_ckpt)[0] == expected


def test_selection_last_reports_the_final_step(tmp_path: Path, caches: Path) -> None:
    outcome, results = run(
        tmp_path, caches, "selection=last", "trainer.max_steps=5", "trainer.val_check_interval=2"
    )
    assert not isinstance(outcome, BaseException), results["error"]
    assert results["selection"] == "last"
    assert results["steps"] == {"selected": 5, "last": 5}
    assert results["metrics"] == results["metrics_last"]
    assert _step_and_epoch(results["checkpoints"]["best"])[0] == 5  # best.ckpt = the selected one


# --- collapse ------------------------------------------------------------------------------------
def test_a_run_that_predicts_no_tumour_is_flagged_collapsed(tmp_path: Path, caches: Path) -> None:
    # threshold 0.999: no pixel of a barely trained network is called tumour -> test recall 0
    outcome, results = run(tmp_path, caches, "trainer.max_steps=2", "task.threshold=0.999")
    assert not isinstance(outcome, BaseException), results["error"]
    assert results["metrics"]["test/seg_recall"] == 0.0
    assert results["collapsed"] is True and results["status"] == "completed"


def test_a_run_that_predicts_tumour_is_not_collapsed(tmp_path: Path, caches: Path) -> None:
    outcome, results = run(tmp_path, caches, "trainer.max_steps=2", "task.threshold=0.001")
    assert not isinstance(outcome, BaseException), results["error"]
    assert results["metrics"]["test/seg_recall"] > 0.0
    assert results["collapsed"] is False


def test_pretraining_records_val_loss_selection_and_is_never_collapsed(
    tmp_path: Path, caches: Path
) -> None:
    outcome, results = run(
        tmp_path, caches, "trainer.max_steps=3", "trainer.max_epochs=-1", experiment="pretrain"
    )
    assert not isinstance(outcome, BaseException), results["error"]
    assert results["selection"] == "val_loss" and results["collapsed"] is False
    assert results["steps"]["last"] == 3
    assert _step_and_epoch(Path(results["checkpoints"]["last"]))[0] == 3


def test_compare_selections_reports_what_each_selection_would_have_picked(
    tmp_path: Path, caches: Path
) -> None:
    budget = ("trainer.max_steps=9", "trainer.val_check_interval=2")
    outcome, results = run(
        tmp_path / "both", caches, "selection=val_f1", "compare_selections=[val_loss,last,val_f1]",
        *budget,
    )  # fmt: skip
    assert not isinstance(outcome, BaseException), results["error"]
    by = results["metrics_by_selection"]
    assert sorted(by) == ["last", "val_f1", "val_loss"]
    assert by["val_f1"]["metrics"] == results["metrics"]
    assert by["val_f1"]["step"] == results["steps"]["selected"]
    assert by["last"] == {"step": 9, "metrics": results["metrics_last"]}
    # the same run with selection=val_loss reports exactly what the shadow recorded for it
    outcome, alone = run(tmp_path / "alone", caches, "selection=val_loss", *budget)
    assert not isinstance(outcome, BaseException), alone["error"]
    assert by["val_loss"]["step"] == alone["steps"]["selected"]
    for key in ("test/seg_f1", "test/seg_recall", "val/loss"):
        assert by["val_loss"]["metrics"][key] == pytest.approx(alone["metrics"][key], abs=1e-6)


def test_compare_selections_must_be_a_list_of_selections(tmp_path: Path, caches: Path) -> None:
    outcome, results = run(tmp_path, caches, "compare_selections=[val_auc]")
    assert isinstance(outcome, ConfigError)
    assert "selection='val_auc' is not supported" in results["error"]
