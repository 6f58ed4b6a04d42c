"""The LightningModules: a shared base, the pretext tasks (reconstruction now), multi-task
fine-tuning, and training callbacks. Tasks are built by ``_target_`` from conf/task/ and
conf/pretext/; checkpoint reading lives in :mod:`lymphnode.models.checkpoint`."""

from __future__ import annotations

from lymphnode.tasks.base import TaskModule
from lymphnode.tasks.callbacks import DepthNormLogger, NonFiniteLossError, NonFiniteLossGuard
from lymphnode.tasks.multitask import MultiTaskModule
from lymphnode.tasks.reconstruction import ReconstructionModule

__all__ = [
    "DepthNormLogger",
    "MultiTaskModule",
    "NonFiniteLossError",
    "NonFiniteLossGuard",
    "ReconstructionModule",
    "TaskModule",
]
