"""Training budgets (lymphnode.tasks.budget): optimizer steps by default, equal for every labeled
size and init; validation every N steps across short epochs; the cosine schedule ends at the last
step; runs stopped by max_time or SIGTERM before their budget are ``interrupted``."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from pytorch_lightning.utilities.exceptions import SIGTERMException
from tiny_runs import RECORDER, STEPS_PER_EPOCH, Recorder, compose_train, run, write_caches

from lymphnode.core.boundary import RunInterrupted
from lymphnode.tasks.budget import is_interrupted


@pytest.fixture(scope="module")
def caches(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_caches(tmp_path_factory.mktemp("caches"))


# --- the configured budgets ----------------------------------------------------------------------
@pytest.mark.parametrize("profile", [(), ("profile=demo",)], ids=["full", "demo"])
def test_every_size_and_init_gets_the_same_step_budget(profile: tuple[str, ...]) -> None:
    budgets = set()
    for experiment in ("finetune", "scratch"):
        for size in (40, 80, 120, 200):
            cfg = compose_train(f"experiment={experiment}", *profile, f"data.labeled_size={size}")
            trainer = cfg.trainer
            assert trainer.max_epochs == -1 and trainer.check_val_every_n_epoch is None
            budgets.add((trainer.max_steps, trainer.val_check_interval))
    assert len(budgets) == 1
    ((max_steps, every),) = budgets
    assert max_steps > 0 and 0 < every <= max_steps and max_steps % every == 0


def test_pretraining_budget_is_epochs_or_the_demo_steps() -> None:
    full = compose_train("experiment=pretrain")
    assert (full.trainer.max_epochs, full.trainer.max_steps) == (20, -1)
    demo = compose_train("experiment=pretrain", "profile=demo")
    assert demo.trainer.max_steps > 0 and demo.trainer.max_epochs == -1
    # the demo's faster fine-tuning LR does not leak into pretraining
    assert demo.task.optimizer.lr == full.task.optimizer.lr == 1e-3
    finetune = compose_train("experiment=finetune", "profile=demo")
    assert finetune.task.optimizer.lr == finetune.demo_budget.finetune.lr


def test_table_sweep_keeps_one_budget() -> None:
    cfg = compose_train("experiment=table", "profile=demo")
    demo = compose_train("experiment=scratch", "profile=demo")
    assert cfg.trainer.max_steps == demo.trainer.max_steps


# --- runs ----------------------------------------------------------------------------------------
def test_step_budget_is_reached_whatever_the_labeled_size(tmp_path: Path, caches: Path) -> None:
    steps = {}
    for size in (10, 20):  # 8 vs 16 training patches: 2 vs 4 batches per epoch
        outcome, results = run(
            tmp_path, caches, f"data.labeled_size={size}", "trainer.max_steps=6",
            "trainer.val_check_interval=3",
        )  # fmt: skip
        assert not isinstance(outcome, BaseException), results["error"]
        assert results["status"] == "completed"
        assert results["budget"]["stopped_by"] == "max_steps"
        steps[size] = results["steps"]["last"]
    assert steps == {10: 6, 20: 6}


def test_validation_every_n_steps_across_epochs_shorter_than_n(
    tmp_path: Path, caches: Path
) -> None:
    # 2 batches per epoch, validation every 3 steps: it must not wait for an epoch boundary
    outcome, results = run(
        tmp_path, caches, "trainer.max_steps=9", "trainer.val_check_interval=3", RECORDER
    )
    assert not isinstance(outcome, BaseException), results["error"]
    assert STEPS_PER_EPOCH < 3
    assert [step for step, _ in Recorder.validations] == [3, 6, 9]
    assert Recorder.steps == list(range(1, 10))
    assert results["budget"]["max_steps"] == 9 and results["budget"]["val_check_interval"] == 3


def test_cosine_schedule_ends_at_the_last_step(tmp_path: Path, caches: Path) -> None:
    outcome, results = run(
        tmp_path, caches, "trainer.max_steps=6", "trainer.val_check_interval=3", RECORDER,
        constant_lr=False,  # the configured cosine
    )  # fmt: skip
    assert not isinstance(outcome, BaseException), results["error"]
    lrs = Recorder.lrs  # the LR each of the 6 optimizer steps trains with
    assert len(lrs) == 6 and lrs[-1] == pytest.approx(0.0, abs=1e-12)  # eta_min at the last step
    assert lrs[0] > lrs[1]  # the first step trains at the configured (maximum) LR
    assert all(a > b for a, b in itertools.pairwise(lrs))  # decreases every step, within epochs too


# --- interruptions -------------------------------------------------------------------------------
def test_max_time_before_the_step_budget_is_interrupted(tmp_path: Path, caches: Path) -> None:
    outcome, results = run(
        tmp_path, caches, "trainer.max_steps=100000", "+trainer.max_time=00:00:00:03"
    )
    assert not isinstance(outcome, BaseException), results["error"]  # evaluated, not raised
    assert results["status"] == "interrupted"
    assert results["budget"]["stopped_by"] == "max_time"
    assert results["budget"]["max_time_s"] == 3.0
    reached = results["steps"]["last"]
    assert 0 < reached < 100000 and f"at step {reached}" in results["error"]
    last = torch.load(results["checkpoints"]["last"], map_location="cpu", weights_only=True)
    assert last["global_step"] == reached
    assert "test/seg_f1" in results["metrics"]


def test_max_time_as_the_only_budget_completes(tmp_path: Path, caches: Path) -> None:
    outcome, results = run(
        tmp_path, caches, "trainer.max_steps=-1", "trainer.max_epochs=-1",
        "+trainer.max_time=00:00:00:03",
    )  # fmt: skip
    assert not isinstance(outcome, BaseException), results["error"]
    assert results["status"] == "completed" and results["budget"]["stopped_by"] == "max_time"


def test_sigterm_is_interrupted_with_the_step_reached(tmp_path: Path, caches: Path) -> None:
    outcome, results = run(
        tmp_path, caches, "trainer.max_steps=50", "trainer.val_check_interval=10",
        RECORDER, "+callbacks.recorder.sigterm_at=3",
    )  # fmt: skip
    assert isinstance(outcome, RunInterrupted) and outcome.exit_code == 143  # the CLI exits 143
    assert isinstance(outcome.__cause__, SIGTERMException)
    assert results["status"] == "interrupted" and results["steps"]["last"] == 3
    assert "interrupted (sigterm) at step 3" in results["error"]
    last = Path(results["config"]["run_dir"]) / "checkpoints" / "last.ckpt"
    assert results["checkpoints"]["last"] == str(last.resolve())  # the record names what exists
    best = results["checkpoints"]["best"]
    assert best is None or Path(best).is_file()
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 3
    # resumable: the same command (with ckpt_path=last) continues from step 3 to the budget
    outcome, resumed = run(
        tmp_path, caches, "trainer.max_steps=50", "trainer.val_check_interval=10",
        "ckpt_path=last", RECORDER, "+callbacks.recorder.sigterm_at=3",
    )  # fmt: skip
    assert not isinstance(outcome, BaseException), resumed["error"]
    assert resumed["status"] == "completed" and resumed["steps"]["last"] == 50
    assert Recorder.steps[0] == 4


def test_interrupted_means_short_of_a_step_or_epoch_budget() -> None:
    assert is_interrupted("sigterm", {"max_steps": None, "max_epochs": None})
    assert is_interrupted("max_time", {"max_steps": 100, "max_epochs": None})
    assert not is_interrupted("max_time", {"max_steps": None, "max_epochs": None})
    assert not is_interrupted("max_steps", {"max_steps": 100, "max_epochs": None})
