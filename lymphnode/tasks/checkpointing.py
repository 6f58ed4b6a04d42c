"""Checkpoint selection that means what it says: ``best.ckpt`` is the checkpoint ``selection``
picks, ``last.ckpt`` is the final optimizer step, always.

Lightning's ``ModelCheckpoint(save_last=True)`` rewrites ``last.ckpt`` only when the monitored
metric improves (a 120-step run can end with ``last.ckpt`` at step 100); :class:`SelectionCheckpoint`
also writes it when training ends, and when a SIGTERM stops the run, so ``ckpt_path=last`` resumes
from where the run really stopped.

The selections (config key ``selection``):

- ``val_f1``: highest ``val/seg_f1`` (fine-tuning only),
- ``val_loss``: lowest ``val/loss`` (pretraining: the reconstruction loss),
- ``last``: the final step.

The final step is always a candidate: when the budget does not end on a validation step,
:func:`choose_checkpoint` compares the final step's validation metric with the best one seen
during training and promotes ``last.ckpt`` to ``best.ckpt`` when it is better.
"""

from __future__ import annotations

import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities import rank_zero_only
from pytorch_lightning.utilities.exceptions import SIGTERMException

from lymphnode.core.errors import ConfigError

log = logging.getLogger(__name__)

# selection -> (monitored metric, mode); "last" monitors nothing
SELECTIONS: dict[str, tuple[str | None, str]] = {
    "val_f1": ("val/seg_f1", "max"),
    "val_loss": ("val/loss", "min"),
    "last": (None, "min"),
}
SEGMENTATION_ONLY = ("val_f1",)  # selections that need a segmentation task's metrics


def check_selection(selection: Any, stage: str | None = None) -> str:
    """``selection`` when it is one of :data:`SELECTIONS` (and fits the stage), else ConfigError.

    ``stage="pretrain"`` refuses ``val_f1``: pretraining logs no F1.
    """
    if not isinstance(selection, str) or selection not in SELECTIONS:
        raise ConfigError(
            f"selection={selection!r} is not supported; expected one of {list(SELECTIONS)} "
            "(which checkpoint the metrics and best.ckpt come from)"
        )
    if stage == "pretrain" and selection in SEGMENTATION_ONLY:
        raise ConfigError(
            f"selection={selection!r} needs val/seg_f1, which pretraining does not log; "
            "expected selection=val_loss or selection=last for experiment=pretrain"
        )
    return selection


class SelectionCheckpoint(ModelCheckpoint):
    """``<dirpath>/best.ckpt`` selected by ``selection``, ``<dirpath>/last.ckpt`` at the final step.

    Args:
        dirpath: the run's checkpoint folder.
        selection: ``val_f1`` | ``val_loss`` | ``last`` (see the module docstring). With ``last``
            no ``best.ckpt`` is written during training (:func:`choose_checkpoint` copies the
            final one).
        verbose: log every save.

    ``last.ckpt`` is written at every validation that improves the selection metric (Lightning's
    behaviour), when training ends (budget reached, ``max_time``, early stopping) and when a
    SIGTERM stops it. It is not written for other exceptions (a NaN loss, a bug): the previous
    ``last.ckpt`` stays the last good state.
    """

    def __init__(self, dirpath: str | Path, selection: str = "val_f1", verbose: bool = False):
        self.selection = check_selection(selection)
        monitor, mode = SELECTIONS[self.selection]
        super().__init__(
            dirpath=dirpath,
            filename="best",
            monitor=monitor,
            mode=mode,
            save_top_k=1 if monitor is not None else 0,
            save_last=True,
            verbose=verbose,
            auto_insert_metric_name=False,
            enable_version_counter=False,  # a rerun overwrites best.ckpt instead of best-v1.ckpt
        )
        self.last_step: int | None = None  # global step stored in last.ckpt by this process

    def _save_last_checkpoint(
        self, trainer: pl.Trainer, monitor_candidates: dict[str, Any]
    ) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        self.last_step = trainer.global_step

    def _write_final(self, trainer: pl.Trainer) -> None:
        if getattr(trainer, "fast_dev_run", False) or self.last_step == trainer.global_step:
            return
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """As ModelCheckpoint; with ``selection=last`` (no metric) also last.ckpt, so that a
        killed run can resume from its latest validation."""
        super().on_validation_end(trainer, pl_module)
        if self.monitor is None and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any
    ) -> None:
        """As ModelCheckpoint; after the final optimizer step also last.ckpt.

        Written here, as Lightning writes its step checkpoints (a resume from it continues
        exactly), rather than when training ends: there the loops' state already counts the
        epoch as finished, and a resume from it would run too few steps.
        """
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)
        if _is_final_step(trainer):
            self._write_final(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """last.ckpt = the final step, if the epoch end did not write it already."""
        self._write_final(trainer)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """On SIGTERM (raised between steps, so the state is consistent) write last.ckpt."""
        if isinstance(exception, SIGTERMException) and not trainer.sanity_checking:
            self._write_final(trainer)
            log.info("SIGTERM at step %d: wrote %s", trainer.global_step, self.last_model_path)


class ShadowSelection(ModelCheckpoint):
    """The checkpoint another ``selection`` would have picked, kept beside the run's own so that
    one run reports the test metrics of every selection (``compare_selections``): writes
    ``<dirpath>/select_<selection>.ckpt`` at each validation that improves its metric, nothing
    else (``last.ckpt`` is :class:`SelectionCheckpoint`'s).
    """

    def __init__(self, dirpath: str | Path, selection: str) -> None:
        self.selection = check_selection(selection)
        monitor, mode = SELECTIONS[self.selection]
        if monitor is None:
            raise ConfigError(
                f"selection={selection!r} keeps no checkpoint of its own: it is last.ckpt"
            )
        super().__init__(
            dirpath=dirpath,
            filename=f"select_{self.selection}",
            monitor=monitor,
            mode=mode,
            save_top_k=1,
            save_last=False,
            auto_insert_metric_name=False,
            enable_version_counter=False,
        )

    @property
    def state_key(self) -> str:
        """Distinct from the run's SelectionCheckpoint, so both states survive a resume."""
        return f"ShadowSelection[{self.selection}]"


@dataclass(frozen=True)
class ShadowBest:
    """What a :class:`ShadowSelection` held when training ended (read it before any
    ``trainer.validate/test(ckpt_path=...)``: those restore callback states from the checkpoint)."""

    selection: str
    path: Path | None
    score: float | None

    @classmethod
    def of(cls, shadow: ShadowSelection) -> ShadowBest:
        score = shadow.best_model_score
        path = Path(shadow.best_model_path) if shadow.best_model_path else None
        return cls(shadow.selection, path, None if score is None else float(score))


def shadow_checkpoint(shadow: ShadowBest, last_metrics: dict[str, float]) -> Path | None:
    """The checkpoint ``shadow.selection`` picks: its best validation, or None for the final
    step (``last.ckpt``) when that is strictly better or nothing was kept (as
    :func:`choose_checkpoint`)."""
    monitor, mode = SELECTIONS[shadow.selection]
    if shadow.path is None or not shadow.path.is_file():
        return None
    if monitor in last_metrics and is_better(float(last_metrics[monitor]), shadow.score, mode):
        return None
    return shadow.path


def _is_final_step(trainer: pl.Trainer) -> bool:
    """Whether the optimizer step that just ended is the run's last: max_steps reached, the last
    batch of the last epoch, or a stop requested (``max_time``)."""
    loop = trainer.fit_loop
    max_steps, max_epochs = trainer.max_steps, loop.max_epochs
    if max_steps is not None and max_steps >= 0 and trainer.global_step >= max_steps:
        return True
    last_epoch = max_epochs is not None and 0 <= max_epochs <= trainer.current_epoch + 1
    if last_epoch and loop.epoch_loop.batch_progress.is_last_batch:
        return True
    return bool(trainer.should_stop and loop._can_stop_early)


def checkpoint_step(path: str | Path | None) -> int | None:
    """The optimizer step (``global_step``) stored in a Lightning checkpoint; None without one."""
    if path is None:
        return None
    try:  # memory-mapped: the weights are not read
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # unreadable with weights_only: report the step as unknown
        log.warning("cannot read the step of %s (%s)", path, err)
        return None
    step = ckpt.get("global_step") if isinstance(ckpt, dict) else None
    return int(step) if isinstance(step, int) else None


def is_better(candidate: float, incumbent: float | None, mode: str) -> bool:
    """Whether ``candidate`` beats ``incumbent`` strictly (NaN never wins; None always loses)."""
    if math.isnan(candidate):
        return False
    if incumbent is None or math.isnan(incumbent):
        return True
    return candidate > incumbent if mode == "max" else candidate < incumbent


@dataclass(frozen=True)
class Choice:
    """The selected checkpoint: its path, whether it is the final step's, and why."""

    path: Path
    is_last: bool
    reason: str


def choose_checkpoint(
    callback: SelectionCheckpoint, last_metrics: dict[str, float]
) -> Choice | None:
    """The checkpoint that ``callback.selection`` picks after training, the final step included.

    ``last_metrics`` are the validation metrics of ``last.ckpt`` (the final step). When the final
    step wins (``selection=last``, no validation during training, or a strictly better monitored
    metric than the best validation of training), ``last.ckpt`` is copied to ``best.ckpt`` so
    that ``best.ckpt`` is always the selected checkpoint (what ``pretrained_ckpt`` and ``infer``
    read). None when no checkpoint was written (checkpointing off, ``fast_dev_run``).
    """
    last = Path(callback.last_model_path) if callback.last_model_path else None
    best = Path(callback.best_model_path) if callback.best_model_path else None
    if last is None or not last.is_file():
        return None if best is None else Choice(best, False, "no last.ckpt")
    monitor, mode = SELECTIONS[callback.selection]
    if monitor is None:
        reason = "selection=last"
    elif best is None or not best.is_file():
        reason = "no validation during training"
    elif monitor in last_metrics:
        score = callback.best_model_score
        incumbent = None if score is None else float(score)
        if not is_better(float(last_metrics[monitor]), incumbent, mode):
            return Choice(best, False, f"best {monitor} during training")
        reason = f"the final step has the best {monitor}"
    else:
        return Choice(best, False, f"{monitor} of the final step unknown")
    target = Path(callback.dirpath or last.parent) / f"{callback.filename}.ckpt"
    if target.resolve() != last.resolve():
        if getattr(rank_zero_only, "rank", 0) == 0:
            shutil.copyfile(last, target)  # best.ckpt = the selected checkpoint, always
        callback.best_model_path = str(target)
    return Choice(target, True, reason)


__all__ = [
    "SELECTIONS",
    "Choice",
    "SelectionCheckpoint",
    "ShadowBest",
    "ShadowSelection",
    "check_selection",
    "checkpoint_step",
    "choose_checkpoint",
    "is_better",
    "shadow_checkpoint",
]
