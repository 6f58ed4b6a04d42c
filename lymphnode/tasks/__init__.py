"""The LightningModules: reconstruction pretraining and multi-task fine-tuning, plus checkpoints
and training callbacks."""

from __future__ import annotations

from lymphnode.models.checkpoint import (
    InferenceModel,
    LoadReport,
    is_lymphnode_checkpoint,
    load_inference_model,
    load_pretrained_weights,
)
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
    "is_lymphnode_checkpoint",
    "load_inference_model",
    "load_pretrained_weights",
]
