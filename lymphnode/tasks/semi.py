"""Semi-supervised fine-tuning with the unlabeled pool: weak-to-strong pseudo-labels (FixMatch).

FixMatch (Sohn et al. 2020), in the segmentation form UniMatch/UniMatch-style methods use: the
network predicts an unlabeled patch under a *weak* view (the usual training augmentation); pixels
it is confident about (max(p, 1 - p) >= ``threshold``) become hard pseudo-labels; the network is
then trained to predict those labels under a *strong* view of the same patch — here a strong
stain perturbation (:func:`strong_stain`: HED scaling/offsets plus brightness, contrast and
saturation), geometrically aligned with the weak view, so that the pseudo-label of every pixel
still applies. With the unlabeled pool drawn from other centres, the network learns to give the
same answer under those centres' stains.

The unsupervised loss is the BCE over confident pixels divided by *all* pixels of the batch (as
FixMatch: few confident pixels give a small loss), weighted by ``weight`` and ramped linearly
from 0 over the first ``warmup_steps`` optimizer steps (an untrained network's confident pixels
are noise).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from skimage.color import hed_from_rgb, rgb_from_hed
from torch import Tensor

from lymphnode.core import validate
from lymphnode.core.errors import ConfigError

SEMI_KEYS = ("weight", "threshold", "warmup_steps", "sigma", "bias", "jitter")
SEMI_DEFAULTS: dict[str, float] = {
    "weight": 1.0,  # of the unsupervised loss beside the supervised one
    "threshold": 0.95,  # confidence max(p, 1 - p) a pixel needs to become a pseudo-label
    "warmup_steps": 50,  # linear ramp of the weight from 0 (optimizer steps)
    "sigma": 0.2,  # HED scale factors ~ U(1 - sigma, 1 + sigma) per stain (strong view)
    "bias": 0.1,  # HED offsets ~ U(-bias, bias) in optical density per stain
    "jitter": 0.2,  # brightness / contrast / saturation factors ~ U(1 - jitter, 1 + jitter)
}
_OD_MIN = 1.0 / 255.0


@dataclass(frozen=True)
class SemiSettings:
    """The checked ``task.semi`` settings (see :data:`SEMI_DEFAULTS` for units)."""

    weight: float
    threshold: float
    warmup_steps: int
    sigma: float
    bias: float
    jitter: float

    @classmethod
    def parse(cls, semi: Mapping[str, Any] | None) -> SemiSettings | None:
        """``task.semi`` (None: off) with its defaults, validated."""
        if semi is None:
            return None
        if not isinstance(semi, Mapping):
            raise ConfigError(
                f"task.semi={semi!r} is invalid: expected null or a mapping with keys "
                f"{list(SEMI_KEYS)}"
            )
        options = {**SEMI_DEFAULTS, **validate.keys("task.semi", dict(semi), SEMI_KEYS)}
        threshold = validate.number("task.semi.threshold", options["threshold"], 0.5)
        if threshold >= 1.0:
            raise ConfigError(f"task.semi.threshold={threshold} is invalid: expected in [0.5, 1)")
        sigma = validate.number("task.semi.sigma", options["sigma"], 0.0)
        jitter = validate.number("task.semi.jitter", options["jitter"], 0.0)
        if sigma >= 1.0 or jitter >= 1.0:
            raise ConfigError(
                f"task.semi.sigma={sigma} / jitter={jitter} is invalid: expected in [0, 1)"
            )
        return cls(
            weight=validate.number("task.semi.weight", options["weight"], 0.0),
            threshold=threshold,
            warmup_steps=validate.integer("task.semi.warmup_steps", options["warmup_steps"], 0),
            sigma=sigma,
            bias=validate.number("task.semi.bias", options["bias"], 0.0),
            jitter=jitter,
        )

    def as_dict(self) -> dict[str, Any]:
        """Plain values (the checkpoint's hyper-parameters)."""
        return {k: getattr(self, k) for k in SEMI_KEYS}

    def weight_at(self, step: int) -> float:
        """The unsupervised weight at optimizer step ``step`` (linear warm-up)."""
        if self.warmup_steps <= 0:
            return self.weight
        return self.weight * min(1.0, step / self.warmup_steps)


def strong_stain(
    rgb: Tensor, settings: SemiSettings, generator: torch.Generator | None = None
) -> Tensor:
    """A strong stain view of RGB images (B, 3, H, W) in 0..1, per image: HED scaling/offsets
    (``hed' = alpha * hed + beta`` in optical-density units, scikit-image's Ruifrok-Johnston
    matrices), then brightness, contrast and saturation factors; returns (B, 3, H, W) in 0..1.
    The geometry is untouched: pixel (i, j) of the output shows pixel (i, j) of the input."""
    b = rgb.shape[0]
    device, dtype = rgb.device, torch.float32

    def uniform(low: float, high: float, *shape: int) -> Tensor:
        u = torch.rand(*shape, generator=generator, dtype=dtype)
        return (low + (high - low) * u).to(device)

    to_hed = torch.as_tensor(hed_from_rgb, dtype=dtype, device=device)
    to_rgb = torch.as_tensor(rgb_from_hed, dtype=dtype, device=device)
    x = rgb.float().clamp(_OD_MIN, 1.0)
    od = -torch.log(x).permute(0, 2, 3, 1)  # (B, H, W, 3)
    hed = od @ to_hed
    alpha = uniform(1.0 - settings.sigma, 1.0 + settings.sigma, b, 1, 1, 3)
    beta = uniform(-settings.bias, settings.bias, b, 1, 1, 3)
    out = torch.exp(-((hed * alpha + beta) @ to_rgb)).permute(0, 3, 1, 2).clamp(0.0, 1.0)
    j = settings.jitter
    brightness = uniform(1.0 - j, 1.0 + j, b, 1, 1, 1)
    contrast = uniform(1.0 - j, 1.0 + j, b, 1, 1, 1)
    saturation = uniform(1.0 - j, 1.0 + j, b, 1, 1, 1)
    out = (out * brightness).clamp(0.0, 1.0)
    grey = 0.299 * out[:, 0:1] + 0.587 * out[:, 1:2] + 0.114 * out[:, 2:3]  # (B, 1, H, W)
    out = ((out - grey.mean(dim=(2, 3), keepdim=True)) * contrast
           + grey.mean(dim=(2, 3), keepdim=True)).clamp(0.0, 1.0)  # fmt: skip
    grey = 0.299 * out[:, 0:1] + 0.587 * out[:, 1:2] + 0.114 * out[:, 2:3]
    out = ((out - grey) * saturation + grey).clamp(0.0, 1.0)
    return out.to(rgb.dtype)


def pseudo_label_loss(
    strong_logits: Tensor, weak_probabilities: Tensor, threshold: float
) -> tuple[Tensor, Tensor]:
    """FixMatch's unsupervised loss for one batch.

    Args:
        strong_logits: (B, 1, H, W) logits of the strong view (with gradient).
        weak_probabilities: (B, 1, H, W) probabilities of the weak view (no gradient).
        threshold: confidence a pixel needs (max(p, 1 - p) >= threshold).

    Returns:
        (loss, confident share): the BCE against the hard pseudo-labels summed over confident
        pixels and divided by all pixels, and the share of pixels that were confident.
    """
    if strong_logits.shape != weak_probabilities.shape:
        raise ConfigError(
            f"strong logits {tuple(strong_logits.shape)} and weak probabilities "
            f"{tuple(weak_probabilities.shape)}: expected equal shapes"
        )
    p = weak_probabilities.detach().float()
    labels = (p > 0.5).float()
    confident = (torch.maximum(p, 1.0 - p) >= threshold).float()
    bce = F.binary_cross_entropy_with_logits(strong_logits.float(), labels, reduction="none")
    return (bce * confident).sum() / confident.numel(), confident.mean()


def generator_for(seed: int, step: int) -> torch.Generator:
    """The strong views' generator of one optimizer step: depends only on (seed, step), so a
    resumed run draws the same views as an uninterrupted one."""
    g = torch.Generator()
    g.manual_seed(int(np.random.SeedSequence([seed, step]).generate_state(1)[0]))
    return g


__all__ = [
    "SEMI_DEFAULTS",
    "SEMI_KEYS",
    "SemiSettings",
    "generator_for",
    "pseudo_label_loss",
    "strong_stain",
]
