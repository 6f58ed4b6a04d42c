"""Networks by ``_target_``: what conf/model/*.yaml names and what checkpoints record.

A network config is a dict with ``_target_`` (the import path of an ``nn.Module`` class) and its
constructor arguments, e.g. ``{"_target_": "lymphnode.models.UNet", "base_width": 64, ...}``. A new
network is a module plus a YAML in conf/model/; nothing here lists them. What the task modules
expect of a network:

- ``forward(x)`` on normalised images (B, C, H, W) returns an object with ``seg`` (B, 1, H, W)
  tumour logits and ``recon`` (B, C, H, W) reconstruction (e.g. :class:`lymphnode.models.UNetOutput`);
- optionally ``min_size`` (smallest input side in px) and ``prepare_transfer(source_config)``
  (re-initialise what cannot be copied from a network built with ``source_config``; returns those
  parameter-name prefixes), used when fine-tuning from a pretraining checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from lymphnode.core.errors import ConfigError

TARGET = "_target_"


def network_class(target: Any) -> type[nn.Module]:
    """The ``nn.Module`` class at import path ``target``; ConfigError when it is not one."""
    from hydra.utils import get_class

    if not isinstance(target, str) or not target:
        raise ConfigError(f"model._target_={target!r} is invalid: expected an import path string")
    try:
        cls = get_class(target)
    except Exception as exc:  # ImportError, AttributeError, ValueError from Hydra
        raise ConfigError(
            f"model._target_={target!r} cannot be imported ({exc}): expected the import path of "
            "an nn.Module class, e.g. lymphnode.models.UNet"
        ) from exc
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ConfigError(f"model._target_={target!r} is {cls!r}: expected an nn.Module class")
    return cls


def build_network(config: Mapping[str, Any]) -> nn.Module:
    """The network of a config dict (``_target_`` + constructor arguments)."""
    if not isinstance(config, Mapping) or TARGET not in config:
        raise ConfigError(
            f"model={config!r} is invalid: expected a dict with _target_ (the network class) and "
            "its arguments, as conf/model/*.yaml"
        )
    cls = network_class(config[TARGET])
    kwargs = {str(k): v for k, v in config.items() if k != TARGET}
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(
            f"model {config[TARGET]} does not take the arguments {sorted(kwargs)}: {exc}"
        ) from exc


__all__ = ["TARGET", "build_network", "network_class"]
