"""Reconstruction pretraining (the paper's first stage) and what both tasks share.

:class:`UNetTask` holds the UNet as ``self.net``, the input normalisation, the optimizer and
scheduler built from config partials, and image logging (a grid to wandb / TensorBoard, else a PNG
under ``<log_dir>/images/``). :class:`ReconstructionModule` trains the UNet to reproduce its
(normalised) input; by default without the top skip, as the paper.

Batches are dicts: ``{"image": (B, 3, H, W) float32, normalised as (rgb/255 - mean)/std, ...}``.
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
import torch.nn.functional as F
from omegaconf import DictConfig, ListConfig, OmegaConf
from PIL import Image
from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger
from torch import Tensor
from torchmetrics import MeanMetric

import lymphnode
from lymphnode.core.errors import ConfigError
from lymphnode.models.unet import UNet, build_unet
from lymphnode.tasks.callbacks import NonFiniteLossGuard

log = logging.getLogger(__name__)

OptimizerFactory = Callable[..., torch.optim.Optimizer]  # called with the parameters
SchedulerFactory = Callable[..., Any]  # called with the optimizer (and T_max when not bound)
# The defaults: AdamW (lr 1e-3, weight decay 1e-4) and cosine annealing over trainer.max_epochs.
DEFAULT_OPTIMIZER: OptimizerFactory = functools.partial(
    torch.optim.AdamW, lr=1e-3, weight_decay=1e-4
)
DEFAULT_SCHEDULER: SchedulerFactory = functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR)
RECON_LOSSES = ("mse", "l1")
CHECKPOINT_FORMAT = 1


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


def resolve_normalize(normalize: Mapping[str, Any] | None, channels: int) -> dict[str, list[float]]:
    """``{"mean": [...], "std": [...]}`` (0..1 units); None means 0..1 images unchanged."""
    if normalize is None:
        return {"mean": [0.0] * channels, "std": [1.0] * channels}
    normalize = plain(normalize)
    if not isinstance(normalize, Mapping) or set(normalize) != {"mean", "std"}:
        raise ConfigError(
            f"normalize={normalize!r} is invalid; expected {{'mean': [{channels} floats], "
            f"'std': [{channels} floats]}} in 0..1 units, or null"
        )
    out = {}
    for key in ("mean", "std"):
        values = normalize[key]
        if (
            not isinstance(values, list)
            or len(values) != channels
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
        ):
            raise ConfigError(
                f"normalize.{key}={values!r} is invalid; expected a list of {channels} numbers"
            )
        out[key] = [float(v) for v in values]
    if any(v <= 0 for v in out["std"]):
        raise ConfigError(f"normalize.std={out['std']} is invalid; every value must be > 0")
    return out


def _check_positive_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name}={value!r} is invalid; expected an integer >= {minimum}")
    return value


def require_keys(batch: Any, keys: Sequence[str], task: str) -> None:
    """ConfigError when the batch is not a dict holding ``keys``."""
    if not isinstance(batch, Mapping) or any(k not in batch for k in keys):
        have = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise ConfigError(f"{task} batches must be dicts with keys {list(keys)}; got {have}")


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


class UNetTask(pl.LightningModule):
    """What both tasks share: ``self.net`` (UNet), normalisation, optimizers, image logging.

    Subclasses call :meth:`_init_common` from ``__init__`` and then ``save_hyperparameters``
    with :meth:`_common_hparams`.
    """

    net: UNet
    _mean: Tensor  # (1, C, 1, 1) buffer
    _std: Tensor  # (1, C, 1, 1) buffer
    _optimizer_factory: Callable[..., Any]
    _scheduler_factory: Callable[..., Any] | None

    def _init_common(
        self,
        model: Mapping[str, Any] | None,
        model_defaults: Mapping[str, Any],
        optimizer: Any,
        scheduler: Any,
        normalize: Mapping[str, Any] | None,
        patch_size: int,
        level: int,
        log_images_every_n_epochs: int,
        n_log_images: int,
    ) -> None:
        model = plain(model) if model is not None else {}
        if not isinstance(model, Mapping):
            raise ConfigError(f"model={model!r} is invalid; expected a dict of UNet arguments")
        self.net = build_unet({**model_defaults, **model})
        self._optimizer_factory = resolve_factory("optimizer", optimizer)  # type: ignore[assignment]
        if self._optimizer_factory is None:
            raise ConfigError("optimizer=None is invalid; expected an optimizer factory")
        self._scheduler_factory = resolve_factory("scheduler", scheduler)
        self._optimizer_desc = describe_factory(optimizer)
        self._scheduler_desc = describe_factory(scheduler)
        self._normalize = resolve_normalize(normalize, self.net.in_channels)
        self.patch_size = _check_positive_int("patch_size", patch_size, self.net.min_size)
        self.level = _check_positive_int("level", level, 0)
        self.log_images_every_n_epochs = _check_positive_int(
            "log_images_every_n_epochs", log_images_every_n_epochs, 0
        )  # 0: never
        self.n_log_images = _check_positive_int("n_log_images", n_log_images, 1)
        channels = self.net.in_channels
        mean = torch.tensor(self._normalize["mean"]).view(1, channels, 1, 1)
        std = torch.tensor(self._normalize["std"]).view(1, channels, 1, 1)
        self.register_buffer("_mean", mean, persistent=False)  # (1, C, 1, 1)
        self.register_buffer("_std", std, persistent=False)  # (1, C, 1, 1)

    def _common_hparams(self) -> dict[str, Any]:
        return {
            "model": self.net.config,
            "optimizer": self._optimizer_desc,
            "scheduler": self._scheduler_desc,
            "normalize": self._normalize,
            "patch_size": self.patch_size,
            "level": self.level,
            "log_images_every_n_epochs": self.log_images_every_n_epochs,
            "n_log_images": self.n_log_images,
        }

    task_name = "unet"

    def forward(self, x: Tensor) -> Any:
        """The UNet's output for normalised images (B, C, H, W)."""
        return self.net(x)

    def denormalize(self, x: Tensor) -> Tensor:
        """Normalised images (B, C, H, W) -> 0..1 images (clamped)."""
        return (x * self._std + self._mean).clamp(0.0, 1.0)

    # --- optimisation ---------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        """AdamW + cosine by default; the scheduler steps once per epoch and gets
        ``T_max = trainer.max_epochs`` when it takes ``T_max`` and the config does not bind it."""
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = self._optimizer_factory(params)
        if self._scheduler_factory is None:
            return optimizer
        kwargs: dict[str, Any] = {}
        if _accepts(self._scheduler_factory, "T_max") and "T_max" not in _bound_keywords(
            self._scheduler_factory
        ):
            max_epochs = self.trainer.max_epochs
            if max_epochs is None or max_epochs < 1:
                raise ConfigError(
                    f"scheduler T_max is not set and trainer.max_epochs={max_epochs} cannot "
                    "supply it; set scheduler.T_max or trainer.max_epochs"
                )
            kwargs["T_max"] = max_epochs
        scheduler = self._scheduler_factory(optimizer, **kwargs)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"},
        }

    def configure_callbacks(self) -> list[pl.Callback]:
        """A :class:`NonFiniteLossGuard` unless the trainer already has one (a NaN/inf loss always
        stops the run with the step)."""
        callbacks = getattr(self._trainer, "callbacks", [])
        if any(isinstance(c, NonFiniteLossGuard) for c in callbacks):
            return []
        return [NonFiniteLossGuard()]

    # --- checkpoints ----------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Mark the checkpoint as lymphnode's and keep it loadable with ``weights_only=True``
        (DataModule hyperparameters or callback states may hold Paths or OmegaConf objects)."""
        for key in list(checkpoint):
            if key not in ("state_dict", "optimizer_states"):
                checkpoint[key] = weights_only_safe(checkpoint[key])
        checkpoint["lymphnode"] = {
            "format": CHECKPOINT_FORMAT,
            "task": self.task_name,
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


class ReconstructionModule(UNetTask):
    """Reconstruction pretraining: the UNet reproduces its normalised input.

    Args:
        model: UNet arguments (see :class:`lymphnode.models.UNet`); ``top_skip`` defaults to
            False here, as the paper's pretraining.
        loss: ``"mse"`` or ``"l1"`` between reconstruction and input (normalised units).
        optimizer: factory called with the parameters (Hydra ``_partial_: true``), default AdamW
            lr 1e-3, weight decay 1e-4.
        scheduler: factory called with the optimizer, stepped per epoch (default cosine over
            ``trainer.max_epochs``); None for a constant learning rate.
        normalize: ``{"mean": [r, g, b], "std": [r, g, b]}`` in 0..1 units that the data applied
            as ``(rgb/255 - mean)/std``; None means images in 0..1. Used to de-normalise for PSNR
            and images, and saved for inference.
        patch_size: patch side in px of ``level`` (saved for inference).
        level: slide pyramid level of the patches (saved for inference).
        log_images_every_n_epochs: log an inputs-vs-reconstructions grid (the paper's Figure 4)
            on the first validation batch every this many epochs; 0 never.
        n_log_images: patches in that grid.

    Logs ``train/loss``, ``train/recon_mse`` (+ ``train/recon_l1`` with L1), ``val/loss``,
    ``val/recon_mse``, ``val/recon_psnr`` (dB, mean per patch on de-normalised 0..1 images;
    + ``val/recon_l1``); the same under ``test/`` for ``trainer.test``. The segmentation head is
    frozen (it gets no gradient, which DDP would reject).
    """

    task_name = "reconstruction"

    def __init__(
        self,
        model: Mapping[str, Any] | None = None,
        loss: str = "mse",
        optimizer: Any = DEFAULT_OPTIMIZER,
        scheduler: Any = DEFAULT_SCHEDULER,
        normalize: Mapping[str, Any] | None = None,
        patch_size: int = 300,
        level: int = 0,
        log_images_every_n_epochs: int = 1,
        n_log_images: int = 8,
    ) -> None:
        super().__init__()
        if loss not in RECON_LOSSES:
            raise ConfigError(
                f"loss={loss!r} is not supported; expected one of {list(RECON_LOSSES)}"
            )
        self._init_common(
            model,
            {"top_skip": False},
            optimizer,
            scheduler,
            normalize,
            patch_size,
            level,
            log_images_every_n_epochs,
            n_log_images,
        )
        self.loss_name = loss
        self.net.seg_head.requires_grad_(False)
        self.save_hyperparameters({**self._common_hparams(), "loss": loss})
        self.val_psnr = MeanMetric()
        self.test_psnr = MeanMetric()

    def _step(self, batch: Mapping[str, Tensor], stage: str) -> tuple[Tensor, Tensor, Tensor]:
        require_keys(batch, ["image"], "reconstruction")
        x = batch["image"]  # (B, 3, H, W) normalised
        recon = self.net(x).recon  # (B, 3, H, W)
        mse = F.mse_loss(recon, x)
        if self.loss_name == "l1":
            l1 = F.l1_loss(recon, x)
            loss = l1
            self.log(f"{stage}/recon_l1", l1, **self._log_kwargs(stage, x))
        else:
            loss = mse
        self.log(f"{stage}/recon_mse", mse.detach(), **self._log_kwargs(stage, x))
        self.log(f"{stage}/loss", loss.detach(), **self._log_kwargs(stage, x))
        return loss, x, recon

    @staticmethod
    def _log_kwargs(stage: str, x: Tensor) -> dict[str, Any]:
        train = stage == "train"
        return {
            "on_step": train,
            "on_epoch": True,
            "sync_dist": not train,
            "batch_size": x.shape[0],
            "prog_bar": stage != "test",
        }

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")[0]

    def _eval_step(self, batch: Mapping[str, Tensor], batch_idx: int, stage: str) -> None:
        _, x, recon = self._step(batch, stage)
        target, output = self.denormalize(x), self.denormalize(recon)  # (B, 3, H, W) 0..1
        mse = (output - target).pow(2).mean(dim=(1, 2, 3)).clamp_min(1e-10)  # (B,)
        psnr_metric = self.val_psnr if stage == "val" else self.test_psnr
        psnr_metric.update(10.0 * torch.log10(1.0 / mse))
        self.log(f"{stage}/recon_psnr", psnr_metric, on_step=False, on_epoch=True, prog_bar=True)
        if stage == "val" and self._should_log_images(batch_idx):
            n = self.n_log_images
            grid = image_grid([target[:n], output[:n]])
            self.log_image_grid(
                "val/reconstructions",
                grid,
                f"epoch {self.current_epoch}: inputs (top) vs reconstructions (bottom)",
            )

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "val")

    def test_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "test")


__all__ = [
    "DEFAULT_OPTIMIZER",
    "DEFAULT_SCHEDULER",
    "RECON_LOSSES",
    "ReconstructionModule",
    "UNetTask",
    "describe_factory",
    "image_grid",
    "resolve_factory",
]
