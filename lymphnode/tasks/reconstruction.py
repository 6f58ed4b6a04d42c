"""Reconstruction pretraining (the paper's first stage): the network reproduces its input.

By default without the UNet's top skip, as the paper (otherwise the decoder copies the input
through it and the deep blocks learn nothing). The pretext is selected by ``pretext=reconstruction``
(conf/pretext/reconstruction.yaml); the others (masked, contrastive, stain) are
:class:`lymphnode.tasks.TaskModule` subclasses with a YAML there each.

Batches are dicts: ``{"image": (B, 3, H, W) float32, normalised by the preprocessing contract, ...}``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MeanMetric

from lymphnode.core.errors import ConfigError
from lymphnode.models.contract import require_recon_head
from lymphnode.models.preprocess import Preprocess
from lymphnode.tasks.base import (
    DEFAULT_OPTIMIZER,
    DEFAULT_SCHEDULER,
    TaskModule,
    freeze_heads,
    image_grid,
    require_keys,
    stage_log_kwargs,
)

log = logging.getLogger(__name__)

RECON_LOSSES = ("mse", "l1")


class ReconstructionModule(TaskModule):
    """Reconstruction pretraining: the UNet reproduces its normalised input.

    Args:
        net: the network's config (``_target_`` + arguments, conf/model/*.yaml; default the
            UNet); for the UNet ``top_skip`` defaults to False here, as the paper's pretraining.
        loss: ``"mse"`` or ``"l1"`` between reconstruction and input (normalised units).
        optimizer: factory called with the parameters (Hydra ``_partial_: true``), default AdamW
            lr 1e-3, weight decay 1e-4.
        scheduler: factory called with the optimizer, stepped per optimizer step (default cosine
            over the run's steps, see :mod:`lymphnode.tasks.base`); None for a constant rate.
        preprocess: the preprocessing contract (a :class:`Preprocess` or its ``to_dict()``);
            None: taken from the DataModule at setup. Used to de-normalise for PSNR and images,
            and saved for inference.
        channels_last: NHWC memory format (faster convolutions on CPU and recent GPUs).
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
        net: Mapping[str, Any] | None = None,
        loss: str = "mse",
        optimizer: Any = DEFAULT_OPTIMIZER,
        scheduler: Any = DEFAULT_SCHEDULER,
        preprocess: Preprocess | Mapping[str, Any] | None = None,
        channels_last: bool = False,
        log_images_every_n_epochs: int = 1,
        n_log_images: int = 8,
    ) -> None:
        super().__init__()
        if loss not in RECON_LOSSES:
            raise ConfigError(
                f"loss={loss!r} is not supported; expected one of {list(RECON_LOSSES)}"
            )
        self._init_common(
            net,
            {"top_skip": False} if net is None or "_target_" not in net else {},
            optimizer,
            scheduler,
            preprocess,
            channels_last,
            log_images_every_n_epochs,
            n_log_images,
        )
        self.loss_name = loss
        require_recon_head(self.network, "pretext reconstruction")
        freeze_heads(self.network.seg_head)
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
            self.log(f"{stage}/recon_l1", l1, **stage_log_kwargs(stage, x.shape[0]))
        else:
            loss = mse
        self.log(f"{stage}/recon_mse", mse.detach(), **stage_log_kwargs(stage, x.shape[0]))
        self.log(f"{stage}/loss", loss.detach(), **stage_log_kwargs(stage, x.shape[0]))
        return loss, x, recon

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


__all__ = ["RECON_LOSSES", "ReconstructionModule"]
