"""One training run from the Hydra config: pretraining on a pretext task or multi-task fine-tuning.

    python -m lymphnode.train experiment=pretrain [pretext=reconstruction]
    python -m lymphnode.train experiment=finetune data.labeled_size=40 data.fold=0
    python -m lymphnode.train experiment=scratch  data.labeled_size=40 data.fold=0
    ... profile=demo, model=unet, trainer=cpu|gpu|ddp|debug, logger=csv|wandb|none,
    ckpt_path=last (resume), init=pretrained|scratch, seed=N, data.subset_seed=N

:func:`train` builds every object from the config's ``_target_`` (conf/, read top to bottom in
conf/train.yaml): the DataModule (``data``), the task module (``task``, or the pretext's for
pretraining) with its network nested as ``net: ${model}``, callbacks, loggers and the Trainer. Nothing
is injected in code: the pretrained checkpoint reaches the task by interpolation
(``${pretrained_if:...}``), and the preprocessing contract (level, patch size, normalisation, stain
state) reaches it from the DataModule through :meth:`lymphnode.tasks.TaskModule.setup`. A new
network or pretext task is a module plus a YAML in conf/model/ or conf/pretext/. It fits, then
evaluates both the selected (best) and the last checkpoint and writes
``<run_dir>/results.json`` — also when the run fails (``status: failed`` and the error). The run
directory is deterministic (``<runs_dir>/pretrain``, ``<runs_dir>/<init>/size<N>/fold<K>/seed<S>``),
so a rerun of a completed run returns its recorded metric without training (``skip_if_done``),
and a rerun of one that a signal interrupted (a cluster's time limit: SIGTERM) resumes from its
``last.ckpt`` (``resume_interrupted``): resubmitting the same sweep finishes it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.loggers import Logger, WandbLogger
from pytorch_lightning.utilities import rank_zero_only
from pytorch_lightning.utilities.exceptions import SIGTERMException

from lymphnode.core.boundary import config_dir, hydra_boundary
from lymphnode.core.errors import CacheError, CheckpointError, ConfigError, LymphnodeError
from lymphnode.core.locks import run_lock
from lymphnode.models.checkpoint import check_task, read_preprocess
from lymphnode.models.preprocess import Preprocess
from lymphnode.tasks.budget import INTERRUPTIONS, budget_of, is_interrupted, stop_reason
from lymphnode.tasks.checkpointing import (
    SelectionCheckpoint,
    ShadowBest,
    ShadowSelection,
    check_selection,
    checkpoint_step,
    choose_checkpoint,
    shadow_checkpoint,
)
from lymphnode.tasks.spawn import carry_fit_state

log = logging.getLogger(__name__)

STAGES = ("pretrain", "finetune")  # which half of the method a run is
INITS = ("pretrained", "scratch")  # how a fine-tuning run's weights start
RESULTS_FILE = "results.json"
# The ${pretrained_if:...}, ${pretext_suffix:...} and ${run_arm:...} resolvers of conf/ are
# registered when lymphnode is imported (lymphnode.core.resolvers).


# --- configuration checks -----------------------------------------------------------------------
def check_config(cfg: DictConfig) -> None:
    """ConfigError for stage/init values that are not allowed or do not fit together."""
    if cfg.stage not in STAGES:
        raise ConfigError(f"stage={cfg.stage!r} is not supported; expected one of {list(STAGES)}")
    if cfg.stage == "finetune" and cfg.init not in INITS:
        raise ConfigError(
            f"init={cfg.init!r} is not supported for fine-tuning; expected one of {list(INITS)} "
            "(experiment=finetune sets pretrained, experiment=scratch sets scratch)"
        )
    if cfg.stage == "pretrain" and cfg.init is not None:
        raise ConfigError(
            f"init={cfg.init!r} only applies to fine-tuning; pretraining starts from random "
            "weights (leave init=null with experiment=pretrain)"
        )


def experiment_name(cfg: DictConfig) -> str:
    """``pretrain``, ``finetune`` (init=pretrained) or ``scratch`` (init=scratch)."""
    if cfg.stage == "pretrain":
        return "pretrain"
    return "finetune" if cfg.init == "pretrained" else "scratch"


def pretrained_checkpoint(cfg: DictConfig) -> Path | None:
    """The pretrain checkpoint a fine-tuning run starts from (None: scratch / pretraining)."""
    if cfg.stage != "finetune" or cfg.init != "pretrained":
        return None
    if not cfg.get("pretrained_ckpt"):
        raise ConfigError("init=pretrained needs pretrained_ckpt=<path of the pretrain best.ckpt>")
    path = Path(cfg.pretrained_ckpt)
    if not path.is_file():
        raise CheckpointError(
            f"pretrained checkpoint {path} not found (init=pretrained). Run "
            "`python -m lymphnode.train experiment=pretrain` first with the same paths.root "
            "(and profile), or set pretrained_ckpt=<path>, or use init=scratch"
        )
    return path


def resume_checkpoint(cfg: DictConfig, run_dir: Path) -> Path | None:
    """``ckpt_path`` as a file: None (fresh run), ``last`` (this run's last.ckpt) or a path."""
    if cfg.get("ckpt_path") is None:
        return None
    path = run_dir / "checkpoints" / "last.ckpt" if cfg.ckpt_path == "last" else Path(cfg.ckpt_path)
    if not path.is_file():
        raise CheckpointError(
            f"ckpt_path={cfg.ckpt_path!r}: {path} not found; expected a checkpoint of this run "
            f"(e.g. {run_dir / 'checkpoints' / 'last.ckpt'}) or null for a fresh run"
        )
    # Read with weights_only=True before Lightning sees it: a truncated, foreign or other-task
    # file is one clean line (and fit loads it with weights_only=True as well).
    hint = "" if cfg.stage != "finetune" else (
        " (ckpt_path resumes this run; a fine-tuning run starts from a pretraining checkpoint "
        "with init=pretrained pretrained_ckpt=<path>)"
    )  # fmt: skip
    check_task(
        path, str(OmegaConf.select(cfg, "task._target_")), key="ckpt_path",
        needed_by=f"resuming this {experiment_name(cfg)} run{hint}",
    )  # fmt: skip
    return path


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


def check_run(cfg: DictConfig) -> None:
    """What can be refused before the run writes anything (no results.json, and the CLI removes
    the run dir Hydra made for it): stage/init, the data (``fold``, ``folds``, ``labeled_size``,
    also against the labeled cache's size) and the ``ckpt_path`` to resume from. A missing or
    damaged cache is left to the run, which records it in results.json."""
    check_config(cfg)
    resume_checkpoint(cfg, run_dir_of(cfg))
    datamodule = build_datamodule(cfg)  # fold / folds / labeled_size ranges
    fold_indices = getattr(datamodule, "fold_indices", None)
    if callable(fold_indices):
        with contextlib.suppress(CacheError):  # the run records a missing / bad cache
            fold_indices()  # labeled_size against the labeled cache


# --- objects from config ------------------------------------------------------------------------
def build_datamodule(cfg: DictConfig) -> pl.LightningDataModule:
    """The DataModule of ``cfg.data`` (pretraining: unlabeled cache; fine-tuning: labeled + test)."""
    return instantiate(cfg.data)


def warn_if_data_differ(pretrained: Path, preprocess: Preprocess) -> list[str]:
    """Warn when the fine-tuning data's preprocessing contract differs from the one the pretrained
    network learned from (its checkpoint's): level, patch size, mpp, normalisation or stain
    normalisation. Returns the differences (empty: the same)."""
    try:  # memory-mapped: the weights are not read; a bad file is load_pretrained's to report
        saved = read_preprocess(pretrained)
    except LymphnodeError as err:
        log.warning("cannot compare the data with the pretraining's (%s)", err)
        return []
    differences = saved.differences(preprocess)
    if differences:
        log.warning(
            "the fine-tuning data are preprocessed differently from the pretraining's (%s), "
            "pretraining vs fine-tuning: %s. The pretrained features expect the pretraining's "
            "(data.normalize, data.stain_norm, data.transforms.crop, the caches' level)",
            pretrained,
            "; ".join(differences),
        )
    return differences


def build_task(
    cfg: DictConfig, datamodule: pl.LightningDataModule, pretrained: Path | None
) -> pl.LightningModule:
    """The LightningModule of ``cfg.task`` (pretraining: the pretext's task, conf/task/<pretext>;
    its network nested as ``net``, the pretrained checkpoint by interpolation); warns when
    ``pretrained``'s preprocessing differs from the data's. The module takes the data's contract
    itself when fitting starts (its ``setup``)."""
    if pretrained is not None:
        warn_if_data_differ(pretrained, datamodule.preprocess)  # type: ignore[attr-defined]
    return instantiate(cfg.task)


def compare_selections(cfg: DictConfig) -> list[str]:
    """``cfg.compare_selections`` (selections to report beside ``selection``, e.g. ``[val_loss,
    last]``), checked, without ``selection`` itself and duplicates."""
    wanted = cfg.get("compare_selections") or []
    if isinstance(wanted, str) or not all(isinstance(w, str) for w in wanted):
        raise ConfigError(
            f"compare_selections={wanted!r} is invalid; expected a list of selections, e.g. "
            "[val_loss, last]"
        )
    out: list[str] = []
    for name in wanted:
        check_selection(name, cfg.stage)
        if name != cfg.get("selection") and name not in out:
            out.append(name)
    return out


def build_callbacks(cfg: DictConfig) -> list[Callback]:
    """Every entry of ``cfg.callbacks`` with a ``_target_`` (a null entry is switched off)."""
    callbacks = []
    for name, entry in (cfg.get("callbacks") or {}).items():
        if entry is None:
            continue
        if not isinstance(entry, DictConfig) or "_target_" not in entry:
            raise ConfigError(
                f"callbacks.{name}={entry!r} is invalid; expected a dict with _target_"
            )
        callbacks.append(instantiate(entry))
    for selection in compare_selections(cfg):
        if selection != "last":
            dirpath = Path(cfg.run_dir) / "checkpoints"
            callbacks.append(ShadowSelection(dirpath=dirpath, selection=selection))
    return callbacks


def build_loggers(cfg: DictConfig) -> list[Logger]:
    """Every entry of ``cfg.logger`` with a ``_target_`` (csv, wandb; none: an empty list)."""
    loggers = []
    for name, entry in (cfg.get("logger") or {}).items():
        if entry is None:
            continue
        if not isinstance(entry, DictConfig) or "_target_" not in entry:
            raise ConfigError(f"logger.{name}={entry!r} is invalid; expected a dict with _target_")
        loggers.append(instantiate(entry))
    return loggers


def build_trainer(cfg: DictConfig, callbacks: list[Callback], loggers: list[Logger]) -> pl.Trainer:
    """The Trainer of ``cfg.trainer`` (every key a Trainer argument). With a strategy that spawns
    its processes (``trainer.strategy=ddp_spawn``) the fit's checkpoint, loop and callback state
    comes back to this process (:func:`lymphnode.tasks.spawn.carry_fit_state`), so results.json
    says the same as after a single-process run."""
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    if not isinstance(trainer_cfg, dict) or "_target_" not in trainer_cfg:
        raise ConfigError(f"trainer={trainer_cfg!r} is invalid; expected a dict with _target_")
    trainer = instantiate(trainer_cfg, callbacks=callbacks, logger=loggers or False)
    carry_fit_state(trainer)
    return trainer


# --- results.json -------------------------------------------------------------------------------
def run_dir_of(cfg: DictConfig) -> Path:
    """The run directory (``cfg.run_dir``; Hydra's run/sweep dirs point at the same place)."""
    return Path(cfg.run_dir)


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


def _is_rank_zero() -> bool:
    """Whether this process writes files (rank 0 of a DDP job, or a single process)."""
    return getattr(rank_zero_only, "rank", 0) == 0


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


def train(cfg: DictConfig) -> float:
    """Run one pretraining or fine-tuning run; return ``metrics[cfg.optimized_metric]``.

    Writes ``<run_dir>/results.json``: status ``completed``; ``failed`` with the error (the
    exception propagates); ``interrupted`` when ``max_time`` stopped it before its step/epoch
    budget (evaluated, its metric returned) or a signal did (SIGTERM / Ctrl+C: not evaluated, the
    exception propagates; last.ckpt holds the step reached); or ``debug`` for a ``trainer=debug``
    smoke test. Also ``selection``, ``steps`` (``selected``/``last``: the optimizer step of each
    checkpoint), ``collapsed`` (test recall 0) and ``budget`` (max_steps / max_epochs /
    max_time_s / val_check_interval / stopped_by) and ``resumed`` (the checkpoint and step this
    attempt continued from, or None). With ``skip_if_done`` a run dir whose results.json says
    completed is not trained again: its recorded metric is returned; one that a signal
    interrupted resumes from its last.ckpt (``resume_interrupted``, :func:`interrupted_checkpoint`).
    One process trains a run dir at a time (:func:`lymphnode.core.locks.run_lock`): another job
    of a sweep aimed at the same folder (the scratch runs shared by several pretexts, a
    resubmitted job) waits for it, then skips it when it completed.
    """
    run_dir = run_dir_of(cfg)
    if not _is_rank_zero():  # DDP ranks > 0 run inside rank 0's lock (they write nothing)
        return _train_run(cfg, run_dir)
    with run_lock(run_dir):  # one process per run folder: a second one waits, then skips
        return _train_run(cfg, run_dir)


def _train_run(cfg: DictConfig, run_dir: Path) -> float:
    """:func:`train` for ``run_dir`` (under its run lock on rank 0)."""
    results_path = run_dir / RESULTS_FILE
    previous = read_results(results_path)
    done = cfg.get("skip_if_done") and (previous or {}).get("status") == "completed"
    resuming = not done and interrupted_checkpoint(cfg, run_dir, previous) is not None
    if resuming:
        log.info(
            "%s: the earlier attempt was interrupted (%s) at step %s; resuming from its last.ckpt "
            "(resume_interrupted=false starts over)",
            run_dir, (previous or {}).get("budget", {}).get("stopped_by"),
            ((previous or {}).get("steps") or {}).get("last"),
        )  # fmt: skip
        cfg.ckpt_path = "last"  # recorded as such in results.json
    if not done:
        check_run(cfg)  # bad input before anything is written: no results.json
    if cfg.get("skip_if_done") and previous is not None and not resuming:
        if previous.get("status") == "completed":
            log.info("%s is completed; skipping (skip_if_done=false trains again)", results_path)
            return metric_value(previous.get("metrics") or {}, cfg.optimized_metric)
        log.info(
            "%s: the earlier attempt ended %s (%s); training again",
            run_dir,
            previous.get("status"),
            previous.get("error"),
        )

    results: dict[str, Any] = {
        "status": "failed",
        "experiment": experiment_name(cfg) if cfg.stage in STAGES else cfg.stage,
        "init": "pretrain" if cfg.stage == "pretrain" else cfg.init,
        "pretext": None if cfg.get("init") == "scratch" else cfg.pretext.name,
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
        "config": resolved_config(cfg),
        "error": None,
    }
    if cfg.stage == "pretrain":
        results["labeled_size"] = results["fold"] = None
    try:
        check_selection(cfg.get("selection"), cfg.stage)
        _fit_and_evaluate(cfg, run_dir, results)
        value = metric_value(results["metrics"], cfg.optimized_metric)
    except BaseException as err:
        results.pop("fast_dev_run", None)
        interrupted = results.pop("interrupted", None)
        if interrupted is not None:
            results["status"] = "interrupted"
            results["error"] = (
                f"interrupted ({interrupted}) at step {results['steps']['last']}; resume with "
                "ckpt_path=last"
            )
        else:
            results["error"] = f"{type(err).__name__}: {err}"
        if _is_rank_zero():
            write_results(results_path, results)
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


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
@hydra_boundary
def main(cfg: DictConfig) -> float:
    """The CLI: ``train(cfg)`` behind the error boundary of :mod:`lymphnode.core.boundary` (bad
    input: one line, exit 1; in a ``--multirun`` sweep the failed job is recorded, the others run
    and the sweep exits non-zero; each failed run has its results.json)."""
    return train(cfg)


if __name__ == "__main__":
    main()
