"""Networks (plain ``nn.Module``, built by ``_target_`` from conf/model/), the preprocessing
contract and checkpoint reading (no Lightning or Hydra-composed training here)."""

from __future__ import annotations

from lymphnode.models.preprocess import Preprocess, normalize_stats
from lymphnode.models.unet import UNet, UNetOutput, build_unet

__all__ = ["Preprocess", "UNet", "UNetOutput", "build_unet", "normalize_stats"]
