"""Test-time adaptation of BatchNorm statistics to a target slide (AdaBN, Li et al. 2016).

A network trained on one centre normalises its features with that centre's BatchNorm running
mean and variance. On another centre's stain those statistics are off and a dark lymphocyte field
can look like tumour. AdaBN re-estimates every BatchNorm layer's running statistics on the target
slide's own tissue tiles (no labels, no gradient, the weights untouched) and predicts with them.

:func:`adapt_batchnorm` is the whole method; :func:`batchnorm_record` says which statistics a
prediction used (``"source"`` or ``"adapted"`` with the number of tiles), for heatmaps and results.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from lymphnode.core.errors import ConfigError

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def batchnorm_layers(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers of ``module`` that track running statistics, in module order."""
    return [m for m in module.modules() if isinstance(m, _BN) and m.track_running_stats]


@torch.no_grad()
def adapt_batchnorm(
    module: nn.Module,
    batches: Iterable[Tensor],
    forward: Callable[[Tensor], Any] | None = None,
    *,
    max_batches: int | None = None,
    layers: int | None = None,
) -> dict[str, Any]:
    """Replace every BatchNorm running mean/variance of ``module`` by the statistics of ``batches``.

    Each BatchNorm layer's running statistics are reset and accumulated as a cumulative average
    (``momentum=None``) over the batches, the layers in training mode and everything else in
    evaluation mode, without gradients; the learned affine weights and every other parameter stay
    bit-identical. The module is left in evaluation mode, each layer's momentum restored.

    Args:
        module: the network (or task) holding the BatchNorm layers.
        batches: input tensors as ``forward`` takes them (normalised (B, 3, H, W) images).
        forward: the call that runs the network on one batch (default ``module``).
        max_batches: stop after this many batches (None: all).
        layers: adapt only the first ``layers`` BatchNorm layers in module order (the shallow
            ones, where a stain change shows; the deeper ones, whose statistics also reflect what
            the tiles show — tumour-balanced training patches against a mostly normal slide —
            keep the checkpoint's); None: all.

    Returns:
        :func:`batchnorm_record` of the adapted statistics: ``{"statistics": "adapted", "tiles": N,
        "batches": K, "layers": L}``.

    Raises:
        ConfigError: the module has no BatchNorm layer (nothing to adapt: a GroupNorm network), or
            ``batches`` is empty.
    """
    all_layers = batchnorm_layers(module)
    if layers is not None and layers < 1:
        raise ConfigError(f"adapt layers={layers} is invalid: expected >= 1 or null (all)")
    layers_ = all_layers if layers is None else all_layers[:layers]
    if not layers_:
        raise ConfigError(
            "test-time BatchNorm adaptation asked for a network without BatchNorm layers (norm "
            "'group'/'instance' or a ViT): expected model.norm=batch, or turn adaptation off"
        )
    if max_batches is not None and max_batches < 1:
        raise ConfigError(f"adapt max_batches={max_batches} is invalid: expected >= 1 or null")
    call = forward if forward is not None else module
    momenta = [layer.momentum for layer in layers_]
    was_training = module.training
    module.eval()
    tiles = batches_seen = 0
    try:
        for layer in layers_:
            layer.reset_running_stats()
            layer.momentum = None  # cumulative moving average over the batches
            layer.train()
        for batch in batches:
            if max_batches is not None and batches_seen >= max_batches:
                break
            call(batch)
            tiles += int(batch.shape[0])
            batches_seen += 1
    finally:
        for layer, momentum in zip(layers_, momenta, strict=True):
            layer.momentum = momentum
        module.eval()
        if was_training:  # the caller's mode, except the BatchNorm layers keep the new stats
            module.train()
    if not batches_seen:
        raise ConfigError("test-time BatchNorm adaptation got no batch: expected target tiles")
    return batchnorm_record(tiles=tiles, batches=batches_seen, layers=len(layers_))


def batchnorm_record(*, tiles: int = 0, batches: int = 0, layers: int = 0) -> dict[str, Any]:
    """Which BatchNorm statistics a prediction used: ``{"statistics": "source"}`` (the
    checkpoint's, tiles 0) or ``"adapted"`` with the number of target tiles and batches."""
    if tiles <= 0:
        return {"statistics": "source"}
    return {"statistics": "adapted", "tiles": tiles, "batches": batches, "layers": layers}


__all__ = ["adapt_batchnorm", "batchnorm_layers", "batchnorm_record"]
