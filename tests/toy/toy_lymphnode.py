"""A toy network and a toy pretext task that live outside lymphnode/ (test_registries.py): what a
user adds for a new network or pretext is one module like this plus one YAML each (conf/)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lymphnode.tasks.base import DEFAULT_OPTIMIZER, DEFAULT_SCHEDULER, TaskModule


class ToyOutput(NamedTuple):
    recon: Tensor  # (B, 3, H, W)
    seg: Tensor  # (B, 1, H, W) logits


class ToyNet(nn.Module):
    """One 3x3 convolution (the encoder) and two 1x1 heads: the network contract the task modules
    expect (lymphnode.models.contract.SegmentationNetwork)."""

    encoder_prefix = "body."
    in_channels = 3
    min_size = 1

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.width = width
        self.body = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU())
        self.recon_head = nn.Conv2d(width, 3, 1)
        self.seg_head = nn.Conv2d(width, 1, 1)

    @property
    def config(self) -> dict[str, Any]:
        return {"width": self.width}

    @property
    def encoder_channels(self) -> int:
        return self.width

    def encode(self, x: Tensor) -> Tensor:
        return self.body(x)  # (B, width, H, W)

    def forward(self, x: Tensor) -> ToyOutput:
        h = self.body(x)  # (B, width, H, W)
        return ToyOutput(recon=self.recon_head(h), seg=self.seg_head(h))

    def depth_groups(self) -> dict[str, list[str]]:
        names = [n for n, _ in self.named_parameters()]
        return {
            "enc0": [n for n in names if n.startswith("body.")],
            "heads": [n for n in names if not n.startswith("body.")],
        }

    def prepare_transfer(self, source_config: Mapping[str, Any]) -> list[str]:
        return []  # every tensor transfers


class DenoisePretext(TaskModule):
    """Pretext: reconstruct the clean input from a noisy copy (logs ``{stage}/denoise_mse``)."""

    task_name = "denoise"

    def __init__(
        self,
        net: Mapping[str, Any] | None = None,
        noise: float = 0.2,
        optimizer: Any = DEFAULT_OPTIMIZER,
        scheduler: Any = DEFAULT_SCHEDULER,
        preprocess: Any = None,
        channels_last: bool = False,
        log_images_every_n_epochs: int = 0,
        n_log_images: int = 8,
    ) -> None:
        super().__init__()
        self._init_common(net, {}, optimizer, scheduler, preprocess, channels_last,
                          log_images_every_n_epochs, n_log_images)  # fmt: skip
        self.noise = float(noise)
        self.save_hyperparameters({**self._common_hparams(), "noise": self.noise})

    def _step(self, batch: Mapping[str, Tensor], stage: str) -> Tensor:
        x = batch["image"]  # (B, 3, H, W) normalised
        loss = F.mse_loss(self.net(x + self.noise * torch.randn_like(x)).recon, x)
        for key in (f"{stage}/denoise_mse", f"{stage}/loss"):  # {stage}/loss: selection=val_loss
            self.log(key, loss, on_step=stage == "train", on_epoch=True, batch_size=x.shape[0])
        return loss

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        self._step(batch, "val")
