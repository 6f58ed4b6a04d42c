"""What every lymphnode task module shares: the network by ``_target_``, the preprocessing
contract, optimizers and schedules from config partials, checkpoints and image logging.

A task module (:class:`TaskModule` subclass; conf/task/*.yaml or, for pretraining, conf/pretext/*.yaml)
gets its network as a config dict (``net:``, conf/model/*.yaml, built with
:func:`lymphnode.models.registry.build_network`) and records it, the task's own class and the
preprocessing contract in every checkpoint, so that :func:`lymphnode.models.checkpoint.load_inference_model`
rebuilds any registered network and task.

The preprocessing contract (:class:`lymphnode.models.Preprocess`) comes from the DataModule: the
documented hook is :meth:`TaskModule.setup`, which takes ``trainer.datamodule.preprocess`` when the
module was built without one, and stores it as the ``preprocess`` hyperparameter (plain data), so a
checkpoint carries it and ``load_from_checkpoint`` restores it.

The learning-rate schedule steps once per optimizer step; a scheduler with ``T_max`` (the default
cosine) gets the run's total optimizer steps (``trainer.estimated_stepping_batches``, whether the
budget is ``max_steps`` or ``max_epochs``) minus one, so the last step trains at its minimum.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from PIL import Image
from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger
from torch import Tensor, nn

import lymphnode
from lymphnode.core import validate
from lymphnode.core.errors import ConfigError
from lymphnode.models.contract import SegmentationNetwork, require_contract
from lymphnode.models.preprocess import Preprocess
from lymphnode.models.registry import TARGET, build_network
from lymphnode.tasks.callbacks import NonFiniteLossGuard

log = logging.getLogger(__name__)

OptimizerFactory = Callable[..., torch.optim.Optimizer]  # called with the parameters
SchedulerFactory = Callable[..., Any]  # called with the optimizer (and T_max when not bound)
# The defaults: AdamW (lr 1e-3, weight decay 1e-4) and cosine annealing over the run's steps.
DEFAULT_OPTIMIZER: OptimizerFactory = functools.partial(
    torch.optim.AdamW, lr=1e-3, weight_decay=1e-4
)
DEFAULT_SCHEDULER: SchedulerFactory = functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR)
DEFAULT_NET: dict[str, Any] = {TARGET: "lymphnode.models.UNet"}
CHECKPOINT_FORMAT = 2  # 2: checkpoint["lymphnode"] names the task class and the network's attribute


def plain(value: Any) -> Any:
    """OmegaConf containers, tuples and tensors -> plain lists/dicts/numbers (YAML- and
    ``weights_only``-safe); anything else unusual -> its repr."""
    if isinstance(value, DictConfig | ListConfig):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, Tensor):
        return value.tolist()
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, Path):
        return str(value)
    return repr(value)


def weights_only_safe(value: Any) -> Any:
    """Paths -> str, OmegaConf containers -> dicts/lists, numpy scalars -> numbers, recursively;
    tensors and everything else unchanged. What ``torch.load(weights_only=True)`` can then read
    (e.g. a DataModule's hyperparameters holding a ``Path``)."""
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, dict):
        return {k: weights_only_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple) and not hasattr(value, "_fields"):
        return type(value)(weights_only_safe(v) for v in value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    return value


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def describe_factory(factory: Any) -> dict[str, Any] | None:
    """A Hydra-style dict (``_target_`` + bound keywords) for an optimizer/scheduler factory, so
    that hyperparameters stay plain data and can rebuild it (see :func:`resolve_factory`)."""
    if factory is None:
        return None
    if isinstance(factory, Mapping | DictConfig):
        return plain(factory)
    if isinstance(factory, functools.partial):
        out: dict[str, Any] = {"_target_": _qualname(factory.func)}
        if factory.args:
            out["_args_"] = plain(list(factory.args))
        out.update({k: plain(v) for k, v in factory.keywords.items()})
        return out
    return {"_target_": _qualname(factory)}


def resolve_factory(name: str, factory: Any) -> Callable[..., Any] | None:
    """A callable from a partial/callable, or from a Hydra-style dict with ``_target_``."""
    if factory is None or callable(factory):
        return factory
    if isinstance(factory, Mapping | DictConfig) and "_target_" in factory:
        from hydra.utils import instantiate

        return instantiate(plain(factory), _partial_=True)
    raise ConfigError(
        f"{name}={factory!r} is invalid; expected a callable (Hydra `_partial_: true`), a dict "
        "with `_target_`, or null"
    )


def _bound_keywords(factory: Callable[..., Any]) -> dict[str, Any]:
    keywords: dict[str, Any] = {}
    while isinstance(factory, functools.partial):
        keywords = {**factory.keywords, **keywords}
        factory = factory.func
    return keywords


def _accepts(factory: Callable[..., Any], name: str) -> bool:
    try:
        return name in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False


def require_keys(batch: Any, keys: Sequence[str], task: str) -> None:
    """ConfigError when the batch is not a dict holding ``keys``."""
    if not isinstance(batch, Mapping) or any(k not in batch for k in keys):
        have = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise ConfigError(f"{task} batches must be dicts with keys {list(keys)}; got {have}")


def stage_log_kwargs(stage: str, batch_size: int) -> dict[str, Any]:
    """``self.log`` keywords of a loss at ``stage``: per step and epoch in training (not synced),
    per epoch and synced over DDP ranks in validation/test, on the progress bar except in test."""
    train = stage == "train"
    return {
        "on_step": train,
        "on_epoch": True,
        "sync_dist": not train,
        "batch_size": batch_size,
        "prog_bar": stage != "test",
    }


def freeze_heads(*heads: nn.Module | None) -> None:
    """``requires_grad_(False)`` on the network's heads a task does not train (they get no
    gradient, which DDP would reject); None (a head the network lacks) is skipped."""
    for head in heads:
        if head is not None:
            head.requires_grad_(False)


def image_grid(rows: Sequence[Tensor], pad: int = 2) -> np.ndarray:
    """Tile rows of images into one uint8 RGB array on a white background.

    Each row is (N, 3, H, W) float in 0..1 (clamped); the result is
    (R*(H+pad)+pad, N*(W+pad)+pad, 3) uint8, rows top to bottom, images left to right.
    """
    n, _, h, w = rows[0].shape
    grid = np.full((len(rows) * (h + pad) + pad, n * (w + pad) + pad, 3), 255, np.uint8)
    for r, row in enumerate(rows):
        row_u8 = (row.detach().float().clamp(0, 1) * 255).round().byte().cpu()  # (N, 3, H, W)
        images = row_u8.permute(0, 2, 3, 1).numpy()  # (N, H, W, 3)
        for i in range(n):
            y, x = pad + r * (h + pad), pad + i * (w + pad)
            grid[y : y + h, x : x + w] = images[i]
    return grid


class TaskModule(pl.LightningModule):
    """What every task shares: ``self.net`` (built from ``net``), the preprocessing contract,
    optimizers and per-step schedules, checkpoint records, image logging.

    Subclasses call :meth:`_init_common` from ``__init__`` and then ``save_hyperparameters``
    with :meth:`_common_hparams` plus their own arguments, and override :meth:`probabilities`
    when they predict tumour probabilities (what ``infer`` asks for).
    """

    net: nn.Module  # implements SegmentationNetwork (checked when built); see `network`
    net_attribute = "net"  # where the network lives; checkpoints record it (state_dict prefix)
    # What a fine-tuning run takes from this task's checkpoints (checkpoint["lymphnode"]["transfer"]):
    # "network" (every tensor) or "encoder" (a pretext that trains only the encoder).
    transfer = "network"
    _optimizer_factory: Callable[..., Any]
    _scheduler_factory: Callable[..., Any] | None

    def _init_common(
        self,
        net: Mapping[str, Any] | None,
        net_defaults: Mapping[str, Any],
        optimizer: Any,
        scheduler: Any,
        preprocess: Preprocess | Mapping[str, Any] | None,
        channels_last: bool,
        log_images_every_n_epochs: int,
        n_log_images: int,
    ) -> None:
        net = plain(net) if net is not None else {}
        if not isinstance(net, Mapping):
            raise ConfigError(
                f"net={net!r} is invalid; expected a dict with _target_ and the network's "
                "arguments (conf/model/*.yaml)"
            )
        self._net_config = {**DEFAULT_NET, **net_defaults, **net}
        self.net = build_network(self._net_config)
        require_contract(self.net)  # one ConfigError naming the class and what it lacks
        self._optimizer_factory = resolve_factory("optimizer", optimizer)  # type: ignore[assignment]
        if self._optimizer_factory is None:
            raise ConfigError("optimizer=None is invalid; expected an optimizer factory")
        self._scheduler_factory = resolve_factory("scheduler", scheduler)
        self._optimizer_desc = describe_factory(optimizer)
        self._scheduler_desc = describe_factory(scheduler)
        self._preprocess: Preprocess | None = None
        if preprocess is not None:
            self._preprocess = (
                preprocess
                if isinstance(preprocess, Preprocess)
                else Preprocess.from_dict(plain(preprocess))
            )
            self._check_patch_size(self._preprocess)
        if not isinstance(channels_last, bool):
            raise ConfigError(f"channels_last={channels_last!r} is invalid; expected true or false")
        self.channels_last = channels_last
        self.log_images_every_n_epochs = validate.integer(
            "log_images_every_n_epochs", log_images_every_n_epochs, 0
        )  # 0: never
        self.n_log_images = validate.integer("n_log_images", n_log_images, 1)

    def _common_hparams(self) -> dict[str, Any]:
        return {
            "net": dict(self._net_config),
            "optimizer": self._optimizer_desc,
            "scheduler": self._scheduler_desc,
            "preprocess": None if self._preprocess is None else self._preprocess.to_dict(),
            "channels_last": self.channels_last,
            "log_images_every_n_epochs": self.log_images_every_n_epochs,
            "n_log_images": self.n_log_images,
        }

    task_name = "task"

    @property
    def network(self) -> SegmentationNetwork:
        """``self.net`` as the network contract it was checked against when built."""
        return self.net  # type: ignore[return-value]

    # --- the preprocessing contract -------------------------------------------------------
    @property
    def preprocess(self) -> Preprocess:
        """The contract the inputs were made with (from the DataModule, see :meth:`setup`)."""
        if self._preprocess is None:
            raise ConfigError(
                f"{type(self).__name__} has no preprocessing contract: pass preprocess= or fit it "
                "with a DataModule that has a `preprocess` attribute (lymphnode.data)"
            )
        return self._preprocess

    def _check_patch_size(self, preprocess: Preprocess) -> None:
        minimum = int(self.network.min_size)
        if preprocess.patch_size < minimum:
            raise ConfigError(
                f"preprocess patch_size={preprocess.patch_size} px is smaller than the network's "
                f"minimum input {minimum} px ({self._net_config.get(TARGET)})"
            )

    def setup(self, stage: str) -> None:
        """The DataModule hook: take ``trainer.datamodule.preprocess`` when this module has no
        contract yet (saved as the ``preprocess`` hyperparameter, hence in checkpoints); warn
        when it has one that differs from the DataModule's. Also switches to channels-last."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer else None
        theirs = getattr(datamodule, "preprocess", None)
        if isinstance(theirs, Preprocess):
            if self._preprocess is None:
                self._check_patch_size(theirs)
                self._preprocess = theirs
                self.hparams["preprocess"] = theirs.to_dict()
            elif self._preprocess != theirs:
                log.warning(
                    "%s: the DataModule's preprocessing differs from the module's (%s); the "
                    "module's is kept",
                    type(self).__name__,
                    "; ".join(self._preprocess.differences(theirs)),
                )
        if self.channels_last:
            self.to(memory_format=torch.channels_last)  # type: ignore[call-overload]

    def forward(self, x: Tensor) -> Any:
        """The network's output for normalised images (B, C, H, W)."""
        return self.net(x)

    def probabilities(self, x: Tensor) -> Tensor:
        """Tumour probabilities (B, 1, H, W) for normalised images (B, C, H, W); what ``infer``
        asks for. Tasks that predict none (pretext tasks) raise ConfigError."""
        raise ConfigError(
            f"{type(self).__name__} ({self.task_name}) predicts no tumour probabilities: infer "
            "needs a fine-tuned checkpoint (e.g. of lymphnode.tasks.MultiTaskModule)"
        )

    def denormalize(self, x: Tensor) -> Tensor:
        """Normalised images (B, C, H, W) -> 0..1 images (clamped)."""
        return self.preprocess.denormalize(x)

    # --- optimisation ---------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        """AdamW + cosine by default; the scheduler steps once per optimizer step and gets
        ``T_max = total steps - 1`` (``trainer.estimated_stepping_batches``) when it takes
        ``T_max`` and the config does not bind it: the last step trains at the minimum."""
        optimizer = self._optimizer_factory(self.optimizer_param_groups())
        for group in optimizer.param_groups:  # groups with their own scale of the base lr
            group["lr"] = group["lr"] * float(group.get("lr_scale", 1.0))
        if self._scheduler_factory is None:
            return optimizer
        kwargs: dict[str, Any] = {}
        if _accepts(self._scheduler_factory, "T_max") and "T_max" not in _bound_keywords(
            self._scheduler_factory
        ):
            total = self.trainer.estimated_stepping_batches
            if not isinstance(total, int | float) or not np.isfinite(total) or total < 1:
                raise ConfigError(
                    f"scheduler T_max is not set and the run's optimizer steps ({total}) cannot "
                    "supply it; set trainer.max_steps or trainer.max_epochs, or scheduler.T_max"
                )
            kwargs["T_max"] = max(1, int(total) - 1)
        scheduler = self._scheduler_factory(optimizer, **kwargs)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }

    def optimizer_param_groups(self) -> list[dict[str, Any]]:
        """The optimizer's parameter groups: one group of every trainable parameter. Subclasses
        may split it; a group's ``lr_scale`` multiplies the optimizer's lr for that group."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def configure_callbacks(self) -> list[pl.Callback]:
        """A :class:`NonFiniteLossGuard` unless the trainer already has one (a NaN/inf loss always
        stops the run with the step)."""
        callbacks = getattr(self._trainer, "callbacks", [])
        if any(isinstance(c, NonFiniteLossGuard) for c in callbacks):
            return []
        return [NonFiniteLossGuard()]

    # --- checkpoints ----------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the task class, the network's attribute and the lymphnode version, and keep
        the checkpoint loadable with ``weights_only=True`` (DataModule hyperparameters or
        callback states may hold Paths or OmegaConf objects)."""
        for key in list(checkpoint):
            if key not in ("state_dict", "optimizer_states"):
                checkpoint[key] = weights_only_safe(checkpoint[key])
        cls = type(self)
        checkpoint["lymphnode"] = {
            "format": CHECKPOINT_FORMAT,
            "task": self.task_name,
            "task_target": f"{cls.__module__}.{cls.__qualname__}",
            "net_attribute": self.net_attribute,
            "transfer": self.transfer,
            "version": lymphnode.__version__,
        }

    # --- image logging --------------------------------------------------------------------
    def _should_log_images(self, batch_idx: int) -> bool:
        trainer = self._trainer
        if trainer is None or batch_idx != 0 or self.log_images_every_n_epochs == 0:
            return False
        if trainer.sanity_checking or not trainer.is_global_zero:
            return False
        return self.current_epoch % self.log_images_every_n_epochs == 0

    def log_image_grid(self, key: str, grid: np.ndarray, caption: str) -> None:
        """Send a uint8 (H, W, 3) image to every image-capable logger (wandb, TensorBoard);
        without one, write ``<trainer.log_dir>/images/<key>_epoch<NNNN>.png``."""
        trainer = self.trainer
        sent = False
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(
                    key=key, images=[grid], step=trainer.global_step, caption=[caption]
                )
                sent = True
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(key, grid, trainer.global_step, dataformats="HWC")
                sent = True
        if sent:
            return
        folder = Path(trainer.log_dir or trainer.default_root_dir) / "images"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{key.replace('/', '_')}_epoch{self.current_epoch:04d}.png"
        Image.fromarray(grid).save(path)
        log.debug("%s: %s -> %s", key, caption, path)


__all__ = [
    "DEFAULT_OPTIMIZER",
    "DEFAULT_SCHEDULER",
    "TaskModule",
    "describe_factory",
    "freeze_heads",
    "image_grid",
    "plain",
    "require_keys",
    "resolve_factory",
    "stage_log_kwargs",
    "weights_only_safe",
]
