"""What a checkpoint may name: the classes behind the ``_target_`` strings it holds.

A checkpoint is data. Rebuilding its task module for ``infer`` or ``select`` imports the classes it
names (task, network, optimizer, scheduler) and calls them; a file from elsewhere could name
anything (``builtins.open``, ``torch.load``, ``shutil.rmtree``) and Hydra's ``instantiate`` would
call it, also deep inside an argument. So every ``_target_`` a checkpoint holds is checked here
*before* anything is imported or called:

- the task: a class of ``lymphnode.tasks`` (or of a trusted module);
- the network: a class of ``lymphnode.models`` (or of a trusted module);
- the optimizer / scheduler: a ``torch.optim`` optimizer / ``torch.optim.lr_scheduler`` scheduler
  class (or a class of a trusted module), with plain-data arguments;
- no other ``_target_`` anywhere (an argument with its own ``_target_`` is refused).

*Trusted modules* are what the user says may be named besides lymphnode's own (``infer
trusted_modules=[my_networks]``: a network or pretext of their own, registered by ``_target_``
outside lymphnode, see tests/toy/); a module is trusted with everything below it.

The string is checked before its module is imported (an import runs the module's code), and the
class it resolves to is checked again (its ``__module__`` must be in the same allowed place), so a
path that walks through a module's attributes (``lymphnode.tasks.base.torch.load``) is refused too.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from lymphnode.core.errors import CheckpointError

TARGET = "_target_"
TASK_MODULES = ("lymphnode.tasks",)
NETWORK_MODULES = ("lymphnode.models",)
OPTIMIZER_MODULES = ("torch.optim",)
# Hydra keys that change how a config is called: none of them may come from a checkpoint, except
# ``_partial_: true`` on the optimizer / scheduler (conf/task/*.yaml writes it) and ``_args_``
# (positional arguments, checked as plain data like the others).
HYDRA_SPECIAL = ("_partial_", "_recursive_", "_convert_")


def _under(name: str, modules: Sequence[str]) -> bool:
    """Whether the dotted ``name`` is one of ``modules`` or below one of them."""
    return any(name == m or name.startswith(f"{m}.") for m in modules)


def _allowed_text(modules: Sequence[str]) -> str:
    return ", ".join(f"{m}.*" for m in modules)


def _resolve(target: str, modules: Sequence[str], what: str, path: Path) -> type:
    """The class at ``target`` when both the string and the class's own module are under
    ``modules``; CheckpointError naming the checkpoint, ``what`` and the target otherwise."""
    if not isinstance(target, str) or not _under(target, modules):
        raise CheckpointError(
            f"checkpoint {path} names the {what} {target!r}, which a checkpoint may not name "
            f"(allowed: {_allowed_text(modules)}; a class of your own: trusted_modules=[<its "
            "module>]); nothing was imported or run"
        )
    from hydra.utils import get_object

    try:
        cls = get_object(target)  # any object: a function is refused below, naming it
    except Exception as exc:  # ImportError, AttributeError, ValueError from Hydra
        raise CheckpointError(
            f"checkpoint {path}: its {what} {target!r} cannot be imported ({exc})"
        ) from exc
    if not isinstance(cls, type) or not _under(cls.__module__, modules):
        raise CheckpointError(
            f"checkpoint {path} names the {what} {target!r}, which is "
            f"{getattr(cls, '__module__', '?')}.{getattr(cls, '__qualname__', cls)!s}, not a "
            f"class of {_allowed_text(modules)}; nothing was run"
        )
    return cls


def task_class(target: Any, path: str | Path, trusted: Sequence[str] = ()) -> type[nn.Module]:
    """The task module class a checkpoint names (``lymphnode.tasks`` or ``trusted``)."""
    cls = _resolve(target, (*TASK_MODULES, *trusted), "task module", Path(path))
    if not issubclass(cls, nn.Module):
        raise CheckpointError(f"checkpoint {path}: its task module {target!r} is not an nn.Module")
    return cls


def network_class(target: Any, path: str | Path, trusted: Sequence[str] = ()) -> type[nn.Module]:
    """The network class a checkpoint names (``lymphnode.models`` or ``trusted``)."""
    cls = _resolve(target, (*NETWORK_MODULES, *trusted), "network", Path(path))
    if not issubclass(cls, nn.Module):
        raise CheckpointError(f"checkpoint {path}: its network {target!r} is not an nn.Module")
    return cls


def factory_class(target: Any, path: str | Path, key: str, trusted: Sequence[str] = ()) -> type:
    """The optimizer (``key="optimizer"``) or scheduler class a checkpoint names: a
    ``torch.optim`` optimizer / ``torch.optim.lr_scheduler`` scheduler, or a class of
    ``trusted``."""
    import torch

    cls = _resolve(target, (*OPTIMIZER_MODULES, *trusted), key, Path(path))
    if _under(cls.__module__, trusted):
        return cls
    bases: tuple[type, ...] = (
        (torch.optim.Optimizer,)
        if key == "optimizer"
        else (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    )
    if not issubclass(cls, bases):
        raise CheckpointError(
            f"checkpoint {path}: its {key} {target!r} is not a torch {key} class "
            f"({' or '.join(b.__qualname__ for b in bases)})"
        )
    return cls


def _targets(value: Any, where: str) -> Iterator[tuple[str, Any, Mapping[str, Any]]]:
    """(dotted key, ``_target_`` value, the mapping holding it) for every ``_target_`` in
    ``value``, depth first; a mapping holding a Hydra special key is reported with that key."""
    if isinstance(value, Mapping):
        for special in HYDRA_SPECIAL:
            if special in value:
                yield f"{where}.{special}" if where else special, value[special], value
        if TARGET in value:
            yield where, value[TARGET], value
        for k, v in value.items():
            yield from _targets(v, f"{where}.{k}" if where else str(k))
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            yield from _targets(v, f"{where}[{i}]")


def check_hparams(
    hparams: Mapping[str, Any], path: str | Path, trusted: Sequence[str] = ()
) -> None:
    """CheckpointError unless every ``_target_`` in a checkpoint's ``hyper_parameters`` is one
    it may name: ``net`` (a network), ``optimizer`` and ``scheduler`` (torch's), nothing else and
    nothing nested in their arguments. Imports only allowed modules; calls nothing."""
    path = Path(path)
    roles = {"net": "network", "optimizer": "optimizer", "scheduler": "scheduler"}
    for where, target, _holder in _targets(hparams, ""):
        if where.rsplit(".", 1)[-1] in HYDRA_SPECIAL:
            if where in ("optimizer._partial_", "scheduler._partial_") and target is True:
                continue  # what conf/task/*.yaml says (and what rebuilding them does anyway)
            raise CheckpointError(
                f"checkpoint {path}: hyper_parameters.{where}={target!r} is a Hydra key that a "
                "checkpoint may not set (it changes how its settings are called)"
            )
        role = roles.get(where)
        if role == "network":
            network_class(target, path, trusted)
        elif role is not None:
            factory_class(target, path, role, trusted)
        else:
            raise CheckpointError(
                f"checkpoint {path}: hyper_parameters.{where} names _target_={target!r}; a "
                "checkpoint's settings may name a class only at 'net', 'optimizer' and "
                "'scheduler' (their arguments are plain data); nothing was imported or run"
            )


__all__ = ["check_hparams", "factory_class", "network_class", "task_class"]
