"""Plain ``nn.Module`` networks (no Lightning or Hydra here)."""

from __future__ import annotations

from lymphnode.models.unet import UNet, UNetOutput, build_unet, unet_depth_groups

__all__ = ["UNet", "UNetOutput", "build_unet", "unet_depth_groups"]
