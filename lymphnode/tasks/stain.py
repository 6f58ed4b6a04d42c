"""Stain pretraining: predict a patch's haematoxylin and eosin densities from a copy without them.

A pathology-specific pretext: the network sees a greyscale copy of the patch (``input:
grayscale``) or a copy whose stains were perturbed (``input: hed_jitter``, Tellez et al.'s HED
augmentation, strong) and predicts the haematoxylin and eosin optical densities of the original by
colour deconvolution (Ruifrok & Johnston 2001, scikit-image's ``rgb2hed``). To predict where
haematoxylin lies from luminance alone the network has to recognise nuclei and their density, and
eosin the stroma and cytoplasm: the structures that separate tumour from lymphocytes, with nothing
to gain from memorising a centre's colours. The UNet's top skip may stay: the targets are not in
the input. Fine-tuning takes the whole network.

The densities are scikit-image's: ``hed = max(0, log(max(rgb, 1e-6)) / log(1e-6) @ hed_from_rgb)``
for rgb in 0..1 (:func:`rgb_to_hed`), times ``scale`` so that tissue values are of order 1 (the
default 10 puts haematoxylin of nuclei near 0.5-1 on CAMELYON patches). The prediction is the first
two channels of the network's ``recon`` output.

Batches are dicts ``{"image": (B, 3, H, W) float32 normalised by the preprocessing contract, ...}``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from skimage.color import hed_from_rgb, rgb_from_hed
from torch import Tensor

from lymphnode.core import validate
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

INPUTS = ("grayscale", "hed_jitter")
LOG_ADJUST = math.log(1e-6)  # scikit-image's compensation of the clip
LUMA = (0.2125, 0.7154, 0.0721)  # scikit-image rgb2gray weights


def rgb_to_hed(rgb: Tensor, clip: bool = True) -> Tensor:
    """Colour deconvolution of 0..1 RGB images (B, 3, H, W) into (B, 3, H, W) haematoxylin,
    eosin and DAB densities: scikit-image's ``rgb2hed`` (channels first) with ``clip``; without
    it the negative densities of colours outside the stains' span are kept (so that
    :func:`hed_to_rgb` inverts it exactly)."""
    matrix = torch.as_tensor(hed_from_rgb, dtype=rgb.dtype, device=rgb.device)  # (3, 3)
    od = torch.log(rgb.clamp_min(1e-6)) / LOG_ADJUST  # (B, 3, H, W)
    hed = torch.einsum("bchw,cd->bdhw", od, matrix)
    return hed.clamp_min(0.0) if clip else hed


def hed_to_rgb(hed: Tensor) -> Tensor:
    """The inverse of :func:`rgb_to_hed` (scikit-image's ``hed2rgb``): (B, 3, H, W) densities ->
    0..1 RGB (clipped)."""
    matrix = torch.as_tensor(rgb_from_hed, dtype=hed.dtype, device=hed.device)
    od = torch.einsum("bchw,cd->bdhw", hed, matrix) * LOG_ADJUST
    return torch.exp(od).clamp(0.0, 1.0)


def grayscale(rgb: Tensor) -> Tensor:
    """Luminance of 0..1 RGB (B, 3, H, W) copied to 3 channels (B, 3, H, W)."""
    weights = torch.as_tensor(LUMA, dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
    return (rgb * weights).sum(dim=1, keepdim=True).expand_as(rgb)


def jitter_hed(rgb: Tensor, sigma: float, bias: float, generator: torch.Generator | None) -> Tensor:
    """Per image and stain, densities times U(1 - sigma, 1 + sigma) plus U(-bias, bias) (in
    ``rgb_to_hed`` units), back to 0..1 RGB (B, 3, H, W)."""
    b = rgb.shape[0]
    alpha = 1.0 + (torch.rand(b, 3, 1, 1, generator=generator) * 2 - 1) * sigma
    beta = (torch.rand(b, 3, 1, 1, generator=generator) * 2 - 1) * bias
    hed = rgb_to_hed(rgb, clip=False)
    return hed_to_rgb(hed * alpha.to(hed) + beta.to(hed))


class StainModule(TaskModule):
    """Predict haematoxylin and eosin densities from a greyscale or stain-perturbed copy.

    Args:
        net: the network's config (conf/model/*.yaml); its ``recon`` output's first two channels
            are the prediction.
        input: ``"grayscale"`` or ``"hed_jitter"`` (the stains perturbed by ``sigma``/``bias``).
        sigma, bias: the HED perturbation of ``hed_jitter`` (densities x U(1 +- sigma) +
            U(+-bias), in :func:`rgb_to_hed` units); strong by default (0.5, 0.02).
        scale: multiplies the target densities (order 1 on tissue with the default 10).
        optimizer, scheduler, preprocess, channels_last, log_images_every_n_epochs,
            n_log_images: as :class:`lymphnode.tasks.ReconstructionModule`.

    Logs ``{stage}/loss`` (MSE of the scaled H and E densities), ``{stage}/stain_h_mse`` and
    ``{stage}/stain_e_mse``; on the first validation batch a grid of inputs, network inputs,
    true and predicted haematoxylin. The segmentation head is frozen.
    """

    task_name = "stain"

    def __init__(
        self,
        net: Mapping[str, Any] | None = None,
        input: str = "grayscale",
        sigma: float = 0.5,
        bias: float = 0.02,
        scale: float = 10.0,
        optimizer: Any = DEFAULT_OPTIMIZER,
        scheduler: Any = DEFAULT_SCHEDULER,
        preprocess: Preprocess | Mapping[str, Any] | None = None,
        channels_last: bool = False,
        log_images_every_n_epochs: int = 1,
        n_log_images: int = 8,
    ) -> None:
        super().__init__()
        self.input = validate.choice("input", input, INPUTS)
        self.sigma = validate.number("sigma", sigma, 0.0, 1.0)
        self.bias = validate.number("bias", bias, 0.0)
        self.scale = validate.number("scale", scale, 0.0, strict_minimum=True)
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
        require_recon_head(self.network, "pretext stain")  # its recon predicts the stain
        freeze_heads(self.network.seg_head)
        self.save_hyperparameters(
            {
                **self._common_hparams(),
                "input": self.input,
                "sigma": self.sigma,
                "bias": self.bias,
                "scale": self.scale,
            }
        )

    def inputs_and_targets(
        self, x: Tensor, stage: str, batch_idx: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(network input (B, 3, H, W) normalised, target (B, 2, H, W) scaled H and E densities,
        the 0..1 images (B, 3, H, W)) for normalised images x."""
        rgb = self.denormalize(x.float())  # (B, 3, H, W) 0..1
        target = rgb_to_hed(rgb)[:, :2] * self.scale
        if self.input == "grayscale":
            copy = grayscale(rgb)
        else:
            generator = torch.Generator().manual_seed(batch_idx) if stage != "train" else None
            copy = jitter_hed(rgb, self.sigma, self.bias, generator)
        mean = torch.tensor(self.preprocess.mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.preprocess.std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        return (copy.to(x.dtype) - mean) / std, target.to(x.dtype), rgb

    def _step(self, batch: Mapping[str, Tensor], batch_idx: int, stage: str) -> tuple[Tensor, ...]:
        require_keys(batch, ["image"], "stain")
        x = batch["image"]
        net_input, target, rgb = self.inputs_and_targets(x, stage, batch_idx)
        pred = self.net(net_input).recon[:, :2]  # (B, 2, H, W)
        per_channel = (pred - target).pow(2).mean(dim=(0, 2, 3))  # (2,)
        loss = per_channel.mean()
        kwargs = stage_log_kwargs(stage, x.shape[0])
        self.log(f"{stage}/loss", loss.detach(), **kwargs)
        quiet = {**kwargs, "prog_bar": False}
        self.log(f"{stage}/stain_h_mse", per_channel[0].detach(), **quiet)
        self.log(f"{stage}/stain_e_mse", per_channel[1].detach(), **quiet)
        return loss, net_input, target, pred, rgb

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, batch_idx, "train")[0]

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        _, net_input, target, pred, rgb = self._step(batch, batch_idx, "val")
        if self._should_log_images(batch_idx):
            n = self.n_log_images

            def density(t: Tensor) -> Tensor:  # (n, 1, H, W) scaled H -> grey 0..1
                return (t[:n, :1].float() / 1.5).clamp(0, 1).expand(-1, 3, -1, -1)

            rows = [
                rgb[:n],
                self.denormalize(net_input[:n].float()),
                density(target),
                density(pred),
            ]
            self.log_image_grid(
                "val/stain",
                image_grid(rows),
                f"epoch {self.current_epoch}: input, network input, true H, predicted H",
            )

    def test_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        self._step(batch, batch_idx, "test")


__all__ = ["INPUTS", "StainModule", "grayscale", "hed_to_rgb", "jitter_hed", "rgb_to_hed"]
