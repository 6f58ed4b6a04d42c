"""The LightningModules and what trains them, one module per job (tasks are built by ``_target_``
from conf/task/ and conf/pretext/):

- ``base``: :class:`TaskModule`, what every task shares (network by ``_target_``, preprocessing
  contract, optimizer / schedule partials, image logging);
- ``reconstruction``: the reconstruction pretext task (pretraining, the paper's);
- ``masked``: masked-image modelling (hidden blocks restored from their context);
- ``contrastive``: SimCLR on the encoder with two augmented views (lightly's loss and head), with
  DenseCL's per-location term for ``pretext=dense_contrastive``;
- ``stain``: haematoxylin and eosin densities predicted from a greyscale / stain-jittered copy;
- ``multitask``: segmentation + reconstruction fine-tuning (or training from scratch), with its
  own lr scale / frozen start for the pretrained weights;
- ``callbacks``: per-depth weight / gradient norms, the non-finite loss guard, the all-tumour
  baseline, the progress output (a bar on a terminal, log lines otherwise);
- ``checkpointing``: checkpoint selection (``best.ckpt`` by ``selection``, ``last.ckpt`` = last step);
- ``budget``: a run's step / epoch / time budget and why it stopped (for results.json);
- ``spawn``: what a ``ddp_spawn`` fit's processes send back to the one that writes results.json.
- ``build``: the run's objects from the config (DataModule, task, callbacks, loggers, Trainer);
- ``lifecycle``: a run's identity, skip / resume / refuse, fitting, evaluating its checkpoints and
  its results.json (what ``python -m lymphnode.train`` runs).

Checkpoint reading lives in :mod:`lymphnode.models.checkpoint`.
"""

from __future__ import annotations

from lymphnode.tasks.base import TaskModule
from lymphnode.tasks.callbacks import DepthNormLogger, NonFiniteLossError, NonFiniteLossGuard
from lymphnode.tasks.contrastive import ContrastiveModule
from lymphnode.tasks.masked import MaskedModule
from lymphnode.tasks.multitask import MultiTaskModule
from lymphnode.tasks.reconstruction import ReconstructionModule
from lymphnode.tasks.stain import StainModule

__all__ = [
    "ContrastiveModule",
    "DepthNormLogger",
    "MaskedModule",
    "MultiTaskModule",
    "NonFiniteLossError",
    "NonFiniteLossGuard",
    "ReconstructionModule",
    "StainModule",
    "TaskModule",
]
