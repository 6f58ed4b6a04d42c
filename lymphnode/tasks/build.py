"""Objects of a training run from its config, and the checks that can refuse the config first.

Everything is built from the config's ``_target_`` (conf/, read top to bottom in conf/train.yaml):
the DataModule (``data``), the task module (``task``, or the pretext's for pretraining) with its
network nested as ``net: ${model}``, callbacks, loggers and the Trainer. Nothing is injected in
code: the pretrained checkpoint reaches the task by interpolation (``${pretrained_if:...}``), and
the preprocessing contract reaches it from the DataModule (:meth:`lymphnode.tasks.TaskModule.setup`).
What a run does with these objects (fit, evaluate, record) is :mod:`lymphnode.tasks.lifecycle`'s.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import Logger

from lymphnode.core import validate
from lymphnode.core.errors import CheckpointError, ConfigError, LymphnodeError
from lymphnode.models.checkpoint import check_task, read_preprocess
from lymphnode.models.preprocess import Preprocess
from lymphnode.tasks.checkpointing import ShadowSelection, check_selection
from lymphnode.tasks.spawn import carry_fit_state

log = logging.getLogger(__name__)

STAGES = ("pretrain", "finetune")  # which half of the method a run is
INITS = ("pretrained", "scratch")  # how a fine-tuning run's weights start


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
    # lr / weight decay / budgets / validation interval: one error line, not a torch traceback
    plain: dict[str, Any] = {}
    optimizer = OmegaConf.select(cfg, "task.optimizer")
    if optimizer is not None:
        plain["task"] = {"optimizer": OmegaConf.to_container(optimizer, resolve=True)}
    if OmegaConf.select(cfg, "trainer") is not None:
        plain["trainer"] = OmegaConf.to_container(cfg.trainer, resolve=True)
    validate.training(plain)


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


#: Callbacks that only write to a logger: left out when the run has none (``logger=none``), where
#: Lightning's LearningRateMonitor would refuse to start.
LOGGER_ONLY_CALLBACKS = ("pytorch_lightning.callbacks.LearningRateMonitor",)


def build_callbacks(cfg: DictConfig) -> list[Callback]:
    """Every entry of ``cfg.callbacks`` with a ``_target_`` (a null entry is switched off; a
    :data:`LOGGER_ONLY_CALLBACKS` entry too when the run has no logger)."""
    callbacks = []
    has_logger = any(entry is not None for entry in (cfg.get("logger") or {}).values())
    for name, entry in (cfg.get("callbacks") or {}).items():
        if entry is None:
            continue
        if not isinstance(entry, DictConfig) or "_target_" not in entry:
            raise ConfigError(
                f"callbacks.{name}={entry!r} is invalid; expected a dict with _target_"
            )
        if not has_logger and entry._target_ in LOGGER_ONLY_CALLBACKS:
            log.info("callbacks.%s left out: it writes to a logger and logger=none has none", name)
            continue
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
