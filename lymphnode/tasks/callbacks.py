"""Training callbacks: per-depth weight/gradient norms, the non-finite loss guard and the
all-tumour baseline of the test set.

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

from lymphnode.core import validate
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
        self.every_n_steps = validate.integer(
            "every_n_steps", every_n_steps, 1, where="NonFiniteLossGuard: "
        )

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
        self.every_n_steps = validate.integer(
            "every_n_steps", every_n_steps, 1, where="DepthNormLogger: "
        )

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


def all_tumour_f1(tumour_fraction: float) -> float:
    """F1 of predicting tumour on every pixel of a set whose tumour-pixel fraction is ``p``:
    precision p, recall 1, so F1 = 2p / (1 + p) (0 for a set without tumour)."""
    p = float(tumour_fraction)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"tumour_fraction={p!r} is not a fraction in [0, 1]")
    return 2.0 * p / (1.0 + p)


class AllTumourBaseline(pl.Callback):
    """Log ``test/baseline_all_tumour_f1``: the pixel F1 of predicting tumour everywhere on the
    test set (:func:`all_tumour_f1` of its tumour-pixel fraction).

    The fraction is counted from the ``mask`` of every test batch (B, 1, H, W) {0, 1} -- the same
    pixels the test metrics score, summed over processes under DDP -- so it costs no extra read.
    Batches without masks (pretraining) log nothing. A model whose F1 is not above this baseline
    has learned nothing a constant prediction does not give.
    """

    key = "test/baseline_all_tumour_f1"

    def __init__(self) -> None:
        self._tumour = 0.0  # tumour pixels seen this test epoch
        self._total = 0.0  # pixels seen this test epoch

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._tumour = self._total = 0.0

    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        mask = batch.get("mask") if isinstance(batch, dict) else None
        if isinstance(mask, Tensor):
            self._tumour += float((mask.detach() > 0.5).sum())
            self._total += float(mask.numel())

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        counts = torch.tensor([self._tumour, self._total], dtype=torch.float64)
        counts = trainer.strategy.reduce(counts.to(pl_module.device), reduce_op="sum").cpu()
        tumour, total = float(counts[0]), float(counts[1])
        if total > 0:
            pl_module.log(self.key, all_tumour_f1(tumour / total), on_step=False, on_epoch=True)


__all__ = [
    "AllTumourBaseline",
    "DepthNormLogger",
    "NonFiniteLossError",
    "NonFiniteLossGuard",
    "all_tumour_f1",
    "depth_norms",
]
