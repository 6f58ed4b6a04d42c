"""The UNet of the paper: Ronneberger's encoder-decoder with a removable top skip and two heads.

Reconstruction pretraining removes the skip connection at full resolution (``top_skip=False``):
otherwise the decoder copies the first encoder block's features straight to the output and the deep
blocks learn nothing (the paper, Sec. III.3). Both heads read the same decoder, so fine-tuning trains
segmentation and reconstruction together.

Shapes: B batch, C channels, H x W pixels of the patch. Every block keeps its spatial size (3x3
convolutions padded by 1); max pooling floors odd sizes and the decoder pads the upsampled tensor
back to its skip's size, so the output is H x W for any H, W >= 2**depth (300 included; instance
norm needs 2**(depth+1)).

Parameter names (what checkpoints store, prefixed ``net.`` by the LightningModules)::

    encoder.{d}.*   d = 0..depth    encoder block at depth d (d = depth is the bottleneck)
    up.{d}.*        d = 0..depth-1  upsampling from depth d+1 to depth d
    decoder.{d}.*   d = 0..depth-1  decoder block at depth d (decoder.0 is the top, full resolution)
    recon_head.*, seg_head.*        1x1 convolutions on the top decoder block's output
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lymphnode.core import validate
from lymphnode.core.errors import ConfigError

NORMS = ("batch", "group", "instance")
UP_MODES = ("transpose", "bilinear")
MAX_GROUPS = 32  # GroupNorm groups: gcd(32, channels), the usual 32 when the width allows


class UNetOutput(NamedTuple):
    """What :meth:`UNet.forward` returns."""

    recon: Tensor  # (B, 3, H, W) reconstruction in the input's (normalised) units
    seg: Tensor  # (B, 1, H, W) tumour logits


def _norm_layer(norm: str, channels: int) -> nn.Module:
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "group":
        return nn.GroupNorm(math.gcd(MAX_GROUPS, channels), channels)
    return nn.InstanceNorm2d(channels, affine=True)


class DoubleConv(nn.Sequential):
    """(3x3 conv -> norm -> ReLU) x 2; keeps H x W. Convs have no bias: the norm supplies it."""

    def __init__(self, in_channels: int, out_channels: int, norm: str) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            _norm_layer(norm, out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            _norm_layer(norm, out_channels),
            nn.ReLU(inplace=True),
        )


def _up_layer(up: str, in_channels: int, out_channels: int) -> nn.Module:
    """x2 upsampling that also halves the channels, the same parameter shapes' role in both modes."""
    if up == "transpose":
        return nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2)
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
        nn.Conv2d(in_channels, out_channels, kernel_size=1),
    )


class UNet(nn.Module):
    """Ronneberger UNet with shared decoder, a reconstruction head and a segmentation head.

    Args:
        in_channels: channels of the input image (3 for RGB).
        base_width: channels of the top encoder block; depth d has ``base_width * 2**d`` (64: the
            original UNet).
        depth: number of 2x2 max-pool downsamplings (4: the original UNet, bottleneck at 1/16).
        norm: ``"batch"``, ``"group"`` (gcd(32, channels) groups) or ``"instance"`` (affine).
        up: ``"transpose"`` (2x2 transposed conv) or ``"bilinear"`` (bilinear x2 then 1x1 conv).
        top_skip: keep the full-resolution skip connection. ``False`` (the paper's pretraining)
            drops it: the top decoder block then sees only the upsampled deep features, and
            ``decoder.0``'s first convolution takes ``base_width`` instead of ``2 * base_width``
            input channels.

    Every skip tensor passes through ``self.skips[d]`` (an ``nn.Identity``) on its way to the
    decoder and nowhere else, so a forward hook on it sees / replaces exactly the skip path. With
    ``top_skip=False``, ``self.skips[0]`` is never called.
    """

    encoder_prefix = (
        "encoder."  # parameter names of the encoder (what an encoder-only pretext transfers)
    )

    def __init__(
        self,
        in_channels: int = 3,
        base_width: int = 64,
        depth: int = 4,
        norm: str = "batch",
        up: str = "transpose",
        top_skip: bool = True,
    ) -> None:
        super().__init__()
        validate.integer("in_channels", in_channels, 1, where="UNet: ")
        validate.integer("base_width", base_width, 1, where="UNet: ")
        validate.integer("depth", depth, 1, where="UNet: ")
        validate.choice("norm", norm, NORMS, where="UNet: ")
        validate.choice("up", up, UP_MODES, where="UNet: ")
        if not isinstance(top_skip, bool):
            raise ConfigError(f"UNet top_skip={top_skip!r} is invalid; expected true or false")
        self.in_channels = in_channels
        self.base_width = base_width
        self.depth = depth
        self.norm = norm
        self.up_mode = up
        self.top_skip = top_skip

        widths = [base_width * 2**d for d in range(depth + 1)]  # channels at depth 0..depth
        self.encoder = nn.ModuleList(
            [DoubleConv(in_channels, widths[0], norm)]
            + [DoubleConv(widths[d - 1], widths[d], norm) for d in range(1, depth + 1)]
        )
        self.up = nn.ModuleList([_up_layer(up, widths[d + 1], widths[d]) for d in range(depth)])
        self.skips = nn.ModuleList([nn.Identity() for _ in range(depth)])  # hook points, no params
        self.decoder = nn.ModuleList(
            [
                DoubleConv(widths[d] * (2 if (d > 0 or top_skip) else 1), widths[d], norm)
                for d in range(depth)
            ]
        )
        self.recon_head = nn.Conv2d(widths[0], in_channels, kernel_size=1)
        self.seg_head = nn.Conv2d(widths[0], 1, kernel_size=1)

    @property
    def config(self) -> dict[str, Any]:
        """The constructor arguments, so that a checkpoint can rebuild this exact network."""
        return {
            "in_channels": self.in_channels,
            "base_width": self.base_width,
            "depth": self.depth,
            "norm": self.norm,
            "up": self.up_mode,
            "top_skip": self.top_skip,
        }

    @property
    def min_size(self) -> int:
        """Smallest input side (px) the network takes: one pixel at the bottleneck (two with
        instance norm, which cannot normalise a single pixel)."""
        return 2 ** (self.depth + (1 if self.norm == "instance" else 0))

    @property
    def encoder_channels(self) -> int:
        """Channels of :meth:`encode`'s output (the bottleneck): ``base_width * 2**depth``."""
        return self.base_width * 2**self.depth

    def encode(self, x: Tensor) -> Tensor:
        """The bottleneck features (B, base_width * 2**depth, H / 2**depth, W / 2**depth) of
        normalised images (B, in_channels, H, W) (sizes floored): the encoder alone."""
        self._check_input(x)
        h = self.encoder[0](x)
        for d in range(1, self.depth + 1):
            h = self.encoder[d](F.max_pool2d(h, 2))
        return h

    def _check_input(self, x: Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ConfigError(
                f"UNet input has shape {tuple(x.shape)}; expected (B, {self.in_channels}, H, W)"
            )
        if min(x.shape[-2:]) < self.min_size:
            raise ConfigError(
                f"UNet input of {x.shape[-2]}x{x.shape[-1]} px is smaller than the minimum "
                f"{self.min_size} px for depth={self.depth}, norm={self.norm!r}; use larger "
                "patches or a smaller depth"
            )

    def forward(self, x: Tensor) -> UNetOutput:
        """Map images (B, in_channels, H, W) to (recon (B, in_channels, H, W), seg (B, 1, H, W))."""
        self._check_input(x)
        features = []  # depth d: (B, base*2**d, H_d, W_d), H_d = floor(H / 2**d)
        h = self.encoder[0](x)  # (B, base, H, W)
        for d in range(1, self.depth + 1):
            features.append(h)
            h = self.encoder[d](F.max_pool2d(h, 2))  # (B, base*2**d, H_d, W_d)
        for d in reversed(range(self.depth)):  # h: (B, base*2**(d+1), H_{d+1}, W_{d+1})
            h = self.up[d](h)  # (B, base*2**d, 2*H_{d+1}, 2*W_{d+1})
            h = _pad_to(h, features[d].shape[-2:])  # (B, base*2**d, H_d, W_d)
            if d > 0 or self.top_skip:
                h = torch.cat([self.skips[d](features[d]), h], dim=1)  # (B, 2*base*2**d, H_d, W_d)
            h = self.decoder[d](h)  # (B, base*2**d, H_d, W_d)
        return UNetOutput(recon=self.recon_head(h), seg=self.seg_head(h))

    def depth_groups(self) -> dict[str, list[str]]:
        """Parameter names grouped by depth: ``enc{d}`` (d = 0..depth), ``dec{d}`` (upsampling
        into depth d plus the decoder block at d, d = 0..depth-1) and ``heads``."""
        groups: dict[str, list[str]] = {}
        for name, _ in self.named_parameters():
            part, _, rest = name.partition(".")
            if part == "encoder":
                key = f"enc{rest.split('.')[0]}"
            elif part in ("up", "decoder"):
                key = f"dec{rest.split('.')[0]}"
            else:
                key = "heads"
            groups.setdefault(key, []).append(name)
        return groups

    def prepare_transfer(self, source_config: Mapping[str, Any]) -> list[str]:
        """Before copying weights from a UNet built with ``source_config`` (a checkpoint's): when
        its ``top_skip`` differs, the top decoder block (``decoder.0``, whose input is the top
        skip) cannot be reused and is re-initialised. Returns the name prefixes not to copy."""
        if bool(source_config.get("top_skip", True)) == self.top_skip:
            return []
        self.reset_top_decoder()
        return ["decoder.0."]

    def reset_top_decoder(self) -> list[str]:
        """Re-initialise ``decoder.0`` (the block the top skip feeds); return its parameter and
        buffer names."""
        top: nn.Module = self.decoder[0]
        for module in top.modules():
            if isinstance(module, nn.Conv2d | nn.modules.batchnorm._NormBase | nn.GroupNorm):
                module.reset_parameters()  # norms: affine to (1, 0), running stats to (0, 1)
        return [f"decoder.0.{name}" for name in top.state_dict()]


def _pad_to(x: Tensor, size: torch.Size | tuple[int, int]) -> Tensor:
    """Zero-pad x (B, C, h, w) at the bottom/right to (B, C, *size); h, w are never larger (pooling
    floors, so upsampling gives 2*floor(n/2) <= n)."""
    dh, dw = size[0] - x.shape[-2], size[1] - x.shape[-1]
    if dh == 0 and dw == 0:
        return x
    return F.pad(x, (0, dw, 0, dh))


def build_unet(config: Mapping[str, Any]) -> UNet:
    """A UNet from a dict of constructor arguments (a checkpoint's ``model`` hyperparameter);
    unknown keys raise ConfigError naming them and the accepted keys."""
    accepted = ("in_channels", "base_width", "depth", "norm", "up", "top_skip")
    return UNet(**validate.keys("model config", config, accepted))


__all__ = ["NORMS", "UP_MODES", "UNet", "UNetOutput", "build_unet"]
