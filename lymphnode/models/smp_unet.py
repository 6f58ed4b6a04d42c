"""A UNet from segmentation-models-pytorch with a timm/torchvision encoder (``model=smp_unet``).

The same contract as :class:`lymphnode.models.UNet`: ``forward(x)`` returns
:class:`lymphnode.models.UNetOutput` (``recon`` (B, C, H, W), ``seg`` (B, 1, H, W) logits), both
heads on the smp decoder's full-resolution output; ``encode(x)`` gives the deepest encoder
features for a contrastive pretext; ``encoder.*`` are the encoder's parameters
(``encoder_prefix``, what an encoder-only transfer copies).

smp's encoder returns ``encoder_depth + 1`` feature maps, feature ``k`` at stride ``2**k`` of the
(padded) input. Feature 0 is the input itself, which smp's decoder drops; features
``1..encoder_depth-1`` are the decoder's skips and feature ``encoder_depth`` its input. Timm
encoders that start at stride 4 (ConvNeXt) give an empty (B, 0, H/2, W/2) feature 1. The *top
skip* is the highest-resolution skip that has channels: feature 1 for ResNets (conv1, stride 2),
feature 2 for ConvNeXt (stem + stage 0, stride 4). ``top_skip=False`` (the paper's pretraining:
the decoder must not copy the input through a high-resolution skip) replaces it by zeros. The
shapes do not change, so weights transfer between ``top_skip`` true and false with nothing
re-initialised.

Inputs of any size >= ``2**encoder_depth`` px are taken (the paper's 300 px patches at depth 5):
H and W are reflect-padded at the bottom/right to the next multiple of ``2**encoder_depth`` and
the outputs cropped back to H x W.

Weights never come from the network: ``encoder_weights`` is None or the path of a local file (a
user's ImageNet or pathology-foundation-model weights for the encoder), read with
``torch.load(weights_only=True)``; see :func:`load_encoder_weights`.

Parameter names (checkpoints store them prefixed ``net.``)::

    encoder.*      smp's encoder (ResNet: conv1.*, layer1.*, ...; timm: model.stem_0.*, ...)
    decoder.*      smp's UnetDecoder (decoder.blocks.{i}.*, i = 0 the deepest block)
    seg_head.*     3x3 conv to 1 channel (as smp's segmentation head)
    recon_head.*   1x1 conv to in_channels
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lymphnode.core import validate
from lymphnode.core.errors import ConfigError
from lymphnode.models.unet import UNetOutput
from lymphnode.models.weight_files import describe_problems, read_state_dict

log = logging.getLogger(__name__)

SMP_DECODER_CHANNELS = (256, 128, 64, 32, 16)  # smp's default; the first encoder_depth are used
ENCODER_DEPTHS = (3, 4, 5)  # what smp's Unet builds
# decoder_norm -> smp's decoder_use_norm. smp 0.6.0's plain "instancenorm" is not affine (and its
# initialiser then fails), its "layernorm" normalises the last axis of (B, C, H, W) tensors, and
# "inplace" needs the inplace_abn package: none of those is offered.
DECODER_NORMS: dict[str, str | dict[str, Any]] = {
    "batchnorm": "batchnorm",
    "instancenorm": {"type": "instancenorm", "affine": True},
    "identity": "identity",
}
CLASSIFIER_PREFIXES = ("fc.", "head.", "classifier.", "last_linear.")  # dropped from weight files


def _canonical(name: str) -> str:
    """A parameter name up to '.' vs '_': timm's feature wrappers (smp's ``tu-*`` encoders) flatten
    ``stem.0`` to ``stem_0`` and put everything under ``model.``."""
    return name.replace("_", ".")


def _aliases(own: Mapping[str, Tensor]) -> dict[str, str | None]:
    """Canonical forms of the encoder's names (with and without ``model.``) -> the name; None
    where two names share a form (then only the exact name matches)."""
    aliases: dict[str, str | None] = {}
    for name in own:
        for alias in {_canonical(name), _canonical(name.removeprefix("model."))}:
            aliases[alias] = name if aliases.get(alias, name) == name else None
    return aliases


def load_encoder_weights(encoder: nn.Module, path: str | Path) -> list[str]:
    """Copy a local weights file into ``encoder`` (an smp encoder) in place; returns the dropped
    classifier keys.

    The file (``*.safetensors``, or a torch file read with ``weights_only=True``: see
    :func:`lymphnode.models.weight_files.read_state_dict`) holds a state dict, or a dict with one
    under ``state_dict`` or ``model``. Its keys
    may be the encoder's own (``conv1.weight``; timm-wrapped ``model.stem_0.weight``) or those of
    the torchvision/timm classification model (``conv1.weight``, ``stem.0.weight``), either
    optionally prefixed ``encoder.``. Classifier keys (``fc.*``, ``head.*``, ``classifier.*``,
    ``last_linear.*``) that the encoder lacks are dropped and logged. Every encoder tensor must
    come from the file with its shape and every other key must have a place: ConfigError lists
    the missing, unexpected and shape-mismatched keys otherwise, and nothing is copied.
    """
    path = Path(path)
    state = read_state_dict(path, "encoder_weights")
    mine = encoder.state_dict()
    aliases = _aliases(mine)
    matched: dict[str, tuple[str, Tensor]] = {}  # encoder name -> (file key, tensor)
    unexpected: list[str] = []
    dropped: list[str] = []
    for key, value in state.items():
        bare = key.removeprefix("encoder.")
        target = bare if bare in mine else aliases.get(_canonical(bare))
        if target is None or target in matched:
            (dropped if bare.startswith(CLASSIFIER_PREFIXES) else unexpected).append(key)
        else:
            matched[target] = (key, value)
    missing = [name for name in mine if name not in matched]
    shapes = [
        f"{key}: file {tuple(value.shape)} vs encoder {tuple(mine[name].shape)}"
        for name, (key, value) in matched.items()
        if tuple(value.shape) != tuple(mine[name].shape)
    ]
    problems = [
        *shapes,
        *(f"unexpected {k}" for k in unexpected),  # file order
        *(f"missing {k}" for k in missing),
    ]
    if problems:
        raise ConfigError(
            f"encoder_weights={path} does not fit the encoder {type(encoder).__name__} "
            f"({len(missing)} missing, {len(unexpected)} unexpected, {len(shapes)} of another "
            f"shape):{describe_problems(problems)}"
        )
    with torch.no_grad():
        for name, (_, value) in matched.items():
            mine[name].copy_(value)  # state_dict tensors share storage with the encoder
    dropped.sort()
    if dropped:
        log.info("encoder_weights %s: dropped classifier keys %s", path, dropped)
    log.info("encoder_weights %s: loaded %d tensors", path, len(matched))
    return dropped


def _decoder_channels(value: Sequence[int] | None, depth: int) -> list[int]:
    if value is None:
        return list(SMP_DECODER_CHANNELS[:depth])
    if isinstance(value, str) or not isinstance(value, Sequence) or len(value) != depth:
        raise ConfigError(
            f"SmpUNet: decoder_channels={value!r} is invalid; expected {depth} positive integers "
            f"(one per encoder stage, encoder_depth={depth}), deepest first, or null"
        )
    where = "SmpUNet: "
    return [
        validate.integer(f"decoder_channels[{i}]", c, 1, where=where) for i, c in enumerate(value)
    ]


class SmpUNet(nn.Module):
    """segmentation-models-pytorch's UNet with lymphnode's two heads.

    Args:
        encoder: an smp encoder name: ``resnet18``/``resnet34``/``resnet50`` (torchvision
            layout) or a timm one as ``tu-<name>`` (e.g. ``tu-convnext_atto``).
        encoder_depth: downsamplings of the encoder (3, 4 or 5); inputs must be at least
            ``2**encoder_depth`` px a side (other sizes are reflect-padded, see the module
            docstring).
        encoder_weights: None (random init) or a local weights file for the encoder (never a
            download; :func:`load_encoder_weights`).
        decoder_channels: the decoder blocks' widths, deepest first (``encoder_depth`` values;
            None: smp's default 256, 128, 64, 32, 16 cut to the depth).
        decoder_norm: the decoder's normalisation: ``batchnorm`` (smp's default),
            ``instancenorm`` (affine) or ``identity`` (none); the encoder keeps its own.
        in_channels: input channels (3 for RGB); the reconstruction has as many.
        top_skip: feed the top skip (the module docstring) to the decoder; False replaces it by
            zeros. The encoder still computes it (the deeper stages are built on it), and the
            decoder weights that read it get no gradient while it is off.
    """

    encoder_prefix = "encoder."

    def __init__(
        self,
        encoder: str = "resnet18",
        encoder_depth: int = 5,
        encoder_weights: str | Path | None = None,
        decoder_channels: Sequence[int] | None = None,
        decoder_norm: str = "batchnorm",
        in_channels: int = 3,
        top_skip: bool = False,
    ) -> None:
        super().__init__()
        import segmentation_models_pytorch as smp

        where = "SmpUNet: "
        if not isinstance(encoder, str) or not encoder:
            raise ConfigError(
                f"{where}encoder={encoder!r} is invalid; expected an smp encoder name"
            )
        validate.choice("encoder_depth", encoder_depth, ENCODER_DEPTHS, where=where)
        validate.choice("decoder_norm", decoder_norm, tuple(DECODER_NORMS), where=where)
        validate.integer("in_channels", in_channels, 1, where=where)
        if not isinstance(top_skip, bool):
            raise ConfigError(f"{where}top_skip={top_skip!r} is invalid; expected true or false")
        if encoder_weights is not None and not isinstance(encoder_weights, str | Path):
            raise ConfigError(
                f"{where}encoder_weights={encoder_weights!r} is invalid; expected null or the "
                "path of a local weights file"
            )
        channels = _decoder_channels(decoder_channels, encoder_depth)
        try:
            model = smp.Unet(
                encoder_name=encoder,
                encoder_depth=encoder_depth,
                encoder_weights=None,  # never a download
                decoder_channels=channels,
                decoder_use_norm=DECODER_NORMS[decoder_norm],
                in_channels=in_channels,
                classes=1,
            )
        except (KeyError, ValueError, RuntimeError) as exc:  # unknown smp / timm name, bad stage
            raise ConfigError(
                f"{where}encoder={encoder!r} with encoder_depth={encoder_depth} is not available "
                f"in segmentation-models-pytorch ({type(exc).__name__}: {str(exc)[:200]}); "
                "expected e.g. resnet18, resnet34, resnet50 or tu-<timm name> (tu-convnext_atto)"
            ) from exc
        out_channels = list(model.encoder.out_channels)  # feature k has out_channels[k]
        top = [k for k in range(1, encoder_depth) if out_channels[k] > 0]
        if not top:  # no stock encoder at depth >= 3; a guard so top_skip never silently no-ops
            raise ConfigError(
                f"{where}encoder={encoder!r} at encoder_depth={encoder_depth} gives the decoder "
                f"no skip with channels (feature channels {out_channels}); use a larger "
                "encoder_depth"
            )
        self.top_skip_index = top[0]  # feature index of the top skip (1: ResNet, 2: ConvNeXt)
        self.encoder_name, self.encoder_depth = encoder, encoder_depth
        self.encoder_weights = None if encoder_weights is None else str(encoder_weights)
        self.decoder_channels, self.decoder_norm = channels, decoder_norm
        self.in_channels, self.top_skip = in_channels, top_skip
        self.encoder = model.encoder
        self.decoder = model.decoder
        width = channels[-1]
        self.seg_head = nn.Conv2d(width, 1, kernel_size=3, padding=1)  # as smp's head
        self.recon_head = nn.Conv2d(width, in_channels, kernel_size=1)
        if self.encoder_weights is not None:
            load_encoder_weights(self.encoder, self.encoder_weights)

    @property
    def config(self) -> dict[str, Any]:
        """The constructor arguments, so that a checkpoint can rebuild this exact network."""
        return {
            "encoder": self.encoder_name,
            "encoder_depth": self.encoder_depth,
            "encoder_weights": self.encoder_weights,
            "decoder_channels": list(self.decoder_channels),
            "decoder_norm": self.decoder_norm,
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
        if min(x.shape[-2:]) < self.min_size:
            raise ConfigError(
                f"SmpUNet input of {x.shape[-2]}x{x.shape[-1]} px is smaller than the minimum "
                f"{self.min_size} px (2**encoder_depth, encoder_depth={self.encoder_depth}); use "
                "larger patches or a smaller encoder_depth"
            )

    def _pad(self, x: Tensor) -> Tensor:
        """Reflect-pad x (B, C, H, W) at the bottom/right to multiples of ``min_size``; the pad is
        shorter than ``min_size`` <= H, W, as reflection needs."""
        step = self.min_size
        dh, dw = -x.shape[-2] % step, -x.shape[-1] % step
        if dh == 0 and dw == 0:
            return x
        return F.pad(x, (0, dw, 0, dh), mode="reflect")

    def encode(self, x: Tensor) -> Tensor:
        """The deepest encoder features (B, encoder_channels, ceil(H / 2**depth),
        ceil(W / 2**depth)) of normalised images (B, C, H, W), computed on the padded input."""
        self._check_input(x)
        return self.encoder(self._pad(x))[-1]

    def forward(self, x: Tensor) -> UNetOutput:
        """Normalised images (B, C, H, W) -> (recon (B, C, H, W), seg (B, 1, H, W))."""
        self._check_input(x)
        height, width = x.shape[-2:]
        features = list(self.encoder(self._pad(x)))  # k = 0..depth: (B, C_k, Hp/2**k, Wp/2**k)
        if not self.top_skip:
            k = self.top_skip_index
            features[k] = torch.zeros_like(features[k])  # nothing to copy the input through
        h = self.decoder(features)  # (B, decoder_channels[-1], Hp, Wp); drops features[0]
        recon = self.recon_head(h)[..., :height, :width]  # (B, C, H, W)
        seg = self.seg_head(h)[..., :height, :width]  # (B, 1, H, W)
        return UNetOutput(recon=recon, seg=seg)

    def depth_groups(self) -> dict[str, list[str]]:
        """Parameter names grouped for :class:`lymphnode.tasks.callbacks.DepthNormLogger`:
        ``encoder``, ``dec{d}`` (the decoder block whose output is at stride ``2**d``; dec0 is
        full resolution), ``decoder`` (smp's centre block, VGG encoders only) and ``heads``."""
        groups: dict[str, list[str]] = {}
        for name, _ in self.named_parameters():
            if name.startswith(self.encoder_prefix):
                key = "encoder"
            elif name.startswith("decoder.blocks."):
                key = f"dec{self.encoder_depth - 1 - int(name.split('.')[2])}"
            elif name.startswith("decoder."):
                key = "decoder"
            else:
                key = "heads"
            groups.setdefault(key, []).append(name)
        return groups

    def prepare_transfer(self, source_config: Mapping[str, Any]) -> list[str]:
        """Nothing to re-initialise: ``top_skip`` does not change any shape (a different encoder
        or decoder does, and :func:`load_pretrained_weights` reports those mismatches)."""
        return []


__all__ = ["DECODER_NORMS", "ENCODER_DEPTHS", "SmpUNet", "load_encoder_weights"]
