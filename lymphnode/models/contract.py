"""The network contract: what the task modules, checkpoints and inference may rely on.

Written down as ``typing.Protocol``s (issue #20, part 1). :class:`lymphnode.models.UNet`,
:class:`lymphnode.models.SmpUNet` and :class:`lymphnode.models.ViTUNet` implement
:class:`SegmentationNetwork`; ViTUNet also :class:`DeclaresInputNeeds`.

- every task module checks its network once when it builds it (:func:`require_contract`: one
  ConfigError naming the class and every member it lacks) and then uses the members directly;
- the reconstruction head is optional: ``recon_head`` None and ``forward(x).recon`` None, and a
  task that needs it (the reconstruction, masked and stain pretexts, ``recon_weight > 0``) says
  so at construction (:func:`require_recon_head`);
- where the weights came from (a pretext checkpoint, a foundation model's file, nothing) is not
  part of the contract: the encoder is ``encoder_prefix``, whatever initialised it, so one
  ``task.encoder_lr_scale`` can treat every network alike (part 4).

Shapes in the members' docstrings: B batch, C = ``in_channels``, H x W pixels, ``x`` normalised
by the preprocessing contract.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

from lymphnode.core.errors import ConfigError


class NetworkOutput(Protocol):
    """What ``forward`` returns (e.g. :class:`lymphnode.models.UNetOutput`)."""

    @property
    def seg(self) -> Tensor:
        """(B, 1, H, W) tumour logits."""
        ...

    @property
    def recon(self) -> Tensor | None:
        """(B, C, H, W) reconstruction of the normalised input, None without a recon head."""
        ...


@runtime_checkable
class SegmentationNetwork(Protocol):
    """An encoder-decoder with a segmentation head and an optional reconstruction head."""

    encoder_prefix: str  # parameter-name prefix of the encoder ("encoder.")
    in_channels: int  # C
    seg_head: nn.Module  # the segmentation head (a pretext freezes it)
    recon_head: nn.Module | None  # the reconstruction head, None when the network has none

    @property
    def config(self) -> dict[str, Any]:
        """Plain-data constructor arguments: a checkpoint rebuilds the network from them (with
        ``_target_``), without any weights file it was first initialised from."""
        ...

    @property
    def min_size(self) -> int:
        """Smallest input side in px."""
        ...

    @property
    def encoder_channels(self) -> int:
        """Channels of :meth:`encode`'s output."""
        ...

    def encode(self, x: Tensor) -> Tensor:
        """The deepest encoder features (B, encoder_channels, h, w) of x (B, C, H, W)."""
        ...

    def __call__(self, x: Tensor) -> NetworkOutput:
        """The output for x (B, C, H, W): ``seg`` and ``recon`` at H x W."""
        ...

    def depth_groups(self) -> dict[str, list[str]]:
        """Parameter names by depth (``encoder``/``enc{d}``, ``dec{d}``, ``heads``)."""
        ...

    def prepare_transfer(self, source_config: Mapping[str, Any]) -> list[str]:
        """Re-initialise what cannot be copied from a network built with ``source_config``;
        return those parameter-name prefixes."""
        ...


@dataclass(frozen=True)
class InputNeeds:
    """What an encoder needs of its input (for the preprocessing contract, part 5)."""

    mean: tuple[float, ...]  # RGB normalisation of 0..1 pixels
    std: tuple[float, ...]
    mpp: float | None  # µm/px the encoder was trained at (None: no preference)
    size_multiple: int  # every input side must be a multiple of it (px)


@runtime_checkable
class DeclaresInputNeeds(Protocol):
    """A network whose encoder prescribes its input (a foundation model)."""

    def input_needs(self) -> InputNeeds:
        """Normalisation, resolution and size multiple the encoder was trained with."""
        ...


CONTRACT_MEMBERS = (
    "encoder_prefix",
    "in_channels",
    "seg_head",
    "recon_head",
    "config",
    "min_size",
    "encoder_channels",
    "encode",
    "forward",
    "depth_groups",
    "prepare_transfer",
)


def missing_members(net: nn.Module) -> list[str]:
    """The :class:`SegmentationNetwork` members ``net`` lacks (``recon_head`` may be None but
    must exist); empty when it implements the contract."""
    return [name for name in CONTRACT_MEMBERS if not hasattr(net, name)]


def require_contract(net: nn.Module) -> SegmentationNetwork:
    """``net`` itself, typed as the contract; ConfigError naming its class and every member it
    lacks when it does not implement :class:`SegmentationNetwork`."""
    missing = missing_members(net)
    if missing:
        cls = type(net)
        raise ConfigError(
            f"network {cls.__module__}.{cls.__qualname__} does not implement the network contract "
            f"(lymphnode.models.contract.SegmentationNetwork): it lacks {', '.join(missing)}"
        )
    return net  # type: ignore[return-value]


def require_recon_head(net: SegmentationNetwork, task: str) -> nn.Module:
    """The network's reconstruction head; ConfigError naming ``task`` (what needs it) and the
    network's class when it has none (e.g. ``ViTUNet(recon=False)``)."""
    if net.recon_head is None:
        raise ConfigError(
            f"{task} needs a network with a reconstruction head; {type(net).__name__} was built "
            "without one (recon_head=None); with model=vit set model.recon=true"
        )
    return net.recon_head


__all__ = [
    "CONTRACT_MEMBERS",
    "DeclaresInputNeeds",
    "InputNeeds",
    "NetworkOutput",
    "SegmentationNetwork",
    "missing_members",
    "require_contract",
    "require_recon_head",
]
