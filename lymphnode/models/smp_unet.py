"""A UNet from segmentation-models-pytorch with a timm/torchvision encoder (``model=smp_unet``).

The same contract as :class:`lymphnode.models.UNet`: ``forward(x)`` returns
:class:`lymphnode.models.UNetOutput` (``recon`` (B, C, H, W), ``seg`` (B, 1, H, W) logits), both
heads on the smp decoder's full-resolution output; ``encode(x)`` gives the deepest encoder
features for a contrastive pretext; ``encoder.*`` are the encoder's parameters.

smp's UNet has no skip at full resolution (the decoder drops the input-resolution feature); its
highest skip is at 1/2. ``top_skip=False`` (the paper's pretraining: the decoder must not copy the
input through a high-resolution skip) replaces that 1/2-resolution feature by zeros. The shapes do
not change, so weights transfer between ``top_skip`` true and false with nothing re-initialised.

Weights never come from the network: ``encoder_weights`` is None or the path of a local file (a
user's ImageNet or pathology-foundation-model weights for the encoder), read with
``torch.load(weights_only=True)``; a file that does not fit the encoder is refused with the keys
that are missing, unexpected or of another shape.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lymphnode.core import validate
from lymphnode.core.errors import ConfigError
from lymphnode.models.unet import UNetOutput

log = logging.getLogger(__name__)

CLASSIFIER_PREFIXES = ("fc.", "head.", "classifier.", "last_linear.")  # dropped from weight files
MAX_LISTED = 10


def _unwrap(state: Any, path: Path) -> dict[str, Tensor]:
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ConfigError(
            f"encoder_weights={path}: expected a state dict of tensors (or a dict with "
            "'state_dict' / 'model' holding one)"
        )
    return {str(k): v for k, v in state.items()}


def load_encoder_weights(encoder: nn.Module, path: str | Path) -> list[str]:
    """Copy a local weights file into ``encoder`` in place; returns the dropped classifier keys.

    Keys may be bare (torchvision/timm style, ``conv1.weight``) or prefixed ``encoder.``; for
    smp's timm wrappers (``tu-*``, parameters under ``model.``) bare timm keys are prefixed.
    Classifier keys (``fc.*``, ``head.*``, ``classifier.*``) are dropped. Every other key must
    match the encoder's by name and shape: ConfigError lists the mismatches otherwise.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"encoder_weights={path} does not exist (expected a local weights file)")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle payloads, truncated files, foreign formats
        raise ConfigError(
            f"encoder_weights={path} cannot be read as a torch weights file ({exc})"
        ) from exc
    state = _unwrap(raw, path)
    state = {k.removeprefix("encoder."): v for k, v in state.items()}
    dropped = sorted(k for k in state if k.startswith(CLASSIFIER_PREFIXES))
    state = {k: v for k, v in state.items() if k not in dropped}
    mine = encoder.state_dict()
    if not set(state) & set(mine) and all(k.startswith("model.") for k in mine):
        state = {f"model.{k}": v for k, v in state.items()}  # timm keys into smp's tu- wrapper
    missing = sorted(set(mine) - set(state))
    unexpected = sorted(set(state) - set(mine))
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs encoder {tuple(mine[k].shape)}"
        for k in sorted(set(state) & set(mine))
        if tuple(state[k].shape) != tuple(mine[k].shape)
    ]
    problems = [
        *(f"missing {k}" for k in missing),
        *(f"unexpected {k}" for k in unexpected),
        *shapes,
    ]
    if problems:
        listed = "\n  ".join(problems[:MAX_LISTED])
        more = f"\n  ... {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise ConfigError(
            f"encoder_weights={path} does not fit the encoder ({len(missing)} missing, "
            f"{len(unexpected)} unexpected, {len(shapes)} of another shape):\n  {listed}{more}"
        )
    with torch.no_grad():
        for name, value in state.items():
            mine[name].copy_(value)
    if dropped:
        log.info("encoder_weights %s: dropped classifier keys %s", path, dropped)
    return dropped


class SmpUNet(nn.Module):
    """segmentation-models-pytorch's UNet with lymphnode's two heads.

    Args:
        encoder: an smp encoder name: ``resnet18``/``resnet34``/``resnet50`` (torchvision
            layout) or a timm one as ``tu-<name>`` (e.g. ``tu-convnext_atto``).
        encoder_depth: downsamplings of the encoder (3..5); inputs must be multiples of
            ``2**encoder_depth`` px.
        encoder_weights: None (random init) or a local weights file for the encoder (never a
            download).
        decoder_channels: the decoder blocks' widths (``encoder_depth`` values; None: smp's
            default 256, 128, 64, 32, 16 cut to the depth).
        in_channels: input channels (3 for RGB).
        top_skip: keep the 1/2-resolution skip (smp's highest); False zeros it (see the module
            docstring).
    """

    encoder_prefix = "encoder."

    def __init__(
        self,
        encoder: str = "resnet18",
        encoder_depth: int = 5,
        encoder_weights: str | None = None,
        decoder_channels: Sequence[int] | None = None,
        in_channels: int = 3,
        top_skip: bool = False,
    ) -> None:
        super().__init__()
        import segmentation_models_pytorch as smp

        validate.integer("encoder_depth", encoder_depth, 3, 5, where="SmpUNet: ")
        validate.integer("in_channels", in_channels, 1, where="SmpUNet: ")
        if not isinstance(top_skip, bool):
            raise ConfigError(f"SmpUNet top_skip={top_skip!r} is invalid; expected true or false")
        channels = (
            [256, 128, 64, 32, 16][:encoder_depth]
            if decoder_channels is None
            else [int(c) for c in decoder_channels]
        )
        if len(channels) != encoder_depth:
            raise ConfigError(
                f"SmpUNet decoder_channels={channels} has {len(channels)} values; expected "
                f"encoder_depth={encoder_depth}"
            )
        try:
            model = smp.Unet(
                encoder_name=encoder,
                encoder_depth=encoder_depth,
                encoder_weights=None,  # never a download
                decoder_channels=channels,
                in_channels=in_channels,
                classes=1,
            )
        except (KeyError, ValueError, RuntimeError) as exc:
            raise ConfigError(
                f"SmpUNet encoder={encoder!r} is not available in segmentation-models-pytorch "
                f"({exc}); e.g. resnet18, resnet34, resnet50, tu-convnext_atto"
            ) from exc
        self.encoder_name, self.encoder_depth = encoder, encoder_depth
        self.encoder_weights = None if encoder_weights is None else str(encoder_weights)
        self.decoder_channels, self.in_channels, self.top_skip = channels, in_channels, top_skip
        self.encoder = model.encoder
        self.decoder = model.decoder
        width = channels[-1]
        self.seg_head = nn.Conv2d(width, 1, kernel_size=3, padding=1)  # as smp's head
        self.recon_head = nn.Conv2d(width, in_channels, kernel_size=1)
        if encoder_weights is not None:
            load_encoder_weights(self.encoder, encoder_weights)

    @property
    def config(self) -> dict[str, Any]:
        """The constructor arguments, so that a checkpoint can rebuild this exact network."""
        return {
            "encoder": self.encoder_name,
            "encoder_depth": self.encoder_depth,
            "encoder_weights": self.encoder_weights,
            "decoder_channels": list(self.decoder_channels),
            "in_channels": self.in_channels,
            "top_skip": self.top_skip,
        }

    @property
    def min_size(self) -> int:
        """Smallest input side (px): one pixel at the deepest encoder stage."""
        return 2**self.encoder_depth

    @property
    def encoder_channels(self) -> int:
        """Channels of :meth:`encode`'s output."""
        return int(self.encoder.out_channels[-1])

    def _check_input(self, x: Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ConfigError(
                f"SmpUNet input has shape {tuple(x.shape)}; expected (B, {self.in_channels}, H, W)"
            )
        step = self.min_size
        if x.shape[-2] % step or x.shape[-1] % step:
            raise ConfigError(
                f"SmpUNet input of {x.shape[-2]}x{x.shape[-1]} px: both sides must be multiples "
                f"of {step} (2**encoder_depth, encoder_depth={self.encoder_depth})"
            )

    def encode(self, x: Tensor) -> Tensor:
        """The deepest encoder features (B, encoder_channels, H / 2**depth, W / 2**depth)."""
        self._check_input(x)
        return self.encoder(x)[-1]

    def forward(self, x: Tensor) -> UNetOutput:
        """Normalised images (B, C, H, W) -> (recon (B, C, H, W), seg (B, 1, H, W))."""
        self._check_input(x)
        features = list(self.encoder(x))  # [input, 1/2, 1/4, ...]; the decoder drops [0]
        if not self.top_skip:
            features[1] = torch.zeros_like(features[1])
        h = self.decoder(features)  # (B, decoder_channels[-1], H, W)
        return UNetOutput(recon=self.recon_head(h), seg=self.seg_head(h))

    def prepare_transfer(self, source_config: Mapping[str, Any]) -> list[str]:
        """Nothing to re-initialise: ``top_skip`` does not change any shape."""
        return []


__all__ = ["SmpUNet", "load_encoder_weights"]
