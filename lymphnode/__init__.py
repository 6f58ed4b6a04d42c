"""lymphnode: few-label segmentation of lymph-node metastases in whole-slide images.

Reconstruction pretraining of a UNet (top skip removed), then multi-task fine-tuning on a few
labeled patches; whole-slide heatmaps and the CAMELYON16 evaluation. See README.md.
"""

from __future__ import annotations

import os

# albumentations checks PyPI for a newer release on import; never call home.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
# wandb only goes online when the user says so (WANDB_MODE=online): even an offline run posts
# telemetry to the W&B server when the process-wide mode is unset (wandb 0.31's OpenTelemetry proxy
# reads the global settings, not the run's mode).
os.environ.setdefault("WANDB_MODE", "offline")

from lymphnode.core import resolvers as _resolvers
from lymphnode.core.errors import LymphnodeError

_resolvers.register()  # the ${run_arm:...} etc. of conf/*.yaml resolve wherever they are composed

__all__ = ["LymphnodeError", "__version__"]
__version__ = "0.1.0"
