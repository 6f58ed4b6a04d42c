"""Networks and what a checkpoint says about its input (plain ``nn.Module``; no Lightning training
or Hydra composition here), one module per job:

- ``registry``: networks by ``_target_`` (what conf/model/*.yaml names and checkpoints record);
- ``unet``: the paper's UNet (removable top skip, reconstruction and segmentation heads);
- ``smp_unet``: segmentation-models-pytorch's UNet with a timm/torchvision encoder and the same
  two heads (``model=smp_unet``; local encoder weights only);
- ``vit``, ``vit_presets``, ``vit_weights``: pathology foundation-model ViTs by preset, filled
  only from local files, under a convolutional decoder with an image skip (``model=vit``);
- ``weight_files``: reading a user's local weights file (safetensors / weights-only torch);
- ``preprocess``: the preprocessing contract (level / mpp, patch size, normalisation, stain state),
  applied the same way in training and in ``infer``;
- ``stain``: Macenko and Reinhard stain normalisers and the optical-density table;
- ``checkpoint``: reading lymphnode checkpoints (pretrain -> fine-tune transfer, inference models).
"""

from __future__ import annotations

from lymphnode.models.preprocess import Preprocess, normalize_stats
from lymphnode.models.smp_unet import SmpUNet
from lymphnode.models.unet import UNet, UNetOutput, build_unet
from lymphnode.models.vit import ViTUNet

__all__ = [
    "Preprocess",
    "SmpUNet",
    "UNet",
    "UNetOutput",
    "ViTUNet",
    "build_unet",
    "normalize_stats",
]
