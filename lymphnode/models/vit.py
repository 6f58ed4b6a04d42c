"""Dense prediction from a ViT encoder (``model=vit``): a foundation model's token grids at a few
depths into a small convolutional decoder that upsamples to full resolution, with the RGB input
concatenated before the last convolutions (the *image skip*: tokens are 14-16 px wide, and the
published finding is that fine boundaries need the pixels themselves).

Shapes: B batch, 3 RGB channels, H x W pixels with H, W multiples of the patch size p (14 or 16);
D the ViT width; L = len(feature_blocks) token levels, shallowest first::

    encoder (timm ViT)       blocks k_0 < ... < k_{L-1}: (B, D, H/p, W/p) each (final norm applied)
    necks.{i}                1x1 conv of level L-1-i (the deepest first) to decoder_channels[i]
    stages.{i}, i = 0..L-1   at (H/p * 2**i, W/p * 2**i): [upsampled stage i-1, neck i] -> 2x(3x3
                             conv, norm, ReLU) with decoder_channels[i] outputs
    final                    at (H, W): [upsampled stage L-1, image] -> 2x(3x3 conv, norm, ReLU)
                             with decoder_channels[L] outputs
    seg_head                 1x1 conv -> (B, 1, H, W) tumour logits
    recon_head (optional)    1x1 conv -> (B, 3, H, W) reconstruction of the normalised input

Upsampling is bilinear to the stage's exact size, so patch 14 (strides 14, 7, 3.5, 1.75) works as
patch 16 does. ``top_skip=False`` replaces the image by zeros (a reconstruction pretext must not
see its target); no shape changes, so weights transfer between the two.

The encoder is a preset's timm ViT (:mod:`lymphnode.models.vit_presets`) filled from the local
file ``weights`` (:func:`lymphnode.models.vit_weights.load_vit_weights`), or randomly initialised
when ``weights`` is None. Parameter names (checkpoints prefix them ``net.``)::

    encoder.*       the timm VisionTransformer (patch_embed.*, blocks.{k}.*, norm.*, ...)
    necks.{i}.*, stages.{i}.*, final.*, seg_head.*, recon_head.*
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lymphnode.core import validate
from lymphnode.core.errors import ConfigError
from lymphnode.models.contract import InputNeeds
from lymphnode.models.unet import NORMS, DoubleConv, UNetOutput
from lymphnode.models.vit_presets import ViTPreset, build_vit
from lymphnode.models.vit_presets import preset as find_preset
from lymphnode.models.vit_weights import load_vit_weights

log = logging.getLogger(__name__)

DECODER_CHANNELS = (256, 128, 64, 32, 16)  # deepest first; the last is the full-resolution block
MAX_LEVELS = 4  # token levels taken by default (evenly spaced, the last block included)


def default_feature_blocks(depth: int, levels: int = MAX_LEVELS) -> list[int]:
    """``levels`` block indices spread evenly over ``depth`` blocks and ending at the last one
    (24 blocks: 5, 11, 17, 23), fewer when the ViT has fewer blocks."""
    n = min(levels, depth)
    return sorted({max(0, round(depth * (k + 1) / n) - 1) for k in range(n)})


class ViTUNet(nn.Module):
    """A foundation-model ViT encoder with a convolutional decoder and an image skip.

    Args:
        preset: a :data:`lymphnode.models.vit_presets.PRESETS` name (``uni``, ``uni2_h``,
            ``virchow2``, ``h_optimus_0``, ``h_optimus_1``, ``prov_gigapath``, ``phikon_v2``) or
            ``timm`` (any timm VisionTransformer by ``arch``).
        weights: None (random initialisation) or a LOCAL weights file of the preset (never a
            download): safetensors or a weights-only ``.bin``/``.pth``, loaded strictly.
        arch: the timm architecture, for ``preset=timm`` only.
        depth: keep only the first ``depth`` transformer blocks (None: all); the weights file's
            deeper blocks are dropped. For reduced-cost runs (CPU tests, throughput at reduced
            depth), not the published model.
        vit_kwargs: overrides of the preset's ``timm.create_model`` kwargs (plain data, e.g. a
            tiny ``embed_dim``/``num_heads`` for tests; the preset's quirks stay).
        feature_blocks: the block indices whose tokens feed the decoder, shallowest first (None:
            :func:`default_feature_blocks`).
        decoder_channels: widths of the L stages (deepest first) and of the full-resolution
            block: L + 1 positive integers (None: the last L + 1 of 256, 128, 64, 32, 16).
        decoder_norm: the decoder's normalisation (``batch``, ``group``, ``instance``).
        recon: build the reconstruction head (``forward().recon`` is None without it).
        top_skip: concatenate the image before the full-resolution block (False: zeros).
    """

    encoder_prefix = "encoder."
    in_channels = 3  # the foundation models' RGB patch embedding

    def __init__(
        self,
        preset: str = "uni",
        weights: str | Path | None = None,
        arch: str | None = None,
        depth: int | None = None,
        vit_kwargs: Mapping[str, Any] | None = None,
        feature_blocks: Sequence[int] | None = None,
        decoder_channels: Sequence[int] | None = None,
        decoder_norm: str = "batch",
        recon: bool = True,
        top_skip: bool = True,
    ) -> None:
        super().__init__()
        where = "ViTUNet: "
        p = find_preset(preset)
        if weights is not None and not isinstance(weights, str | Path):
            raise ConfigError(
                f"{where}weights={weights!r} is invalid; expected null or the path "
                "of a local weights file"
            )
        if vit_kwargs is not None and not isinstance(vit_kwargs, Mapping):
            raise ConfigError(
                f"{where}vit_kwargs={vit_kwargs!r} is invalid; expected a dict of "
                "timm VisionTransformer arguments or null"
            )
        plain_kwargs = {str(k): _plain_value(v) for k, v in (vit_kwargs or {}).items()}
        overrides = dict(plain_kwargs)
        if depth is not None:
            validate.integer("depth", depth, 1, where=where)
            published = overrides.get("depth", p.blocks)  # None for timm: the file's tells
            if isinstance(published, int) and depth > published:
                raise ConfigError(
                    f"{where}depth={depth} is more than the {published} blocks of "
                    f"preset {p.name!r}; expected 1..{published}"
                )
            overrides["depth"] = depth
        validate.choice("decoder_norm", decoder_norm, NORMS, where=where)
        for name, flag in (("recon", recon), ("top_skip", top_skip)):
            if not isinstance(flag, bool):
                raise ConfigError(f"{where}{name}={flag!r} is invalid; expected true or false")

        self.encoder = build_vit(p, arch, overrides)
        self.preset_name, self.arch = p.name, arch
        self.weights = None if weights is None else str(weights)
        self.depth, self.vit_kwargs = depth, plain_kwargs
        self.decoder_norm, self.recon, self.top_skip = decoder_norm, recon, top_skip
        n_blocks = len(self.encoder.blocks)
        self.feature_blocks = _feature_blocks(feature_blocks, n_blocks)
        levels = len(self.feature_blocks)
        self.decoder_channels = _decoder_channels(decoder_channels, levels)
        self.mean, self.std, self.mpp = _normalisation(p, self.encoder)
        width = int(self.encoder.embed_dim)
        ch = self.decoder_channels
        self.necks = nn.ModuleList([nn.Conv2d(width, ch[i], kernel_size=1) for i in range(levels)])
        self.stages = nn.ModuleList(
            [DoubleConv(ch[0], ch[0], decoder_norm)]
            + [DoubleConv(ch[i - 1] + ch[i], ch[i], decoder_norm) for i in range(1, levels)]
        )
        self.final = DoubleConv(ch[levels - 1] + self.in_channels, ch[levels], decoder_norm)
        self.seg_head = nn.Conv2d(ch[levels], 1, kernel_size=1)
        self.recon_head = nn.Conv2d(ch[levels], self.in_channels, 1) if recon else None
        if self.weights is not None:
            load_vit_weights(
                self.encoder,
                self.weights,
                preset=p.name,
                layout=p.layout,
                truncated=depth is not None,
            )

    # --- what the tasks and the preprocessing contract read --------------------------------
    @property
    def config(self) -> dict[str, Any]:
        """The constructor arguments, so that a checkpoint can rebuild this exact network."""
        return {
            "preset": self.preset_name,
            "weights": self.weights,
            "arch": self.arch,
            "depth": self.depth,
            "vit_kwargs": dict(self.vit_kwargs) or None,
            "feature_blocks": list(self.feature_blocks),
            "decoder_channels": list(self.decoder_channels),
            "decoder_norm": self.decoder_norm,
            "recon": self.recon,
            "top_skip": self.top_skip,
        }

    @property
    def patch_size(self) -> int:
        """The encoder's patch size (px); input sides must be multiples of it."""
        return int(self.encoder.patch_embed.patch_size[0])

    @property
    def size_multiple(self) -> int:
        """What every input side must be a multiple of (px): the patch size."""
        return self.patch_size

    @property
    def min_size(self) -> int:
        """Smallest input side (px): one token."""
        return self.patch_size

    @property
    def encoder_channels(self) -> int:
        """Channels of :meth:`encode`'s output: the ViT's width D."""
        return int(self.encoder.embed_dim)

    def input_needs(self) -> InputNeeds:
        """The preset's normalisation, training resolution and size multiple (for the
        preprocessing contract; :class:`lymphnode.models.contract.DeclaresInputNeeds`)."""
        return InputNeeds(
            mean=self.mean, std=self.std, mpp=self.mpp, size_multiple=self.size_multiple
        )

    # --- forward ---------------------------------------------------------------------------
    def _check_input(self, x: Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ConfigError(
                f"ViTUNet input has shape {tuple(x.shape)}; expected (B, {self.in_channels}, H, W)"
            )
        p = self.patch_size
        height, width = int(x.shape[-2]), int(x.shape[-1])
        if height % p or width % p or min(height, width) < p:
            raise ConfigError(
                f"ViTUNet input of {height}x{width} px: preset {self.preset_name!r} has patch size "
                f"{p} px, which must divide both sides; expected multiples of {p} (e.g. "
                f"{max(p, height // p * p)} or {(height // p + 1) * p} px)"
            )

    def _tokens(self, x: Tensor) -> list[Tensor]:
        """Token grids (B, D, H/p, W/p) of ``feature_blocks``, final norm applied."""
        out = self.encoder.forward_intermediates(
            x, indices=self.feature_blocks, norm=True, stop_early=True, intermediates_only=True
        )
        return cast(list[Tensor], out)  # intermediates_only=True: the list alone

    def encode(self, x: Tensor) -> Tensor:
        """The deepest token grid (B, D, H/p, W/p) of normalised images (B, 3, H, W): the last
        feature block's tokens after the final norm, prefix (class, register) tokens dropped."""
        self._check_input(x)
        return self._tokens(x)[-1]

    def forward(self, x: Tensor) -> UNetOutput:
        """Normalised images (B, 3, H, W) -> (recon (B, 3, H, W) or None, seg (B, 1, H, W))."""
        self._check_input(x)
        height, width = int(x.shape[-2]), int(x.shape[-1])
        grid_h, grid_w = height // self.patch_size, width // self.patch_size
        tokens = self._tokens(x)[::-1]  # deepest first: (B, D, grid_h, grid_w) each
        h = x.new_zeros(0)
        for i, (feature, neck, stage) in enumerate(
            zip(tokens, self.necks, self.stages, strict=True)
        ):
            size = (grid_h * 2**i, grid_w * 2**i)
            lateral = _resize(neck(feature), size)  # (B, ch[i], grid * 2**i)
            h = stage(lateral if i == 0 else torch.cat([_resize(h, size), lateral], dim=1))
        image = x if self.top_skip else torch.zeros_like(x)
        h = self.final(torch.cat([_resize(h, (height, width)), image], dim=1))  # (B, ch[L], H, W)
        recon = self.recon_head(h) if self.recon_head is not None else None
        return UNetOutput(recon=recon, seg=self.seg_head(h))  # type: ignore[arg-type]

    # --- fine-tuning hooks -----------------------------------------------------------------
    def depth_groups(self) -> dict[str, list[str]]:
        """Parameter names grouped for :class:`lymphnode.tasks.callbacks.DepthNormLogger`:
        ``encoder`` (the ViT), ``dec{d}`` (neck + stage whose output is d stages above full
        resolution; dec0 is the full-resolution block) and ``heads``."""
        levels = len(self.feature_blocks)
        groups: dict[str, list[str]] = {}
        for name, _ in self.named_parameters():
            part, _, rest = name.partition(".")
            if part == "encoder":
                key = "encoder"
            elif part in ("necks", "stages"):
                key = f"dec{levels - int(rest.split('.')[0])}"
            elif part == "final":
                key = "dec0"
            else:
                key = "heads"
            groups.setdefault(key, []).append(name)
        return groups

    def prepare_transfer(self, source_config: Mapping[str, Any]) -> list[str]:
        """Before copying weights from a ViTUNet built with ``source_config``: the reconstruction
        head is not copied when one of the two networks has none (``top_skip`` changes no
        shape). Returns the name prefixes not to copy."""
        if bool(source_config.get("recon", True)) == self.recon:
            return []
        return ["recon_head."]


def _plain_value(value: Any) -> Any:
    """Hydra's ListConfig / tuples as lists (checkpoints hold plain data)."""
    if isinstance(value, str) or not isinstance(value, Sequence):
        return value
    return [_plain_value(v) for v in value]


def _feature_blocks(value: Sequence[int] | None, depth: int) -> list[int]:
    if value is None:
        return default_feature_blocks(depth)
    if isinstance(value, str) or not isinstance(value, Sequence) or not value:
        raise ConfigError(
            f"ViTUNet: feature_blocks={value!r} is invalid; expected a list of "
            f"block indices in 0..{depth - 1}, shallowest first, or null"
        )
    blocks = [
        validate.integer(f"feature_blocks[{i}]", b, 0, where="ViTUNet: ")
        for i, b in enumerate(value)
    ]
    if blocks != sorted(set(blocks)) or blocks[-1] >= depth:
        raise ConfigError(
            f"ViTUNet: feature_blocks={blocks} is invalid; expected increasing "
            f"block indices in 0..{depth - 1} (the encoder has {depth} blocks)"
        )
    return blocks


def _decoder_channels(value: Sequence[int] | None, levels: int) -> list[int]:
    if value is None:
        return list(DECODER_CHANNELS[-(levels + 1) :])
    if isinstance(value, str) or not isinstance(value, Sequence) or len(value) != levels + 1:
        raise ConfigError(
            f"ViTUNet: decoder_channels={value!r} is invalid; expected {levels + 1} positive "
            f"integers ({levels} token levels, deepest first, then the full-resolution block)"
        )
    return [
        validate.integer(f"decoder_channels[{i}]", c, 1, where="ViTUNet: ")
        for i, c in enumerate(value)
    ]


def _normalisation(
    p: ViTPreset, encoder: nn.Module
) -> tuple[tuple[float, ...], tuple[float, ...], float | None]:
    """(mean, std, µm/px) the encoder expects: the preset's, or timm's config for ``timm``."""
    if p.arch is not None:
        return tuple(p.mean), tuple(p.std), p.mpp
    cfg = getattr(encoder, "pretrained_cfg", None) or {}
    mean = tuple(float(v) for v in cfg.get("mean", p.mean))
    std = tuple(float(v) for v in cfg.get("std", p.std))
    return mean, std, None


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of x (B, C, h, w) to (B, C, *size); x itself when already that size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


__all__ = ["DECODER_CHANNELS", "ViTUNet", "default_feature_blocks"]
