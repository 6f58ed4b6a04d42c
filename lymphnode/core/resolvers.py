"""The OmegaConf resolvers conf/*.yaml use, registered when :mod:`lymphnode` is imported (so any
composition of lymphnode's configs resolves, inside a CLI or not).

- ``${pretrained_if:${init},${path}}``: ``path`` when init is ``pretrained``, else None (so that
  ``init=scratch`` fine-tunes the same config from random weights);
- ``${pretext_suffix:${pretext.name}}``: ``""`` for the paper's reconstruction pretext (its runs keep
  the folders ``pretrain`` and ``pretrained``), ``"-<name>"`` for any other;
- ``${run_arm:${init},${pretext.name}}``: the first folder of a fine-tuning run, ``scratch`` (shared
  by every pretext), ``pretrained`` (reconstruction) or ``pretrained-<pretext>``;
- ``${arm_variant:${model._target_},${method}}``: what else names a run's arm folder beside its
  init and pretext: ``""`` for the paper's network (``lymphnode.models.UNet``) and fine-tuning
  method (``method: null``), ``"@<network>"`` for another network (its class name in lower case:
  ``@smpunet``) and ``"+<method>"`` for another method (``+semi``), so that different arms never
  share a run folder;
- ``${method_of:${oc.select:task.semi,null}}``: ``semi`` when semi-supervised settings are set,
  else None (the default of conf/train.yaml's ``method``);
- ``${shard_dir:${shard}[,default]}``: ``shard-<i>-of-<n>`` for prepare's ``shard=i/n`` (each job
  of a sharded build logs into its own folder), ``default`` (``""``) for null or a malformed value
  (prepare itself refuses that one, naming it).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

PAPER_PRETEXT = "reconstruction"
PAPER_NETWORK = "lymphnode.models.UNet"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def pretrained_if(init: Any, path: Any) -> Any:
    """``path`` when ``init`` is ``pretrained``, else None."""
    return path if init == "pretrained" else None


def pretext_suffix(name: Any) -> str:
    """``""`` for reconstruction (or no pretext), ``"-<name>"`` for any other pretext."""
    return "" if name in (None, PAPER_PRETEXT) else f"-{name}"


def run_arm(init: Any, pretext: Any) -> str:
    """``scratch``, ``pretrained`` (reconstruction) or ``pretrained-<pretext>``."""
    return "scratch" if init == "scratch" else f"{init}{pretext_suffix(pretext)}"


def network_name(target: Any) -> str:
    """The network of a ``model._target_`` as a folder word: its class name in lower case
    (``lymphnode.models.SmpUNet`` → ``smpunet``, ``lymphnode.models.ViTUNet`` → ``vitunet``)."""
    return str(target).rsplit(".", 1)[-1].lower()


def arm_variant(model_target: Any, method: Any = None) -> str:
    """``""`` for the paper's network and method, else ``"@<network>"`` and/or ``"+<method>"``
    (in that order); ConfigError for a method that cannot be a folder name."""
    from lymphnode.core.errors import ConfigError

    out = "" if model_target in (None, PAPER_NETWORK) else f"@{network_name(model_target)}"
    if method is not None:
        if not isinstance(method, str) or not _NAME.match(method) or method == "null":
            raise ConfigError(
                f"method={method!r} cannot name a run folder; expected null (the paper's "
                "multi-task fine-tuning) or a word of letters, digits, '_', '.', '-' (e.g. semi)"
            )
        out += f"+{method}"
    return out


def method_of(semi: Any) -> str | None:
    """The fine-tuning method a config implies: ``"semi"`` when semi-supervised settings
    (``task.semi``) are set, else None (the paper's multi-task fine-tuning)."""
    return None if semi is None else "semi"


def shard_dir(shard: Any, default: Any = "") -> str:
    """``shard-<i>-of-<n>`` for a valid ``"i/n"``, else ``str(default)``."""
    from lymphnode.core.errors import ConfigError
    from lymphnode.core.validate import shard as parse_shard

    try:
        parsed = parse_shard("shard", shard)
    except ConfigError:  # refused by prepare, with the message; the log folder is the default
        parsed = None
    return str(default) if parsed is None else f"shard-{parsed[0]}-of-{parsed[1]}"


RESOLVERS: dict[str, Callable[..., Any]] = {
    "pretrained_if": pretrained_if,
    "pretext_suffix": pretext_suffix,
    "run_arm": run_arm,
    "arm_variant": arm_variant,
    "method_of": method_of,
    "shard_dir": shard_dir,
}


def register() -> None:
    """Register :data:`RESOLVERS` with OmegaConf (idempotent)."""
    from omegaconf import OmegaConf

    for name, resolver in RESOLVERS.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)


__all__ = [
    "RESOLVERS",
    "arm_variant",
    "method_of",
    "network_name",
    "pretext_suffix",
    "pretrained_if",
    "register",
    "run_arm",
    "shard_dir",
]
