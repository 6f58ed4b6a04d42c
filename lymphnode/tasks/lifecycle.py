"""A training run's lifecycle: its identity, skip / resume / refuse, fitting, evaluating its
checkpoints and its record (``<run_dir>/results.json``).

- **Identity.** A run is its folder (``run_dir``: ``<runs_dir>/<arm>/size<N>/fold<K>/seed<S>``,
  ``<runs_dir>/pretrain[-<pretext>][@<network>]``; the arm names the init, the pretext, a network
  other than the paper's UNet and a fine-tuning method other than the paper's, so different arms
  never share a folder) plus the resolved config it was trained with, recorded in results.json
  (``config``) with its :func:`run_fingerprint`. Keys that cannot change what a run computes
  (:data:`RESULT_NEUTRAL_KEYS`: progress bars, loggers, log and run folders, pinned memory, the
  lifecycle's own switches) are not part of the identity.
- **Rerun** (:func:`plan_run`): a folder whose record is ``completed`` with the same identity is
  skipped (its recorded metric is returned); ``interrupted`` by a signal, it resumes from its
  ``last.ckpt``; ``failed`` (or a ``debug`` smoke test), it trains again. A ``completed`` or
  ``interrupted`` record of another config is refused with one message naming every changed key
  (``trainer.max_steps: 40 → 60``), through :func:`lymphnode.core.records.resume_or_refuse` (a
  key the record lacks and this config sets to null is a key added since, not a change), unless
  ``rerun=force`` (train again from step 0 and replace the record). An explicit ``ckpt_path``
  continues the run and may change its budget (:data:`BUDGET_KEYS`) only.
- **Record.** results.json is written atomically at the end, also when the run fails (``status:
  failed`` and the error) or a signal stops it (``interrupted``: the step reached; the process then
  exits 128 + the signal, 143 for SIGTERM, through :class:`lymphnode.core.boundary.RunInterrupted`).
  Bad input is refused before anything is written (:func:`check_run`). A fine-tuning run refuses a
  pretraining checkpoint whose own record is not ``completed`` (``pretrained_unfinished_ok=true``
  fine-tunes from it anyway).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import Logger, WandbLogger
from pytorch_lightning.utilities import rank_zero_only
from pytorch_lightning.utilities.exceptions import SIGTERMException

from lymphnode.core.boundary import RunInterrupted
from lymphnode.core.errors import CacheError, ConfigError
from lymphnode.core.locks import run_lock
from lymphnode.core.records import config_differences, fingerprint, read_record, resume_or_refuse
from lymphnode.core.resolvers import network_name
from lymphnode.tasks.budget import INTERRUPTIONS, budget_of, is_interrupted, stop_reason
from lymphnode.tasks.build import (
    STAGES,
    build_callbacks,
    build_datamodule,
    build_loggers,
    build_task,
    build_trainer,
    check_config,
    compare_selections,
    experiment_name,
    pretrained_checkpoint,
    resume_checkpoint,
)
from lymphnode.tasks.checkpointing import (
    SelectionCheckpoint,
    ShadowBest,
    ShadowSelection,
    check_selection,
    checkpoint_step,
    choose_checkpoint,
    shadow_checkpoint,
)

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
RERUN_MODES = ("auto", "force")  # conf/train.yaml `rerun`

#: Config keys (and everything below them) that cannot change what a run computes, so a rerun that
#: differs in them only is the same run. Each with why:
RESULT_NEUTRAL_KEYS: tuple[str, ...] = (
    # the lifecycle's own switches: what to do with an existing record, not what to compute
    "rerun", "skip_if_done", "resume_interrupted", "ckpt_path", "pretrained_unfinished_ok",
    # which metric train() returns from the record (a sweeper's objective), not the metrics
    "optimized_metric",
    # where the run is: its folder is the one being compared; the data's and the pretraining's
    # locations still count where they are used (data.*_dir, pretrained_ckpt, task.pretrained)
    "paths", "run_dir", "run_name", "trainer.default_root_dir",
    "callbacks.model_checkpoint.dirpath",
    # logging: loggers, the dashboard's labels, progress output, logged-only callbacks, image grids
    "logger", "run_group", "job_type", "tags",
    "callbacks.progress_bar", "callbacks.lr_monitor", "callbacks.depth_norms",
    "trainer.enable_progress_bar", "trainer.enable_model_summary", "trainer.log_every_n_steps",
    "task.log_images_every_n_epochs", "task.n_log_images",
    # pinned host memory: the same bytes reach the device. (data.num_workers is NOT neutral: 0
    # vs 2 workers gave val/loss 0.72837 vs 0.72839 after 4 tiny steps, measured 2026-12-08)
    "data.pin_memory",
)  # fmt: skip
#: The budget: what an explicit ``ckpt_path`` (continuing a run) may change.
BUDGET_KEYS: tuple[str, ...] = ("trainer.max_steps", "trainer.max_epochs", "trainer.max_time")


# --- identity -----------------------------------------------------------------------------------
def run_dir_of(cfg: DictConfig) -> Path:
    """The run directory (``cfg.run_dir``; Hydra's run/sweep dirs point at the same place)."""
    return Path(cfg.run_dir)


def run_fingerprint(config: Mapping[str, Any]) -> str:
    """The identity of a resolved config: 16 hex digits, equal for configs that differ only in
    :data:`RESULT_NEUTRAL_KEYS` (:func:`lymphnode.core.records.fingerprint`)."""
    return fingerprint(config, RESULT_NEUTRAL_KEYS)


def rerun_mode(cfg: DictConfig) -> str:
    """``auto`` or ``force`` (``skip_if_done=false``, the older spelling, is ``force``);
    ConfigError for another value."""
    mode = cfg.get("rerun", "auto")
    if mode not in RERUN_MODES:
        raise ConfigError(f"rerun={mode!r} is not supported; expected one of {list(RERUN_MODES)}")
    if cfg.get("skip_if_done", True) is False:
        return "force"
    return str(mode)


@dataclass(frozen=True)
class Plan:
    """What a run does with its folder's record (:func:`plan_run`).

    Attributes:
        action: ``train`` (from step 0, or from an explicit ``ckpt_path``), ``skip`` (return the
            record's metric) or ``resume`` (from the interrupted attempt's last.ckpt).
        previous: the folder's record (None: none, or a corrupt one that is replaced).
        changes: the keys in which this config differs from the record's (``key: old → new``),
            for a record that is replaced (failed, debug, or ``rerun=force``).
    """

    action: str
    previous: dict[str, Any] | None
    changes: tuple[str, ...] = ()


def _refusal_remedy(status: str) -> str:
    return (
        f"its run is {status}: train this config into another runs folder (paths.runs_dir=<dir>), "
        "or rerun=force to train it again in place (its checkpoints and record are replaced)"
    )


def plan_run(cfg: DictConfig, run_dir: Path, previous: Mapping[str, Any] | None) -> Plan:
    """Skip, resume, train or refuse (ConfigError naming every changed key), from the record
    ``previous`` of ``run_dir`` and the config ``cfg`` (see the module docstring)."""
    if previous is None:
        return Plan("train", None)
    config = resolved_config(cfg)
    recorded = previous.get("config")
    changes = tuple(
        config_differences(recorded, config, RESULT_NEUTRAL_KEYS, absent_is_null=True)
        if isinstance(recorded, Mapping)
        else ()
    )
    status = str(previous.get("status"))
    if rerun_mode(cfg) == "force":
        log.info(
            "%s: rerun=force: training again, replacing its %s record%s", run_dir, status,
            f" (changed: {'; '.join(changes)})" if changes else "",
        )  # fmt: skip
        return Plan("train", dict(previous), changes)
    if status not in ("completed", "interrupted"):  # failed, debug: nothing worth keeping
        log.info(
            "%s: the earlier attempt ended %s (%s); training again%s", run_dir, status,
            previous.get("error"), f" (changed: {'; '.join(changes)})" if changes else "",
        )  # fmt: skip
        return Plan("train", dict(previous), changes)
    explicit = cfg.get("ckpt_path") is not None  # the user continues this run, maybe for longer
    resume_or_refuse(
        run_dir / RESULTS_FILE, config, what="run record", remedy=_refusal_remedy(status),
        ignore=RESULT_NEUTRAL_KEYS + (BUDGET_KEYS if explicit else ()), absent_is_null=True,
    )  # fmt: skip
    if explicit:
        return Plan("train", dict(previous), changes)
    if status == "completed":
        return Plan("skip", dict(previous))
    if interrupted_checkpoint(cfg, run_dir, previous) is not None:
        return Plan("resume", dict(previous))
    log.info(
        "%s: the earlier attempt ended interrupted (%s); training again", run_dir,
        previous.get("error"),
    )  # fmt: skip
    return Plan("train", dict(previous))


def interrupted_checkpoint(
    cfg: DictConfig, run_dir: Path, previous: Mapping[str, Any] | None
) -> Path | None:
    """``<run_dir>/checkpoints/last.ckpt`` when this run should resume from it by itself: no
    ``ckpt_path`` given, ``resume_interrupted`` on, and the earlier attempt's results.json
    (``previous``) says a signal interrupted it (SIGTERM: a cluster's time limit or preemption;
    Ctrl+C). So a resubmitted job, the same command, continues where it stopped. None otherwise
    (a failed or completed run, or no last.ckpt: it trains from the start)."""
    if cfg.get("ckpt_path") is not None or not cfg.get("resume_interrupted", True):
        return None
    if not previous or previous.get("status") != "interrupted":
        return None
    if (previous.get("budget") or {}).get("stopped_by") not in INTERRUPTIONS:
        return None  # max_time: the same command would stop again at once
    last = run_dir / "checkpoints" / "last.ckpt"
    return last if last.is_file() else None


def pretraining_record(cfg: DictConfig, pretrained: Path | None) -> dict[str, Any] | None:
    """``{"run_dir", "status", "fingerprint"}`` of the pretraining run whose checkpoint a
    fine-tuning run starts from (``<run>/checkpoints/<name>.ckpt`` beside ``<run>/results.json``);
    None without a pretrained checkpoint or without such a record (a checkpoint from elsewhere).
    ConfigError when the record is not ``completed`` (an interrupted or failed pretraining) unless
    ``pretrained_unfinished_ok``, or when it is unreadable."""
    if pretrained is None or pretrained.parent.name != "checkpoints":
        return None
    path = pretrained.parent.parent / RESULTS_FILE
    record = read_record(path, what="pretraining record (results.json)")
    if record is None:
        return None
    status = record.get("status")
    recorded = record.get("config")
    found = {
        "run_dir": str(path.parent),
        "status": status,
        "fingerprint": run_fingerprint(recorded) if isinstance(recorded, Mapping) else None,
    }
    if status != "completed" and not cfg.get("pretrained_unfinished_ok", False):
        raise ConfigError(
            f"pretrained_ckpt={str(pretrained)!r}: its pretraining run {path.parent} is {status!r} "
            f"({record.get('error')}), not 'completed'; finish it first (the same pretraining "
            "command resumes it), or pretrained_unfinished_ok=true to fine-tune from it anyway"
        )
    return found


def check_run(cfg: DictConfig) -> None:
    """What can be refused before the run writes anything (no results.json, and the CLI removes
    the run dir Hydra made for it): stage/init, ``rerun``, the pretrained checkpoint (present, and
    its pretraining completed), the data (``fold``, ``folds``, ``labeled_size``, also against the
    labeled cache's size) and the ``ckpt_path`` to resume from. A missing or damaged cache is left
    to the run, which records it in results.json."""
    check_config(cfg)
    rerun_mode(cfg)
    check_selection(cfg.get("selection"), cfg.stage)
    pretraining_record(cfg, pretrained_checkpoint(cfg))
    resume_checkpoint(cfg, run_dir_of(cfg))
    datamodule = build_datamodule(cfg)  # fold / folds / labeled_size ranges
    fold_indices = getattr(datamodule, "fold_indices", None)
    if callable(fold_indices):
        with contextlib.suppress(CacheError):  # the run records a missing / bad cache
            fold_indices()  # labeled_size against the labeled cache


# --- results.json -------------------------------------------------------------------------------
def read_results(path: Path) -> dict[str, Any] | None:
    """A results.json as a dict; None when it does not exist or is corrupt (truncated, not JSON,
    not an object: a warning names it; the run then trains again and replaces it)."""
    try:
        results = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        log.warning("corrupt results.json %s (%s); the run trains again", path, err)
        return None
    if not isinstance(results, dict):
        log.warning(
            "corrupt results.json %s (a JSON %s, expected an object); the run trains again",
            path,
            type(results).__name__,
        )
        return None
    return results


def write_results(path: Path, results: Mapping[str, Any]) -> None:
    """Write results.json atomically (temp file + rename): readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".results.", suffix=".json.tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(results, f, indent=2, sort_keys=False, allow_nan=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def resolved_config(cfg: DictConfig) -> dict[str, Any]:
    """The config as plain data, interpolations resolved (unresolved when that fails)."""
    try:
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except Exception:  # an unresolvable value is itself worth recording as written
        return OmegaConf.to_container(cfg, resolve=False)  # type: ignore[return-value]


def metric_value(metrics: Mapping[str, Any], key: str) -> float:
    """``metrics[key]`` as a float; ConfigError listing the available keys when it is missing."""
    if key not in metrics:
        raise ConfigError(
            f"optimized_metric={key!r} is not among this run's metrics {sorted(metrics)}"
        )
    return float(metrics[key])


def _plain_metrics(results: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Lightning's per-dataloader result dicts merged into one {key: float}."""
    merged: dict[str, float] = {}
    for result in results:
        merged.update({k: float(v) for k, v in result.items()})
    return merged


# --- the run ------------------------------------------------------------------------------------
def evaluate(
    trainer: pl.Trainer,
    module: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    stage: str,
    ckpt: str | None,
) -> dict[str, float]:
    """Metrics of one checkpoint (None: the module's current weights): validation, plus the test
    set when fine-tuning."""
    metrics = _plain_metrics(
        trainer.validate(
            module, datamodule=datamodule, ckpt_path=ckpt, verbose=False, weights_only=True
        )
    )
    if stage == "finetune":
        metrics.update(
            _plain_metrics(
                trainer.test(
                    module, datamodule=datamodule, ckpt_path=ckpt, verbose=False, weights_only=True
                )
            )
        )
    return metrics


def _interruption(trainer: pl.Trainer, err: BaseException) -> str | None:
    """``sigterm`` / ``keyboard_interrupt`` when a signal stopped ``trainer.fit``, else None (a
    failure). Lightning turns Ctrl+C into ``SystemExit(1)`` and SIGTERM into SIGTERMException."""
    if isinstance(err, SIGTERMException) or trainer.received_sigterm:
        return "sigterm"
    if isinstance(err, KeyboardInterrupt | SystemExit):
        return "keyboard_interrupt"
    return None


def _checkpoints_written(trainer: pl.Trainer) -> dict[str, str | None]:
    """``best`` / ``last``: the absolute paths of the checkpoints the checkpoint callback has
    written so far that exist on disk (None for one that does not), for an interrupted run."""
    callback = trainer.checkpoint_callback
    found: dict[str, str | None] = {"best": None, "last": None}
    for key, attr in (("best", "best_model_path"), ("last", "last_model_path")):
        path = getattr(callback, attr, "") or ""
        if path and Path(path).is_file():
            found[key] = str(Path(path).resolve())
    return found


def _evaluate_checkpoints(
    cfg: DictConfig,
    trainer: pl.Trainer,
    module: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    results: dict[str, Any],
) -> None:
    """Evaluate the last (final-step) and the selected checkpoint into ``results``: ``metrics``
    (selected), ``metrics_last``, ``checkpoints``, ``steps``, ``selection``, ``collapsed``."""
    callback = trainer.checkpoint_callback
    shadows = [
        ShadowBest.of(c)
        for c in getattr(trainer, "callbacks", [])
        if isinstance(c, ShadowSelection)
    ]
    # The last checkpoint first, the selected one second: loggers keep the selected one's values
    # as the final test/* (wandb summary), and the module ends with those weights.
    if isinstance(callback, SelectionCheckpoint):
        results["selection"] = callback.selection
        last = callback.last_model_path or None
        metrics_last = evaluate(trainer, module, datamodule, cfg.stage, last)
        choice = choose_checkpoint(callback, metrics_last)
        if choice is None:  # nothing written (fast_dev_run): the weights in memory are both
            best, metrics = None, metrics_last
        elif choice.is_last:  # the same weights as last.ckpt: no second evaluation
            best, metrics = str(choice.path), metrics_last
        else:
            best = str(choice.path)
            metrics = evaluate(trainer, module, datamodule, cfg.stage, best)
        if choice is not None:
            log.info(
                "selected %s (selection=%s: %s)", choice.path, callback.selection, choice.reason
            )
    else:  # another checkpoint callback (or none): its best and last, as Lightning wrote them
        results["selection"] = None
        best = last = None
        if isinstance(callback, ModelCheckpoint):
            best = callback.best_model_path or None
            last = callback.last_model_path or None
        if best is None and last is None:
            log.warning(
                "no checkpoint was saved; evaluating the weights in memory as best and last"
            )
            metrics_last = metrics = evaluate(trainer, module, datamodule, cfg.stage, None)
        else:
            metrics_last = evaluate(trainer, module, datamodule, cfg.stage, last or best)
            metrics = evaluate(trainer, module, datamodule, cfg.stage, best or last)
    results["checkpoints"] = {
        "best": None if best is None else str(Path(best).resolve()),
        "last": None if last is None else str(Path(last).resolve()),
    }
    in_memory = trainer.global_step if best is None and last is None else None
    last_step = checkpoint_step(last) if last else in_memory
    results["steps"] = {
        "selected": checkpoint_step(best) if best else last_step,
        "last": last_step,
    }
    results["metrics"], results["metrics_last"] = metrics, metrics_last
    results["collapsed"] = is_collapsed(cfg.stage, metrics)
    if compare_selections(cfg):
        results["metrics_by_selection"] = _metrics_by_selection(
            cfg, trainer, module, datamodule, metrics, metrics_last, results["steps"], shadows
        )
        if best is not None:  # the module ends with the selected weights, as without shadows
            evaluate(trainer, module, datamodule, cfg.stage, best)


def _metrics_by_selection(
    cfg: DictConfig,
    trainer: pl.Trainer,
    module: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    metrics: dict[str, float],
    metrics_last: dict[str, float],
    steps: Mapping[str, int | None],
    shadows: Sequence[ShadowBest],
) -> dict[str, dict[str, Any]]:
    """{selection: {"step", "metrics"}} for ``selection`` and every ``compare_selections`` entry:
    what the run would report under each choice (the final step competes as in the selected one)."""
    out: dict[str, dict[str, Any]] = {
        cfg.selection: {"step": steps["selected"], "metrics": metrics}
    }
    last_step = steps["last"]
    by_name = {shadow.selection: shadow for shadow in shadows}
    for name in compare_selections(cfg):
        path = None if name == "last" else shadow_checkpoint(by_name[name], metrics_last)
        if path is None:  # the final step
            out[name] = {"step": last_step, "metrics": metrics_last}
        else:
            picked = evaluate(trainer, module, datamodule, cfg.stage, str(path))
            out[name] = {"step": checkpoint_step(path), "metrics": picked}
    return out


def is_collapsed(stage: str, metrics: Mapping[str, float]) -> bool:
    """A fine-tuning run whose test recall is 0: it predicts no tumour anywhere (false for
    pretraining)."""
    recall = metrics.get("test/seg_recall")
    return stage != "pretrain" and recall is not None and float(recall) == 0.0


def _fit_and_evaluate(cfg: DictConfig, run_dir: Path, results: dict[str, Any]) -> None:
    """Build, fit and evaluate; fills ``results`` in place (so a failure keeps what is known)."""
    start = time.perf_counter()
    check_config(cfg)
    pretrained = pretrained_checkpoint(cfg)
    resume = resume_checkpoint(cfg, run_dir)
    if resume is not None:
        results["resumed"] = {"checkpoint": str(resume.resolve()), "step": checkpoint_step(resume)}
    pl.seed_everything(cfg.seed, workers=True)

    datamodule = build_datamodule(cfg)
    module = build_task(cfg, datamodule, pretrained)
    callbacks = build_callbacks(cfg)
    loggers = build_loggers(cfg)
    trainer = build_trainer(cfg, callbacks, loggers)
    try:
        for logger in trainer.loggers:  # (fast_dev_run swaps in a dummy: nothing is written)
            logger.log_hyperparams(results["config"])  # the full resolved config
        log.info("fitting %s into %s", experiment_name(cfg), run_dir)
        results["budget"] = budget_of(trainer)
        try:
            trainer.fit(  # weights_only=True: whatever TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD says
                module, datamodule=datamodule, ckpt_path=None if resume is None else str(resume),
                weights_only=True,
            )  # fmt: skip
        except BaseException as err:
            reason = _interruption(trainer, err)
            if reason is not None:  # a signal: record the step reached; last.ckpt holds it
                results["interrupted"] = reason
                results["budget"]["stopped_by"] = reason
                results["steps"] = {"selected": None, "last": trainer.global_step}
                results["checkpoints"] = _checkpoints_written(trainer)
            raise
        fit_s = time.perf_counter() - start
        results["pretrained"] = _pretrained_record(module)
        results["fast_dev_run"] = bool(getattr(trainer, "fast_dev_run", False))
        reason = stop_reason(trainer)
        results["budget"]["stopped_by"] = reason
        if is_interrupted(reason, results["budget"]):
            results["interrupted"] = reason
        _evaluate_checkpoints(cfg, trainer, module, datamodule, results)
        total_s = time.perf_counter() - start
        results["timing"] = {"fit_s": fit_s, "test_s": total_s - fit_s, "total_s": total_s}
    except BaseException:
        finish_loggers(loggers, failed=True)
        raise
    finish_loggers(loggers, failed=False)


def _pretrained_record(module: pl.LightningModule) -> dict[str, Any] | None:
    """What a fine-tuning run took from its pretraining checkpoint (None without one): the path,
    ``transfer`` (network | encoder), the checkpoint's task and the tensor counts."""
    report = getattr(module, "pretrained_report", None)
    if report is None:
        return None
    return {
        "checkpoint": str(report.path),
        "task": report.task,
        "transfer": report.transfer,
        "loaded": len(report.loaded),
        "reinitialized": len(report.reinitialized),
    }


def finish_loggers(loggers: Sequence[Logger], failed: bool) -> None:
    """End this run's wandb run (the next run of a sweep, in the same process, must start its
    own instead of appending to this one) and flush the other loggers."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            if getattr(logger, "_experiment", None) is not None:
                logger.experiment.finish(exit_code=1 if failed else 0)
        else:
            logger.finalize("failed" if failed else "success")


def _is_rank_zero() -> bool:
    """Whether this process writes files (rank 0 of a DDP job, or a single process)."""
    return getattr(rank_zero_only, "rank", 0) == 0


def new_record(cfg: DictConfig, plan: Plan) -> dict[str, Any]:
    """The results.json of a run about to train (``status: failed`` until it completes)."""
    config = resolved_config(cfg)
    previous = plan.previous
    results: dict[str, Any] = {
        "status": "failed",
        "experiment": experiment_name(cfg) if cfg.stage in STAGES else cfg.stage,
        "init": "pretrain" if cfg.stage == "pretrain" else cfg.init,
        "pretext": None if cfg.get("init") == "scratch" else cfg.pretext.name,
        "network": network_name(OmegaConf.select(cfg, "model._target_", default=None)),
        "method": cfg.get("method"),
        "labeled_size": OmegaConf.select(cfg, "data.labeled_size", default=None),
        "fold": OmegaConf.select(cfg, "data.fold", default=None),
        "seed": cfg.seed,
        "selection": cfg.get("selection"),
        "steps": {"selected": None, "last": None},
        "collapsed": False,
        "budget": {},
        "metrics": {},
        "metrics_last": {},
        "checkpoints": {"best": None, "last": None},
        "resumed": None,  # {"checkpoint", "step"}: the checkpoint this attempt continued from
        "timing": {},
        "fingerprint": run_fingerprint(config),  # the identity a rerun is compared by
        "replaced": None
        if previous is None
        else {  # the record this attempt replaces
            "status": previous.get("status"),
            "fingerprint": previous.get("fingerprint"),
            "changes": list(plan.changes),
        },
        "pretraining": pretraining_record(cfg, pretrained_checkpoint(cfg)),
        "config": config,
        "error": None,
    }
    if cfg.stage == "pretrain":
        results["labeled_size"] = results["fold"] = None
    return results


def _remove_stale_checkpoints(run_dir: Path) -> None:
    """Remove the checkpoints of the attempt a fresh start replaces (failed, or ``rerun=force``),
    so that none of them is taken for this attempt's."""
    stale = run_dir / "checkpoints"
    if stale.is_dir():
        log.info("%s: removing the replaced attempt's checkpoints", stale)
        shutil.rmtree(stale)


def train(cfg: DictConfig) -> float:
    """Run one pretraining or fine-tuning run; return ``metrics[cfg.optimized_metric]``.

    Writes ``<run_dir>/results.json``: status ``completed``; ``failed`` with the error (the
    exception propagates); ``interrupted`` when ``max_time`` stopped it before its step/epoch
    budget (evaluated, its metric returned) or a signal did (SIGTERM / Ctrl+C: not evaluated,
    :class:`RunInterrupted` propagates; last.ckpt holds the step reached); or ``debug`` for a
    ``trainer=debug`` smoke test. Also ``selection``, ``steps`` (``selected``/``last``: the
    optimizer step of each checkpoint), ``collapsed`` (test recall 0), ``budget`` (max_steps /
    max_epochs / max_time_s / val_check_interval / stopped_by), ``resumed`` (the checkpoint and
    step this attempt continued from, or None), ``fingerprint`` and ``config`` (its identity),
    ``replaced`` (the record it replaced) and ``pretraining`` (the record of the pretraining it
    started from). What happens to an existing record is :func:`plan_run`'s. One process trains a
    run dir at a time (:func:`lymphnode.core.locks.run_lock`): another job of a sweep aimed at the
    same folder (the scratch runs shared by several pretexts, a resubmitted job) waits for it,
    then skips it when it completed with the same config.
    """
    run_dir = run_dir_of(cfg)
    if not _is_rank_zero():  # DDP ranks > 0 run inside rank 0's lock (they write nothing)
        return _train_run(cfg, run_dir)
    with run_lock(run_dir):  # one process per run folder: a second one waits, then skips
        return _train_run(cfg, run_dir)


def _train_run(cfg: DictConfig, run_dir: Path) -> float:
    """:func:`train` for ``run_dir`` (under its run lock on rank 0)."""
    results_path = run_dir / RESULTS_FILE
    check_config(cfg)
    plan = plan_run(cfg, run_dir, read_results(results_path))
    previous = plan.previous or {}
    if plan.action == "skip":
        log.info(
            "%s is completed; skipping (the same config, fingerprint %s; rerun=force trains it "
            "again)", results_path, previous.get("fingerprint") or run_fingerprint(
                previous.get("config") or {}),
        )  # fmt: skip
        return metric_value(previous.get("metrics") or {}, cfg.optimized_metric)
    if plan.action == "resume":
        log.info(
            "%s: the earlier attempt was interrupted (%s) at step %s; resuming from its last.ckpt "
            "(resume_interrupted=false starts over)",
            run_dir, (previous.get("budget") or {}).get("stopped_by"),
            (previous.get("steps") or {}).get("last"),
        )  # fmt: skip
        cfg.ckpt_path = "last"  # recorded as such in results.json
    check_run(cfg)  # bad input before anything is written: no results.json
    if plan.previous is not None and cfg.get("ckpt_path") is None and _is_rank_zero():
        _remove_stale_checkpoints(run_dir)
    results = new_record(cfg, plan)
    try:
        _fit_and_evaluate(cfg, run_dir, results)
        value = metric_value(results["metrics"], cfg.optimized_metric)
    except BaseException as err:
        results.pop("fast_dev_run", None)
        interrupted = results.pop("interrupted", None)
        if interrupted is None and isinstance(err, SIGTERMException):  # after fit (evaluating)
            interrupted = results["budget"]["stopped_by"] = "sigterm"
        if interrupted is not None:
            results["status"] = "interrupted"
            results["error"] = (
                f"interrupted ({interrupted}) at step {results['steps']['last']}; the same "
                "command resumes it from its last.ckpt"
            )
        else:
            results["error"] = f"{type(err).__name__}: {err}"
        if _is_rank_zero():
            write_results(results_path, results)
        if interrupted is not None:
            signum = signal.SIGTERM if interrupted == "sigterm" else signal.SIGINT
            raise RunInterrupted(f"{run_dir}: {results['error']}", signum) from err
        raise
    results["status"] = "completed"
    interrupted = results.pop("interrupted", None)
    if results.pop("fast_dev_run", False):
        results["status"] = "debug"  # neither skipped by a rerun nor averaged by the report
        results["error"] = (
            "trainer=debug (fast_dev_run): a one-batch smoke test, not a result; "
            "run again without trainer=debug"
        )
    elif interrupted is not None:  # max_time before the step/epoch budget: not averaged
        results["status"] = "interrupted"
        results["error"] = (
            f"stopped by {interrupted} at step {results['steps']['last']} of a budget of "
            f"max_steps={results['budget'].get('max_steps')} / max_epochs="
            f"{results['budget'].get('max_epochs')}; resume with ckpt_path=last and a larger "
            "trainer.max_time"
        )
        log.warning("%s: %s", run_dir, results["error"])
    if results["collapsed"]:
        log.warning(
            "%s collapsed: test/seg_recall is 0 (no tumour predicted on the test set)", run_dir
        )
    if _is_rank_zero():
        write_results(results_path, results)
    log.info("%s = %.4f (%s)", cfg.optimized_metric, value, results_path)
    if not math.isfinite(value):
        log.warning("%s is not finite", cfg.optimized_metric)
    return value
