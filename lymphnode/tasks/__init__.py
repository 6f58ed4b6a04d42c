"""The LightningModules: a shared base, the pretext tasks (reconstruction now), multi-task
fine-tuning, and training callbacks. Tasks are built by ``_target_`` from conf/task/ and
conf/pretext/; checkpoint reading lives in :mod:`lymphnode.models.checkpoint` (re-exported here, as
before the layout change)."""

from __future__ import annotations

from lymphnode.models.checkpoint import (
    InferenceModel,
    LoadReport,
    is_lymphnode_checkpoint,
    load_inference_model,
    load_pretrained_weights,
)
from lymphnode.tasks.base import TaskModule
from lymphnode.tasks.callbacks import DepthNormLogger, NonFiniteLossError, NonFiniteLossGuard
from lymphnode.tasks.multitask import MultiTaskModule
from lymphnode.tasks.reconstruction import ReconstructionModule

__all__ = [
    "DepthNormLogger",
    "InferenceModel",
    "LoadReport",
    "MultiTaskModule",
    "NonFiniteLossError",
    "NonFiniteLossGuard",
    "ReconstructionModule",
    "TaskModule",
    "is_lymphnode_checkpoint",
    "load_inference_model",
    "load_pretrained_weights",
]
