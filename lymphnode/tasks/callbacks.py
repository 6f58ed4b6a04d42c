"""Training callbacks: per-depth weight/gradient norms, the non-finite loss guard, the
all-tumour baseline of the test set, and the progress output (:func:`progress_bar`: a tqdm bar on
a terminal, one log line per N optimizer steps when the output goes to a file or a pipe).

``DepthNormLogger`` lets a user see the paper's observation: with the top skip kept during
reconstruction pretraining, the deep blocks' weights and gradients stay near zero (the network
copies the input through the top skip); with it removed they learn.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Sequence
from typing import IO, Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import TQDMProgressBar
from pytorch_lightning.callbacks.progress.progress_bar import ProgressBar
from torch import Tensor, nn

from lymphnode.core import validate
from lymphnode.core.errors import ConfigError, LymphnodeError
from lymphnode.models.contract import SegmentationNetwork

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
        net = getattr(pl_module, "net", None)  # a lymphnode TaskModule's network
        if not isinstance(net, nn.Module) or not isinstance(net, SegmentationNetwork):
            raise ConfigError(
                f"DepthNormLogger needs a lymphnode task module whose network `.net` implements "
                f"the network contract (depth_groups()); {type(pl_module).__name__} has "
                f"{type(net).__name__}"
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


class LogProgress(ProgressBar):
    """Progress as log lines, for output that is not a terminal (a cluster's log file, a pipe),
    where a tqdm bar writes a ``\\r``-separated line per refresh: one INFO line every
    ``every_n_steps`` optimizer steps (``step 50/2000 (epoch 3), 4.1 steps/s, loss=0.312``) and
    one per validation with its ``val/*`` metrics. ``every_n_steps=0``: no lines.
    """

    def __init__(self, every_n_steps: int = 50) -> None:
        super().__init__()
        self.every_n_steps = validate.integer("every_n_steps", every_n_steps, 0)
        self._enabled = self.every_n_steps > 0
        self._logged_step = -1
        self._clock: tuple[float, int] | None = None  # (time.monotonic(), global step)

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = self.every_n_steps > 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._clock = (time.monotonic(), trainer.global_step)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any
    ) -> None:
        step = trainer.global_step
        if not self._enabled or step == self._logged_step or step % self.every_n_steps:
            return
        self._logged_step = step
        rate = ""
        if self._clock is not None and step > self._clock[1]:
            elapsed = time.monotonic() - self._clock[0]
            rate = f", {(step - self._clock[1]) / max(elapsed, 1e-9):.2f} steps/s"
        total = (
            "" if trainer.max_steps is None or trainer.max_steps < 0 else f"/{trainer.max_steps}"
        )
        metrics = _metric_text(self.get_metrics(trainer, pl_module))
        log.info("step %d%s (epoch %d)%s%s", step, total, trainer.current_epoch, rate, metrics)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._enabled or trainer.sanity_checking or trainer.state.fn != "fit":
            return
        values = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        log.info("validation at step %d%s", trainer.global_step, _metric_text(values))


def _metric_text(metrics: dict[str, Any]) -> str:
    """``, key=value, ...`` of the scalar entries of ``metrics`` (4 significant digits)."""
    parts = []
    for key, value in sorted(metrics.items()):
        try:
            parts.append(f"{key}={float(value):.4g}")
        except (TypeError, ValueError):
            continue
    return "".join(f", {p}" for p in parts)


def progress_bar(
    refresh_rate: int = 10, every_n_steps: int = 50, stream: IO[str] | None = None
) -> ProgressBar:
    """The progress callback for where the output goes (``stream``, default stderr): Lightning's
    tqdm bar (redrawn every ``refresh_rate`` batches; 0: none) on a terminal, else
    :class:`LogProgress` (a log line per ``every_n_steps`` optimizer steps; 0: none)."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    if callable(isatty) and isatty():
        return TQDMProgressBar(refresh_rate=validate.integer("refresh_rate", refresh_rate, 0))
    return LogProgress(every_n_steps=every_n_steps)
