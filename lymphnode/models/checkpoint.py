"""Reading lymphnode checkpoints: pretrain -> fine-tune weight transfer and models for inference.

A lymphnode checkpoint is a Lightning checkpoint written by a :class:`lymphnode.tasks.TaskModule`:

- ``hyper_parameters["net"]``: the network's config (``_target_`` + arguments, any registered
  network, :mod:`lymphnode.models.registry`);
- ``hyper_parameters["preprocess"]``: the preprocessing contract (:meth:`Preprocess.to_dict`);
- ``checkpoint["lymphnode"]``: ``task_target`` (the task module's class), ``net_attribute`` (the
  network's attribute, so its weights are ``state_dict["<net_attribute>.*"]``), ``format``,
  ``version``, and ``transfer``: what of the network a fine-tuning run takes from it
  (``network``, every tensor; ``encoder``, the encoder only — a joint-embedding pretext trains
  nothing else; absent in older checkpoints: ``network``).

Checkpoints written before the preprocessing contract (format 1: ``hyper_parameters["model"]``
holding UNet arguments and ``normalize``/``patch_size``/``level``, weights under ``net.``) still load:
their network is the UNet, their task comes from ``checkpoint["lymphnode"]["task"]`` and their
contract from those three values with *no* stain normalisation (such checkpoints never recorded
one), with a warning that says so.

Checkpoints are read with ``torch.load(weights_only=True)``: they hold only tensors and plain
containers, so a file from elsewhere cannot run code on load. Neither can it when its task is
rebuilt: every class it names (task, network, optimizer, scheduler) must be on the allow-list of
:mod:`lymphnode.models.allowlist` (lymphnode's own tasks and networks, torch's optimizers and
schedulers, and the modules the caller trusts), checked before anything is imported or called.
"""

from __future__ import annotations

import logging
import pathlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lymphnode.core.errors import CheckpointError, ConfigError
from lymphnode.models import allowlist
from lymphnode.models.contract import require_contract
from lymphnode.models.preprocess import Preprocess
from lymphnode.models.registry import TARGET, build_network

log = logging.getLogger(__name__)

LEGACY_NET = "lymphnode.models.UNet"  # format-1 checkpoints: hyper_parameters["model"] is UNet args
LEGACY_TASKS = {  # format-1 checkpoints name their task, not its class
    "reconstruction": "lymphnode.tasks.ReconstructionModule",
    "multitask": "lymphnode.tasks.MultiTaskModule",
}
LEGACY_PREPROCESS_KEYS = ("normalize", "patch_size", "level")
# Network arguments that name a local weights file the network starts from (SmpUNet's
# encoder_weights, the ViT networks' weights): a network rebuilt from a checkpoint takes its
# weights from the state dict, so these are cleared (the checkpoint is self-contained).
WEIGHT_FILE_ARGS = ("encoder_weights", "weights")


@dataclass
class CheckpointParts:
    """What a lymphnode checkpoint holds, read without building anything."""

    path: Path
    hparams: dict[str, Any]
    net_config: dict[str, Any]  # _target_ + arguments
    net_state: dict[str, Tensor]  # the network's weights, names without the attribute prefix
    preprocess: Preprocess
    task_target: str | None  # import path of the task module class (None: unknown)
    net_attribute: str
    legacy: bool  # written before the preprocessing contract
    transfer: str = "network"  # what fine-tuning takes: "network" (all) or "encoder"


@dataclass
class LoadReport:
    """What :func:`load_pretrained_weights` did, by parameter/buffer name (without the prefix)."""

    path: Path
    loaded: list[str] = field(default_factory=list)
    reinitialized: list[str] = field(default_factory=list)  # e.g. UNet decoder.0 on top_skip change
    skipped: list[str] = field(default_factory=list)  # shape mismatches (strict_shapes=False only)
    missing: list[str] = field(default_factory=list)  # in the model, not in the checkpoint
    unexpected: list[str] = field(default_factory=list)  # in the checkpoint, not in the model
    transfer: str = "network"  # "network": every tensor; "encoder": the encoder's only
    task: str | None = None  # the checkpoint's task module class (import path)

    def summary(self) -> str:
        """One line for the log."""
        return (
            f"{self.path}: loaded {len(self.loaded)} tensors ({self.transfer}), re-initialised "
            f"{len(self.reinitialized)}, skipped {len(self.skipped)} (shape), "
            f"{len(self.missing)} missing, {len(self.unexpected)} unexpected"
        )


@dataclass
class InferenceModel:
    """A trained task module (eval mode) with the contract its inputs must follow."""

    task: nn.Module  # a lymphnode.tasks.TaskModule: .probabilities(x), .net
    preprocess: Preprocess
    hparams: dict[str, Any]

    @property
    def net(self) -> nn.Module:
        """The network inside the task."""
        return self.task.net  # type: ignore[return-value]

    @property
    def patch_size(self) -> int:
        """Tile side in px at :attr:`level` the network was trained on."""
        return self.preprocess.patch_size

    @property
    def level(self) -> int:
        """Slide pyramid level the network's patches were read at."""
        return self.preprocess.level

    def probabilities(self, x: Tensor) -> Tensor:
        """Tumour probabilities (B, 1, H, W) for normalised images (B, C, H, W)."""
        return self.task.probabilities(x)  # type: ignore[operator]

    def prepare(self, rgb: np.ndarray | Tensor) -> Tensor:
        """uint8 RGB (H, W, 3) or (B, H, W, 3) -> the (B, 3, H, W) float input on the task's
        device, stain-normalised and normalised by the contract."""
        x = rgb.cpu().numpy() if isinstance(rgb, Tensor) else np.asarray(rgb)
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4:
            raise ConfigError(f"prepare() takes (H, W, 3) or (B, H, W, 3) RGB; got {x.shape}")
        stained = np.stack([self.preprocess.stain_normalize(im) for im in x])
        device = next(self.task.parameters()).device
        return self.preprocess.normalize(stained, device)


def read_checkpoint(path: str | Path, *, mmap: bool = False) -> dict[str, Any]:
    """The checkpoint dict (``weights_only=True`` always, whatever
    ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` says: an explicit argument wins over it; on the CPU);
    CheckpointError when unreadable. ``mmap``: memory-map the tensors instead of reading them
    (a quick check of a large file)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist (or is not a file)")
    try:
        with torch.serialization.safe_globals([pathlib.PosixPath, pathlib.WindowsPath]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        raise CheckpointError(
            f"checkpoint {path} is not a torch checkpoint readable with weights_only=True "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from exc
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(
            f"checkpoint {path} holds a {type(ckpt).__name__}; expected a Lightning checkpoint dict"
        )
    return dict(ckpt)


def checkpoint_parts(ckpt: Mapping[str, Any], path: str | Path) -> CheckpointParts:
    """The parts of a lymphnode checkpoint dict, or CheckpointError naming what lacks."""
    path = Path(path)
    hparams = ckpt.get("hyper_parameters")
    state = ckpt.get("state_dict")
    found = ckpt.get("lymphnode")
    record: Mapping[str, Any] = found if isinstance(found, Mapping) else {}
    expected = "expected one written by a lymphnode task module (lymphnode.tasks)"
    if not isinstance(hparams, Mapping):
        raise CheckpointError(
            f"checkpoint {path} is not a lymphnode checkpoint: no 'hyper_parameters' ({expected})"
        )
    if not isinstance(state, Mapping):
        raise CheckpointError(
            f"checkpoint {path} is not a lymphnode checkpoint: no 'state_dict' ({expected})"
        )
    hparams = dict(hparams)
    legacy = "net" not in hparams
    if legacy:
        absent = [k for k in ("model", *LEGACY_PREPROCESS_KEYS) if k not in hparams]
        if absent:
            raise CheckpointError(
                f"checkpoint {path} is not a lymphnode checkpoint: hyper_parameters lack "
                f"{absent} and have no 'net' ({expected})"
            )
        if not isinstance(hparams["model"], Mapping):
            raise CheckpointError(
                f"checkpoint {path}: hyper_parameters['model'] is not a dict of UNet arguments"
            )
        net_config = {TARGET: LEGACY_NET, **hparams["model"]}
        task_target = LEGACY_TASKS.get(str(record.get("task")))
    else:
        if not isinstance(hparams["net"], Mapping) or TARGET not in hparams["net"]:
            raise CheckpointError(
                f"checkpoint {path}: hyper_parameters['net']={hparams['net']!r} is not a network "
                "config with _target_"
            )
        net_config = dict(hparams["net"])
        for key in WEIGHT_FILE_ARGS:
            if net_config.get(key) is not None:
                # the checkpoint's state dict holds the weights: the file it started from is not
                # needed (nor read: another machine need not have it)
                net_config[key] = None
        task_target = record.get("task_target")
    net_attribute = str(record.get("net_attribute", "net"))
    prefix = f"{net_attribute}."
    net_state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not net_state:
        raise CheckpointError(
            f"checkpoint {path} is not a lymphnode checkpoint: state_dict has no '{prefix}*' "
            f"weights ({expected})"
        )
    return CheckpointParts(
        path=path,
        hparams=hparams,
        net_config=net_config,
        net_state=net_state,
        preprocess=_preprocess_of(hparams, path, legacy),
        task_target=task_target,
        net_attribute=net_attribute,
        legacy=legacy,
        transfer=_transfer_of(record, path),
    )


TRANSFERS = ("network", "encoder")


def _transfer_of(record: Mapping[str, Any], path: Path) -> str:
    transfer = record.get("transfer", "network")
    if transfer not in TRANSFERS:
        raise CheckpointError(
            f"checkpoint {path}: lymphnode.transfer={transfer!r} is not one of {list(TRANSFERS)}"
        )
    return str(transfer)


def _preprocess_of(hparams: Mapping[str, Any], path: Path, legacy: bool) -> Preprocess:
    try:
        if not legacy:
            if hparams.get("preprocess") is None:
                raise CheckpointError(
                    f"checkpoint {path} records no preprocessing contract (hyper_parameters"
                    "['preprocess'] is null): it was saved before the task module was fitted "
                    "with a DataModule; expected a checkpoint written during or after fitting"
                )
            return Preprocess.from_dict(hparams["preprocess"])
        preprocess = Preprocess(
            level=hparams["level"],
            patch_size=hparams["patch_size"],
            mean=tuple((hparams["normalize"] or {}).get("mean", (0.0, 0.0, 0.0))),
            std=tuple((hparams["normalize"] or {}).get("std", (1.0, 1.0, 1.0))),
        )
    except ConfigError as exc:
        raise CheckpointError(
            f"checkpoint {path} has an invalid preprocessing contract: {exc}"
        ) from exc
    log.warning(
        "checkpoint %s was written before the preprocessing contract: using its normalize, "
        "patch_size=%d and level=%d and NO stain normalisation (it records none; if it was "
        "trained with data.stain_norm, its inputs will differ from training)",
        path,
        preprocess.patch_size,
        preprocess.level,
    )
    return preprocess


def read_parts(path: str | Path, *, mmap: bool = False) -> CheckpointParts:
    """:func:`checkpoint_parts` of the file at ``path`` (``mmap``: as :func:`read_checkpoint`)."""
    return checkpoint_parts(read_checkpoint(path, mmap=mmap), path)


def check_task(
    path: str | Path, expected_target: str, *, key: str, needed_by: str
) -> CheckpointParts:
    """The parts of the lymphnode checkpoint at ``path`` when it was written by the task module
    ``expected_target`` (an import path; aliases such as ``lymphnode.tasks.MultiTaskModule`` and
    ``lymphnode.tasks.multitask.MultiTaskModule`` are the same class).

    Read with ``weights_only=True`` (memory-mapped), so a hostile file runs no code and a
    truncated or foreign one is refused before Lightning or a network sees it.

    Raises:
        CheckpointError: unreadable, not a lymphnode checkpoint, or written by another task; the
            message starts with ``<key>=<path>`` and names the task found and the one
            ``needed_by`` needs.
    """
    # the config names the expected task (trusted); the checkpoint may name lymphnode's tasks or
    # a class of that task's own module (a pretext of the user's, e.g. tests/toy/)
    trusted = (expected_target.rsplit(".", 1)[0],) if "." in expected_target else ()
    try:
        parts = read_parts(path, mmap=True)
        found = _task_class(parts.task_target, parts.path, trusted)
    except CheckpointError as exc:
        raise CheckpointError(f"{key}={str(path)!r}: {exc}") from exc
    try:
        expected = registry_class(expected_target)
    except ConfigError as exc:
        raise CheckpointError(f"{key}={str(path)!r}: the task {expected_target!r}: {exc}") from exc
    if found is not expected:
        raise CheckpointError(
            f"{key}={str(path)!r} is a checkpoint of the task {parts.task_target}; "
            f"{needed_by} needs one of {expected.__module__}.{expected.__qualname__}"
        )
    return parts


def is_lymphnode_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a readable lymphnode checkpoint (never raises)."""
    try:
        read_parts(path)
    except CheckpointError:
        return False
    return True


def plan_pretrained_transfer(
    net: nn.Module, ckpt_path: str | Path, *, strict_shapes: bool = True
) -> tuple[LoadReport, dict[str, Tensor]]:
    """What :func:`load_pretrained_weights` would copy into ``net``, without touching it.

    Returns the report (``loaded`` already filled with the names that would be copied) and those
    tensors by name. Raises CheckpointError as :func:`load_pretrained_weights` does. The
    fine-tuning task uses it to put the pretrained parameters in their own optimizer group before
    the weights are loaded (``pretrained_lr_scale``, ``freeze_pretrained_steps``).
    """
    parts = read_parts(ckpt_path)
    path, ckpt_state = parts.path, parts.net_state
    report = LoadReport(path=path, transfer=parts.transfer, task=parts.task_target)
    model_state = net.state_dict()
    source_args = {k: v for k, v in parts.net_config.items() if k != TARGET}
    contract = require_contract(net)  # the task checked it when it built the network
    prefixes: list[str] = list(contract.prepare_transfer(source_args))
    encoder_prefix = contract.encoder_prefix
    if parts.transfer == "encoder":
        ckpt_state = {k: v for k, v in ckpt_state.items() if k.startswith(encoder_prefix)}
        if not ckpt_state:
            raise CheckpointError(
                f"checkpoint {path} transfers its encoder, but holds no '{encoder_prefix}*' "
                f"tensors for {type(net).__name__}"
            )

    def excluded(name: str) -> bool:
        if parts.transfer == "encoder" and not name.startswith(encoder_prefix):
            return True  # not transferred: keeps its initialisation
        return any(name.startswith(p) for p in prefixes)

    report.reinitialized = [k for k in model_state if any(k.startswith(p) for p in prefixes)]
    to_load: dict[str, Tensor] = {}
    mismatched: list[str] = []
    for name, value in ckpt_state.items():
        if excluded(name):
            continue
        if name not in model_state:
            report.unexpected.append(name)
        elif tuple(value.shape) != tuple(model_state[name].shape):
            mismatched.append(
                f"{name}: checkpoint {tuple(value.shape)} vs model {tuple(model_state[name].shape)}"
            )
            report.skipped.append(name)
        else:
            to_load[name] = value
    report.missing = [k for k in model_state if k not in ckpt_state and not excluded(k)]

    problems = (
        mismatched
        + [f"{k}: in the checkpoint, not in the model" for k in report.unexpected]
        + [f"{k}: in the model, not in the checkpoint" for k in report.missing]
    )
    if problems and strict_shapes:
        raise CheckpointError(
            f"checkpoint {path} (model {parts.net_config}) does not fit the model "
            f"{type(net).__name__} {getattr(net, 'config', '')}; {len(problems)} mismatched "
            "keys:\n  " + "\n  ".join(problems)
        )
    if problems:
        log.warning(
            "checkpoint %s: %d keys not loaded (strict_shapes=False):\n  %s",
            path,
            len(problems),
            "\n  ".join(problems),
        )
    if prefixes:
        mine = getattr(net, "config", {}) if isinstance(getattr(net, "config", None), dict) else {}
        changed = [
            f"{k}={source_args.get(k)} but the model has {k}={mine[k]}"
            for k in mine
            if k in source_args and source_args[k] != mine[k]
        ]
        log.warning(
            "checkpoint %s was trained with %s: %s (%d tensors) re-initialised, not loaded",
            path,
            "; ".join(changed) or source_args,
            ", ".join(repr(p) for p in prefixes),
            len(report.reinitialized),
        )
    report.loaded = sorted(to_load)
    return report, to_load


def load_pretrained_weights(
    net: nn.Module, ckpt_path: str | Path, *, strict_shapes: bool = True
) -> LoadReport:
    """Copy a lymphnode checkpoint's network weights into ``net`` by name, in place.

    When ``net`` has ``prepare_transfer(source_config)`` (the UNet: a different ``top_skip``
    re-initialises the top decoder block, with a warning), the prefixes it returns are not
    loaded. A checkpoint whose ``transfer`` is ``encoder`` (a joint-embedding pretext) gives only
    the tensors under ``net.encoder_prefix`` (default ``encoder.``); the rest keeps its
    initialisation and is neither missing nor unexpected. Every other tensor must exist on both
    sides with equal shapes; otherwise CheckpointError lists each mismatched name with its
    checkpoint and model shapes. With ``strict_shapes=False`` the mismatches are skipped (left as
    initialised) and logged. :func:`plan_pretrained_transfer` says the same without copying.
    """
    report, to_load = plan_pretrained_transfer(net, ckpt_path, strict_shapes=strict_shapes)
    model_state = net.state_dict()
    with torch.no_grad():
        for name, value in to_load.items():
            model_state[name].copy_(value)  # in place: keeps device, dtype and memory format
    log.info("pretrained weights %s", report.summary())
    return report


def registry_class(target: str) -> type[nn.Module]:
    """The ``nn.Module`` class at ``target``, an import path from the user's own config (never
    from a checkpoint: those go through :mod:`lymphnode.models.allowlist`)."""
    from lymphnode.models.registry import network_class

    return network_class(target)


def _task_class(target: str | None, path: Path, trusted: Sequence[str] = ()) -> type[nn.Module]:
    if target is None:
        raise CheckpointError(
            f"checkpoint {path} does not name its task module (checkpoint['lymphnode']"
            "['task_target']): expected a checkpoint written by lymphnode.tasks"
        )
    return allowlist.task_class(target, path, trusted)


def load_inference_model(
    path: str | Path,
    map_location: str | torch.device = "cpu",
    *,
    trusted_modules: Sequence[str] = (),
) -> InferenceModel:
    """Rebuild the trained task module of a lymphnode checkpoint (eval mode, its network
    included, any registered one) with its preprocessing contract.

    Every class the checkpoint names must be on the allow-list
    (:mod:`lymphnode.models.allowlist`: lymphnode's tasks and networks, torch's optimizers and
    schedulers, classes of ``trusted_modules``), checked before anything is imported or called.
    The network is built from the checkpoint's weights alone: an ``encoder_weights`` file it was
    first initialised from is not read (nor needed on this machine).
    """
    parts = read_parts(path)
    trusted = _trusted(trusted_modules)
    cls = _task_class(parts.task_target, parts.path, trusted)
    kwargs = dict(parts.hparams)
    if parts.legacy:  # format 1: the network was `model`, the contract three keys
        kwargs.pop("model")
        for key in LEGACY_PREPROCESS_KEYS:
            kwargs.pop(key)
    kwargs["net"] = parts.net_config  # without encoder_weights: the weights are in the state dict
    allowlist.check_hparams(kwargs, parts.path, trusted)  # before anything is imported or called
    kwargs["preprocess"] = parts.preprocess
    kwargs.pop("pretrained", None)  # the weights come from this checkpoint
    try:
        build_network(parts.net_config)  # a clear error for a bad network config first
        task = cls(**kwargs)
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(
            f"checkpoint {parts.path} cannot rebuild its task {parts.task_target} with network "
            f"{parts.net_config}: {exc}"
        ) from exc
    net = getattr(task, parts.net_attribute, None)
    if not isinstance(net, nn.Module):
        raise CheckpointError(
            f"checkpoint {parts.path}: task {parts.task_target} has no network "
            f"`.{parts.net_attribute}`"
        )
    expected = net.state_dict()
    missing = sorted(set(expected) - set(parts.net_state))
    unexpected = sorted(set(parts.net_state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {parts.path}: weights do not match its model config {parts.net_config} "
            f"(missing {missing}, unexpected {unexpected})"
        )
    try:
        net.load_state_dict(parts.net_state)
    except RuntimeError as exc:
        raise CheckpointError(
            f"checkpoint {parts.path}: weights do not fit its model: {exc}"
        ) from exc
    return InferenceModel(
        task=task.to(map_location).eval(), preprocess=parts.preprocess, hparams=parts.hparams
    )


def _trusted(modules: Sequence[str]) -> tuple[str, ...]:
    """``trusted_modules`` checked: dotted module names (ConfigError naming a bad one)."""
    if isinstance(modules, str):
        modules = [modules]
    out = []
    for m in modules:
        if not isinstance(m, str) or not all(p.isidentifier() for p in m.split(".")):
            raise ConfigError(
                f"trusted_modules holds {m!r}; expected dotted module names (e.g. my_networks)"
            )
        out.append(m)
    return tuple(out)


def read_preprocess(path: str | Path) -> Preprocess:
    """The preprocessing contract of the checkpoint at ``path`` (memory-mapped: the weights are
    not read)."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals([pathlib.PosixPath, pathlib.WindowsPath]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({type(exc).__name__}: {exc})"
        ) from exc
    return checkpoint_parts(ckpt, path).preprocess


__all__ = [
    "CheckpointParts",
    "InferenceModel",
    "LoadReport",
    "check_task",
    "checkpoint_parts",
    "is_lymphnode_checkpoint",
    "load_inference_model",
    "load_pretrained_weights",
    "plan_pretrained_transfer",
    "read_checkpoint",
    "read_parts",
    "read_preprocess",
    "registry_class",
]
