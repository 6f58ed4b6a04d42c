"""A run's training budget and why it stopped: the facts results.json records about them.

A budget is ``trainer.max_steps`` (optimizer steps, the default for fine-tuning: the same for every
labeled size and init), ``trainer.max_epochs`` or ``trainer.max_time`` (wall time). A run that
reached its step/epoch budget, or whose only budget was wall time, completed; one that wall time
or a signal stopped before its step/epoch budget was interrupted (resume it with
``ckpt_path=last``).
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import EarlyStopping, Timer

# why fit ended: the budget, an early stop, or an interruption
STOP_REASONS = ("max_steps", "max_epochs", "max_time", "early_stopping", "should_stop", "sigterm")
INTERRUPTIONS = ("sigterm", "keyboard_interrupt")


def _limit(value: Any) -> int | None:
    """A Lightning step/epoch limit as an int, None when unlimited (None or -1)."""
    return None if value is None or int(value) < 0 else int(value)


def budget_of(trainer: pl.Trainer) -> dict[str, Any]:
    """``{"max_steps", "max_epochs", "max_time_s", "val_check_interval"}`` as the trainer runs
    them: optimizer steps, epochs and seconds (None = unlimited), validation interval (an int:
    every N training batches; a float: that fraction of an epoch)."""
    timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)  # type: ignore[attr-defined]
    duration = None if timer is None else timer._duration  # seconds, from trainer.max_time
    return {
        "max_steps": _limit(trainer.max_steps),
        "max_epochs": _limit(trainer.max_epochs),
        "max_time_s": duration,
        "val_check_interval": trainer.val_check_interval,
    }


def _time_is_up(trainer: pl.Trainer) -> bool:
    for callback in trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(callback, Timer) and callback._duration is not None:
            remaining = callback.time_remaining("train")
            if remaining is not None and remaining <= 0:
                return True
    return False


def stop_reason(trainer: pl.Trainer) -> str:
    """Why ``trainer.fit`` returned normally (one of :data:`STOP_REASONS`)."""
    if trainer.received_sigterm:
        return "sigterm"
    max_steps, max_epochs = _limit(trainer.max_steps), _limit(trainer.max_epochs)
    if max_steps is not None and trainer.global_step >= max_steps:
        return "max_steps"
    if max_epochs is not None and trainer.current_epoch >= max_epochs:
        return "max_epochs"
    if _time_is_up(trainer):
        return "max_time"
    stoppers = [c for c in trainer.callbacks if isinstance(c, EarlyStopping)]  # type: ignore[attr-defined]
    if any(c.stopped_epoch > 0 for c in stoppers):
        return "early_stopping"
    return "should_stop"


def is_interrupted(reason: str, budget: dict[str, Any]) -> bool:
    """Whether a run that stopped for ``reason`` fell short of its budget: a signal, or wall time
    before a step/epoch budget (with wall time as the only budget, ``max_time`` completes it)."""
    if reason in INTERRUPTIONS:
        return True
    if reason == "max_time":
        return budget.get("max_steps") is not None or budget.get("max_epochs") is not None
    return False


__all__ = ["INTERRUPTIONS", "STOP_REASONS", "budget_of", "is_interrupted", "stop_reason"]
