"""Spawned DDP (``trainer.strategy=ddp_spawn``, the DDP that runs inside ``--multirun``): what a
fit leaves in the process that called it.

With a spawn-based strategy ``trainer.fit`` runs in child processes (one per device) and Lightning
sends back to the calling process only the weights, ``trainer.state``, the callback metrics and the
checkpoint callback's ``best_model_path``. Everything else that :mod:`lymphnode.train` reads after
the fit stays in the children: the checkpoint callbacks' other state (``best_model_score``,
``last_model_path``, the :class:`~lymphnode.tasks.checkpointing.ShadowSelection` bests), the fit
loop's progress (``trainer.global_step``, ``trainer.current_epoch``: why the run stopped), the
Timer's and EarlyStopping's state, and what a fine-tuning task took from its pretrained checkpoint.
Without them a 2-process run reports no ``last.ckpt``, step ``None`` and "should_stop".

:class:`FitStateLauncher` is Lightning's launcher with that state added to what rank 0 sends back;
:func:`carry_fit_state` puts it on a trainer whose strategy spawns (a no-op otherwise).
"""

from __future__ import annotations

import io
import logging
import pickle
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import ParallelStrategy
from pytorch_lightning.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from pytorch_lightning.trainer.states import TrainerFn

log = logging.getLogger(__name__)

FIT_STATE = "lymphnode_fit_state"  # keys of the extra results rank 0 sends back
MODULE_STATE = "lymphnode_module_state"
MODULE_ATTRIBUTES = ("pretrained_report",)  # task attributes set while fitting (results.json)


class FitStateLauncher(_MultiProcessingLauncher):
    """Lightning's spawn/fork launcher that also brings back, after ``fit``, rank 0's callback
    states (every callback's ``state_dict`` by ``state_key``), its fit-loop progress, the last
    step each :class:`~lymphnode.tasks.checkpointing.SelectionCheckpoint` wrote and the task's
    :data:`MODULE_ATTRIBUTES`. ``validate`` / ``test`` return what Lightning returns."""

    def get_extra_results(self, trainer: pl.Trainer) -> dict[str, Any]:
        extra = super().get_extra_results(trainer)
        if trainer.state.fn != TrainerFn.FITTING:
            return extra
        state = {
            "callbacks": {cb.state_key: cb.state_dict() for cb in trainer.callbacks},  # type: ignore[attr-defined]
            "last_steps": {
                cb.state_key: getattr(cb, "last_step", None)
                for cb in trainer.callbacks  # type: ignore[attr-defined]
            },
            "fit_loop": trainer.fit_loop.state_dict(),
        }
        buffer = io.BytesIO()
        torch.save(state, buffer)  # bytes, as Lightning sends its metrics (no shared memory)
        extra[FIT_STATE] = buffer.getvalue()
        module = trainer.lightning_module
        attributes = {n: getattr(module, n) for n in MODULE_ATTRIBUTES if hasattr(module, n)}
        # pickled here: Lightning moves the results to the CPU with apply_to_collection, which
        # rebuilds dataclasses (frozen ones fail)
        extra[MODULE_STATE] = pickle.dumps(attributes)
        return extra

    def update_main_process_results(self, trainer: pl.Trainer, extra: dict[str, Any]) -> None:
        super().update_main_process_results(trainer, extra)
        if FIT_STATE not in extra:
            return
        state = torch.load(io.BytesIO(extra[FIT_STATE]), weights_only=True)
        trainer.fit_loop.load_state_dict(state["fit_loop"])
        for callback in trainer.callbacks:  # type: ignore[attr-defined]
            key = callback.state_key
            if key in state["callbacks"]:
                callback.load_state_dict(state["callbacks"][key])
            if hasattr(callback, "last_step"):
                callback.last_step = state["last_steps"].get(key)
        attributes = pickle.loads(extra[MODULE_STATE])  # our own rank 0's, written above
        for name, value in attributes.items():
            setattr(trainer.lightning_module, name, value)


def carry_fit_state(trainer: pl.Trainer) -> bool:
    """Give ``trainer`` a :class:`FitStateLauncher` when its strategy spawns (or forks) processes
    (``ddp_spawn``, ``ddp_fork``, ``ddp_notebook``); returns whether it did. Call it before
    ``fit``. Lightning has no public hook for the launcher, so the strategy's ``_launcher`` is
    replaced (same class family, same start method)."""
    strategy = trainer.strategy
    launcher = strategy.launcher
    if type(launcher) is not _MultiProcessingLauncher:  # none, ddp's subprocess one, or ours
        return False
    if not isinstance(strategy, ParallelStrategy):  # pragma: no cover - the launcher needs one
        return False
    strategy._launcher = FitStateLauncher(strategy, start_method=launcher._start_method)
    log.debug("%s: the fit state comes back from the spawned processes", type(strategy).__name__)
    return True


__all__ = ["FIT_STATE", "FitStateLauncher", "carry_fit_state"]
