"""Tests of lymphnode.tasks.lifecycle: a run's identity (the resolved config's fingerprint), skip /
resume / refuse naming every changed key, forced retrains, signal-stopped runs and fine-tuning
from an unfinished pretraining (issue 19 part 2, issue 21 rows 3 and 7).

Runs are the tiny in-process ones of :mod:`tiny_runs` (2 optimizer steps, a width-4 UNet).
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from tiny_runs import FINETUNE, RECORDER, TINY, compose_train, run, write_caches

from lymphnode.core.boundary import RunInterrupted
from lymphnode.core.errors import ConfigError
from lymphnode.tasks.lifecycle import (
    RESULT_NEUTRAL_KEYS,
    resolved_config,
    run_fingerprint,
    train,
)
from lymphnode.train import read_results, write_results

STEPS = ("trainer.max_steps=2", "trainer.max_epochs=-1", "trainer.val_check_interval=2")


@pytest.fixture(scope="module")
def caches(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_caches(tmp_path_factory.mktemp("caches"))


def attempt(root: Path, caches: Path, *overrides: str, experiment: str) -> object:
    """``train()`` of a tiny run that may be refused: its return value or the exception."""
    cfg = compose_train(f"experiment={experiment}", f"paths.root={root}",
                        f"paths.cache_dir={caches}", *TINY, *FINETUNE, *overrides)  # fmt: skip
    try:
        return train(cfg)
    except Exception as err:
        return err


def run_dir(root: Path) -> Path:
    return root / "runs" / "scratch" / "size10" / "fold0" / "seed0"


# --- identity -----------------------------------------------------------------------------------
def test_the_fingerprint_ignores_result_neutral_keys_only() -> None:
    base = resolved_config(compose_train("experiment=scratch", "paths.root=/r"))
    neutral = resolved_config(compose_train(
        "experiment=scratch", "paths.root=/r", "logger=none", "~callbacks.lr_monitor",
        "callbacks.progress_bar.refresh_rate=0", "data.pin_memory=true", "rerun=force",
        "trainer.enable_model_summary=false",
    ))  # fmt: skip
    assert run_fingerprint(neutral) == run_fingerprint(base)
    # data.num_workers counts: 0 vs 2 workers gave val/loss 0.72837 vs 0.72839 (4 tiny steps)
    for override in ("trainer.max_steps=60", "task.pretrained_lr_scale=0.1", "model=smp_unet",
                     "task.optimizer.lr=0.05", "paths.cache_dir=/elsewhere",
                     "data.num_workers=0"):  # fmt: skip
        other = resolved_config(compose_train("experiment=scratch", "paths.root=/r", override))
        assert run_fingerprint(other) != run_fingerprint(base), override
    assert "logger" in RESULT_NEUTRAL_KEYS and "trainer.max_steps" not in RESULT_NEUTRAL_KEYS


@pytest.mark.parametrize(
    ("overrides", "arm"),
    [
        ((), "scratch"),
        (("model=smp_unet",), "scratch@smpunet"),
        (("method=semi",), "scratch+semi"),
        (("++task.semi.weight=1",), "scratch+semi"),  # derived: semi-supervised settings are set
        (("experiment=finetune", "model=smp_unet", "pretext=masked", "method=semi"),
         "pretrained-masked@smpunet+semi"),
    ],
)  # fmt: skip
def test_run_folders_name_the_network_and_method_of_their_arm(
    overrides: tuple[str, ...], arm: str
) -> None:
    cfg = compose_train("experiment=scratch", "paths.root=/r", *overrides)
    assert cfg.run_dir == f"/r/runs/{arm}/size40/fold0/seed0"


def test_a_network_fine_tunes_from_its_own_pretraining_folder() -> None:
    pretrain = compose_train("experiment=pretrain", "paths.root=/r", "model=smp_unet")
    finetune = compose_train("experiment=finetune", "paths.root=/r", "model=smp_unet")
    assert pretrain.run_dir == "/r/runs/pretrain@smpunet"
    assert finetune.pretrained_ckpt == "/r/runs/pretrain@smpunet/checkpoints/best.ckpt"
    paper = compose_train("experiment=finetune", "paths.root=/r")
    assert paper.pretrained_ckpt == "/r/runs/pretrain/checkpoints/best.ckpt"  # unchanged


def test_a_method_that_cannot_name_a_folder_is_refused() -> None:
    cfg = compose_train("experiment=scratch", "paths.root=/r", "method='a/b'")
    with pytest.raises(Exception, match=r"method='a/b' cannot name a run folder"):
        str(cfg.run_dir)


# --- rerun: skip / refuse / force ---------------------------------------------------------------
def test_a_rerun_skips_the_same_config_and_refuses_another_naming_every_changed_key(
    tmp_path: Path, caches: Path
) -> None:
    value, first = run(tmp_path, caches, *STEPS)
    assert first["status"] == "completed", first["error"]
    assert first["fingerprint"] == run_fingerprint(first["config"])
    path = run_dir(tmp_path) / "results.json"
    before = path.read_bytes()
    # the same config, and changes that cannot change results: skipped, the recorded metric
    again, _ = run(tmp_path, caches, *STEPS, "callbacks.progress_bar.refresh_rate=5")
    assert again == value and path.read_bytes() == before
    # another config: refused before anything is written, naming every changed key
    refused, _ = run(tmp_path, caches, *STEPS, "trainer.max_steps=3", "task.optimizer.lr=0.05")
    assert isinstance(refused, ConfigError)
    message = str(refused)
    assert f"{path} was made with another config" in message
    assert "task.optimizer.lr: 0.001 → 0.05" in message
    assert "trainer.max_steps: 2 → 3" in message
    assert "rerun=force" in message
    assert path.read_bytes() == before


def test_a_forced_rerun_trains_again_and_records_what_it_replaced(
    tmp_path: Path, caches: Path
) -> None:
    _, first = run(tmp_path, caches, *STEPS)
    stale = run_dir(tmp_path) / "checkpoints" / "best-val_loss.ckpt"  # another selection's file
    stale.write_bytes(b"old")
    _, forced = run(tmp_path, caches, *STEPS, "trainer.max_steps=3", "rerun=force")
    assert not stale.exists()  # the replaced run's checkpoints are not mistaken for this one's
    assert forced["status"] == "completed", forced["error"]
    assert forced["steps"]["last"] == 3 and forced["config"]["trainer"]["max_steps"] == 3
    assert forced["replaced"] == {
        "status": "completed",
        "fingerprint": first["fingerprint"],
        "changes": ["trainer.max_steps: 2 → 3"],
    }
    assert forced["fingerprint"] != first["fingerprint"]


def test_continuing_a_run_with_ckpt_path_may_change_its_budget_only(
    tmp_path: Path, caches: Path
) -> None:
    run(tmp_path, caches, *STEPS)
    refused, _ = run(tmp_path, caches, *STEPS, "ckpt_path=last", "trainer.max_steps=4",
                     "task.optimizer.lr=0.05")  # fmt: skip
    assert isinstance(refused, ConfigError) and "task.optimizer.lr: 0.001 → 0.05" in str(refused)
    assert "trainer.max_steps" not in str(refused)
    _, longer = run(tmp_path, caches, *STEPS, "ckpt_path=last", "trainer.max_steps=4")
    assert longer["status"] == "completed", longer["error"]
    assert longer["resumed"]["step"] == 2 and longer["steps"]["last"] == 4


def test_a_failed_run_trains_again_with_a_changed_config(tmp_path: Path, caches: Path) -> None:
    path = run_dir(tmp_path) / "results.json"
    cfg = compose_train("experiment=scratch", f"paths.root={tmp_path}", "data.labeled_size=10")
    write_results(path, {"status": "failed", "error": "NonFiniteLossError: nan",
                         "config": {**resolved_config(cfg), "seed": 5}})  # fmt: skip
    _, results = run(tmp_path, caches, *STEPS)
    assert results["status"] == "completed", results["error"]
    assert results["replaced"]["status"] == "failed"
    assert "seed: 5 → 0" in results["replaced"]["changes"]


# --- signals (issue 21 row 3) -------------------------------------------------------------------
def test_a_sigterm_stopped_run_raises_run_interrupted_with_exit_code_143(
    tmp_path: Path, caches: Path
) -> None:
    outcome, results = run(tmp_path, caches, "trainer.max_steps=6", "trainer.max_epochs=-1",
                           "trainer.val_check_interval=2", RECORDER,
                           "+callbacks.recorder.sigterm_at=2")  # fmt: skip
    assert isinstance(outcome, RunInterrupted), outcome
    assert outcome.signum == signal.SIGTERM and outcome.exit_code == 143
    assert results["status"] == "interrupted" and results["steps"]["last"] == 2
    assert results["budget"]["stopped_by"] == "sigterm"


def _pretraining(root: Path, caches: Path, status: str) -> Path:
    """A tiny completed pretraining under ``root``, its record's status then set to ``status``."""
    _, results = run(root, caches, *STEPS, experiment="pretrain")
    assert results["status"] == "completed", results["error"]
    path = root / "runs" / "pretrain" / "results.json"
    write_results(path, {**results, "status": status, "error": f"{status} at step 1"})
    return path


def test_fine_tuning_refuses_an_interrupted_pretraining_unless_told(
    tmp_path: Path, caches: Path
) -> None:
    record = _pretraining(tmp_path, caches, "interrupted")
    refused = attempt(tmp_path, caches, *STEPS, experiment="finetune")
    assert isinstance(refused, ConfigError)
    assert f"its pretraining run {record.parent} is 'interrupted'" in str(refused)
    assert "pretrained_unfinished_ok=true" in str(refused)
    assert not list((tmp_path / "runs").rglob("pretrained*/**/results.json"))  # nothing written
    _, results = run(tmp_path, caches, *STEPS, "pretrained_unfinished_ok=true",
                     experiment="finetune")  # fmt: skip
    assert results["status"] == "completed", results["error"]
    assert results["pretraining"]["status"] == "interrupted"
    # a completed pretraining is recorded with its fingerprint
    completed = json.loads(record.read_text())
    write_results(record, {**completed, "status": "completed"})
    _, forced = run(tmp_path, caches, *STEPS, "rerun=force", experiment="finetune")
    assert forced["pretraining"] == {"run_dir": str(record.parent), "status": "completed",
                                     "fingerprint": completed["fingerprint"]}  # fmt: skip


def test_a_corrupt_pretraining_record_is_refused_naming_it(tmp_path: Path, caches: Path) -> None:
    record = _pretraining(tmp_path, caches, "completed")
    record.write_text("{trunc")
    refused = attempt(tmp_path, caches, *STEPS, experiment="finetune")
    assert isinstance(refused, ConfigError) and str(record) in str(refused)
    assert read_results(record) is None


def test_an_older_record_without_the_keys_added_since_is_still_the_same_run(
    tmp_path: Path, caches: Path
) -> None:
    """A record written before ``method`` (and the fingerprint) existed: the rerun skips it
    (a key added with a null default keeps the old behaviour), it is not refused."""
    value, first = run(tmp_path, caches, *STEPS)
    path = run_dir(tmp_path) / "results.json"
    older = {k: v for k, v in first.items() if k != "fingerprint"}
    older["config"] = {k: v for k, v in first["config"].items() if k != "method"}
    write_results(path, older)
    before = path.read_bytes()
    again, _ = run(tmp_path, caches, *STEPS)
    assert again == value and path.read_bytes() == before
