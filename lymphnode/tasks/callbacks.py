"""Training callbacks: per-depth weight/gradient norms and the non-finite loss guard.

``DepthNormLogger`` lets a user see the paper's observation: with the top skip kept during
reconstruction pretraining, the deep blocks' weights and gradients stay near zero (the network
copies the input through the top skip); with it removed they learn.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from lymphnode.core.errors import ConfigError, LymphnodeError

log = logging.getLogger(__name__)


class NonFiniteLossError(LymphnodeError):
    """The training loss became NaN or infinite."""


class NonFiniteLossGuard(pl.Callback):
    """Stop training with :class:`NonFiniteLossError` when the loss is NaN/inf.

    Checked before the backward pass, so the weights are never updated with the bad gradients.
    The check reads the loss on the host: on a GPU that is one synchronisation per checked step
    (``every_n_steps`` > 1 trades detection latency for throughput).
    """

    def __init__(self, every_n_steps: int = 1) -> None:
        if (
            isinstance(every_n_steps, bool)
            or not isinstance(every_n_steps, int)
            or every_n_steps < 1
        ):
            raise ConfigError(
                f"NonFiniteLossGuard every_n_steps={every_n_steps!r} is invalid; expected an "
                "integer >= 1"
            )
        self.every_n_steps = every_n_steps

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor
    ) -> None:
        step = trainer.global_step
        if step % self.every_n_steps:
            return
        if not bool(torch.isfinite(loss.detach()).all()):
            value = loss.detach().float().cpu()
            raise NonFiniteLossError(
                f"training loss is {value.item() if value.numel() == 1 else value} at global step "
                f"{step} (epoch {trainer.current_epoch}); lower the learning rate, check the "
                "inputs for NaN, or resume from the last checkpoint"
            )


def _rms(tensors: Sequence[Tensor]) -> float:
    """Root mean square over all elements of ``tensors`` (0.0 when there are none)."""
    if not tensors:
        return 0.0
    squares = torch.stack([t.detach().float().pow(2).sum() for t in tensors]).sum()
    count = sum(t.numel() for t in tensors)
    return math.sqrt(float(squares) / count)


class DepthNormLogger(pl.Callback):
    """Log per-depth RMS of convolution weights and of their gradients every ``every_n_steps``.

    Keys: ``norms/enc{d}_weight``, ``norms/enc{d}_grad`` (d = 0..depth), ``norms/dec{d}_weight``,
    ``norms/dec{d}_grad`` (d = 0..depth-1), ``norms/heads_weight``, ``norms/heads_grad``. RMS
    (L2 norm / sqrt(number of elements)) rather than the L2 norm, so depths with different widths
    compare; only weights with more than one dimension (convolutions), not norm scales/biases.
    The module's network (``pl_module.net``) must group its parameters by depth with a
    ``depth_groups()`` method (:meth:`lymphnode.models.UNet.depth_groups`).
    """

    def __init__(self, every_n_steps: int = 50) -> None:
        if (
            isinstance(every_n_steps, bool)
            or not isinstance(every_n_steps, int)
            or every_n_steps < 1
        ):
            raise ConfigError(
                f"DepthNormLogger every_n_steps={every_n_steps!r} is invalid; expected an integer >= 1"
            )
        self.every_n_steps = every_n_steps

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        if trainer.global_step % self.every_n_steps:
            return
        net = getattr(pl_module, "net", None)
        if not isinstance(net, nn.Module) or not callable(getattr(net, "depth_groups", None)):
            raise ConfigError(
                f"DepthNormLogger needs a network `.net` with a depth_groups() method (as "
                f"lymphnode.models.UNet); {type(pl_module).__name__} has {type(net).__name__}"
            )
        pl_module.log_dict(depth_norms(net), on_step=True, on_epoch=False)


def depth_norms(net: nn.Module) -> dict[str, float]:
    """``{"norms/{group}_weight": rms, "norms/{group}_grad": rms}`` for every depth group of ``net``
    (see :class:`DepthNormLogger`); gradients that do not exist count as absent."""
    params = dict(net.named_parameters())
    norms: dict[str, float] = {}
    for group, names in net.depth_groups().items():  # type: ignore[operator]
        weights = [params[n] for n in names if params[n].ndim > 1]
        norms[f"norms/{group}_weight"] = _rms(weights)
        norms[f"norms/{group}_grad"] = _rms([w.grad for w in weights if w.grad is not None])
    return norms


__all__ = ["DepthNormLogger", "NonFiniteLossError", "NonFiniteLossGuard", "depth_norms"]
