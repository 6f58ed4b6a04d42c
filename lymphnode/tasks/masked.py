"""Masked-image pretraining: the network restores blocks of its input that were hidden from it.

Beyond the paper's plain reconstruction (which a UNet can solve by copying, hence its removed top
skip): square blocks of ``block`` px covering a fraction ``ratio`` of the patch are replaced by a
fill, and the loss is the reconstruction error on the hidden pixels only, so the network must infer
tissue from its context. The top skip may stay (``model.top_skip=true``): a hidden pixel cannot be
copied through it. Selected by ``pretext=masked`` (conf/pretext/masked.yaml); fine-tuning takes the
whole network (encoder, decoder, heads), as after reconstruction.

Batches are dicts: ``{"image": (B, 3, H, W) float32, normalised by the preprocessing contract, ...}``.
Masks are drawn per image on a grid of ``block`` x ``block`` cells (the last row/column clipped at
the patch border): exactly ``round(ratio * cells)`` cells per image, uniformly without replacement.
Validation and test draw their masks from a generator seeded by the batch index, so the validation
loss of two epochs is comparable.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lymphnode.core import validate
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

FILLS = ("learned", "zero")
MASKED_LOSSES = ("mse", "l1")


def block_masks(
    batch: int,
    height: int,
    width: int,
    block: int,
    ratio: float,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Random block masks (B, 1, H, W) float32 in {0, 1} (1 = hidden).

    The patch is cut into ``ceil(H / block) x ceil(W / block)`` cells of ``block`` px (the last
    row and column clipped at the border); each image hides exactly ``round(ratio * cells)`` of
    them (at least one), drawn uniformly without replacement from ``generator``.
    """
    rows, cols = math.ceil(height / block), math.ceil(width / block)
    cells = rows * cols
    hidden = min(cells, max(1, round(ratio * cells)))
    scores = torch.rand(batch, cells, generator=generator)  # on the CPU: same draws everywhere
    order = scores.argsort(dim=1)
    grid = torch.zeros(batch, cells)
    grid.scatter_(1, order[:, :hidden], 1.0)
    grid = grid.view(batch, 1, rows, cols)
    full = grid.repeat_interleave(block, dim=2).repeat_interleave(block, dim=3)
    return full[:, :, :height, :width].contiguous().to(device)


class MaskedModule(TaskModule):
    """Masked-image modelling for the UNet (or any network with a ``recon`` output).

    Args:
        net: the network's config (conf/model/*.yaml; default the UNet with its default
            ``top_skip``).
        block: side of a hidden block in px of the patch's level (32 by default).
        ratio: share of the cells hidden per image, in (0, 1) (0.6 by default).
        fill: ``"learned"`` (one learned colour per channel, in normalised units, trained with
            the network) or ``"zero"`` (0 in normalised units: the contract's mean colour).
        loss: ``"mse"`` or ``"l1"`` on the hidden pixels (normalised units), averaged over them.
        optimizer, scheduler, preprocess, channels_last, log_images_every_n_epochs,
            n_log_images: as :class:`lymphnode.tasks.ReconstructionModule`.

    Logs ``{stage}/loss`` (the masked loss) and ``{stage}/masked_mse`` (MSE on the hidden
    pixels, whatever the loss), and on the first validation batch a grid of inputs, masked
    inputs and reconstructions. The segmentation head is frozen.
    """

    task_name = "masked"

    def __init__(
        self,
        net: Mapping[str, Any] | None = None,
        block: int = 32,
        ratio: float = 0.6,
        fill: str = "learned",
        loss: str = "mse",
        optimizer: Any = DEFAULT_OPTIMIZER,
        scheduler: Any = DEFAULT_SCHEDULER,
        preprocess: Preprocess | Mapping[str, Any] | None = None,
        channels_last: bool = False,
        log_images_every_n_epochs: int = 1,
        n_log_images: int = 8,
    ) -> None:
        super().__init__()
        self.block = validate.integer("block", block, 1)
        self.ratio = validate.number("ratio", ratio, 0.0, 1.0, strict_minimum=True)
        if self.ratio == 1.0:
            raise ConfigError("ratio=1.0 is invalid: expected a share in (0, 1), some context kept")
        validate.choice("fill", fill, FILLS)
        validate.choice("loss", loss, MASKED_LOSSES)
        self.fill, self.loss_name = fill, loss
        self._init_common(
            net,
            {},
            optimizer,
            scheduler,
            preprocess,
            channels_last,
            log_images_every_n_epochs,
            n_log_images,
        )
        require_recon_head(self.network, "pretext masked")
        channels = int(self.network.in_channels)
        self.fill_value = nn.Parameter(
            torch.zeros(1, channels, 1, 1), requires_grad=fill == "learned"
        )
        freeze_heads(self.network.seg_head)
        self.save_hyperparameters(
            {
                **self._common_hparams(),
                "block": self.block,
                "ratio": self.ratio,
                "fill": fill,
                "loss": loss,
            }
        )

    def masks_for(self, x: Tensor, stage: str, batch_idx: int) -> Tensor:
        """Masks (B, 1, H, W) for images x (B, C, H, W): fresh random ones in training, seeded
        by ``batch_idx`` in validation and test."""
        generator = None
        if stage != "train":
            generator = torch.Generator().manual_seed(batch_idx)
        b, _, h, w = x.shape
        return block_masks(b, h, w, self.block, self.ratio, generator=generator, device=x.device)

    def _step(
        self, batch: Mapping[str, Tensor], batch_idx: int, stage: str
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        require_keys(batch, ["image"], "masked")
        x = batch["image"]  # (B, C, H, W) normalised
        mask = self.masks_for(x, stage, batch_idx).to(x.dtype)  # (B, 1, H, W)
        masked = x * (1.0 - mask) + self.fill_value.to(x.dtype) * mask
        recon = self.net(masked).recon  # (B, C, H, W)
        hidden = mask.expand_as(x)
        count = hidden.sum().clamp_min(1.0)
        error = recon - x
        mse = (error.pow(2) * hidden).sum() / count
        loss = mse if self.loss_name == "mse" else (error.abs() * hidden).sum() / count
        kwargs = stage_log_kwargs(stage, x.shape[0])
        self.log(f"{stage}/loss", loss.detach(), **kwargs)
        self.log(f"{stage}/masked_mse", mse.detach(), **{**kwargs, "prog_bar": False})
        return loss, x, masked, recon

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, batch_idx, "train")[0]

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        _, x, masked, recon = self._step(batch, batch_idx, "val")
        if self._should_log_images(batch_idx):
            n = self.n_log_images
            rows = [self.denormalize(t[:n].float()) for t in (x, masked, recon)]
            self.log_image_grid(
                "val/masked",
                image_grid(rows),
                f"epoch {self.current_epoch}: inputs, masked inputs, reconstructions",
            )

    def test_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        self._step(batch, batch_idx, "test")


__all__ = ["FILLS", "MaskedModule", "block_masks"]
