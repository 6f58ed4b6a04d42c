"""Validators for configuration values (integers, numbers, choices, the keys of a section): one
message shape everywhere.

Each returns the value as a plain Python type or raises
:class:`~lymphnode.core.errors.ConfigError` (or the ``error`` class given) whose message names the
parameter, the bad value and what is allowed, e.g. ``synth: width must be an integer >= 512 px,
got 100``. ``where`` prefixes the message with its context (``"synth: "``, ``"make_slide: "``).
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Collection, Mapping
from typing import Any, TypeVar

from lymphnode.core.errors import ConfigError, LymphnodeError

__all__ = ["choice", "integer", "keys", "number", "shard", "training"]

T = TypeVar("T")


def _bounds(minimum: float | None, maximum: float | None, strict_minimum: bool, unit: str) -> str:
    suffix = f" {unit}" if unit else ""
    low = ">" if strict_minimum else ">="
    if minimum is not None and maximum is not None:
        if strict_minimum:
            return f" in ({minimum:g}, {maximum:g}]{suffix}"
        return f" in {minimum:g}..{maximum:g}{suffix}"
    if minimum is not None:
        return f" {low} {minimum:g}{suffix}"
    if maximum is not None:
        return f" <= {maximum:g}{suffix}"
    return suffix


def integer(
    name: str,
    value: Any,
    minimum: int | None = None,
    maximum: int | None = None,
    *,
    unit: str = "",
    where: str = "",
    error: type[LymphnodeError] = ConfigError,
) -> int:
    """``value`` as an int when it is an integer (not a bool) in ``minimum..maximum``."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if ok and minimum is not None and value < minimum:
        ok = False
    if ok and maximum is not None and value > maximum:
        ok = False
    if not ok:
        bounds = _bounds(minimum, maximum, False, unit)
        raise error(f"{where}{name} must be an integer{bounds}, got {value!r}")
    return int(value)


def number(
    name: str,
    value: Any,
    minimum: float | None = None,
    maximum: float | None = None,
    *,
    strict_minimum: bool = False,
    finite: bool = True,
    unit: str = "",
    where: str = "",
    error: type[LymphnodeError] = ConfigError,
) -> float:
    """``value`` as a float when it is a finite real number (not a bool) within the bounds;
    ``strict_minimum`` excludes ``minimum`` itself (``> 0`` for "positive"). With
    ``finite=False``, NaN passes and infinities are held to the bounds like any number."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if ok and finite:
        ok = math.isfinite(value)
    checked = ok and not math.isnan(value)
    if checked and minimum is not None:
        ok = value > minimum if strict_minimum else value >= minimum
    if checked and ok and maximum is not None:
        ok = value <= maximum
    if not ok:
        bounds = _bounds(minimum, maximum, strict_minimum, unit)
        kind = "a finite number" if finite else "a number"
        raise error(f"{where}{name} must be {kind}{bounds}, got {value!r}")
    return float(value)


def choice(
    name: str,
    value: T,
    choices: Collection[Any],
    *,
    where: str = "",
    error: type[LymphnodeError] = ConfigError,
) -> T:
    """``value`` when it is one of ``choices``."""
    flag = isinstance(value, bool) and not any(isinstance(c, bool) for c in choices)
    if flag or value not in choices:
        raise error(f"{where}{name} must be one of {list(choices)}, got {value!r}")
    return value


def keys(
    name: str,
    value: Any,
    allowed: Collection[str],
    *,
    where: str = "",
    error: type[LymphnodeError] = ConfigError,
) -> dict[str, Any]:
    """``value`` as a dict when it is a mapping whose keys are all among ``allowed`` (a config
    section such as ``transforms`` or ``sampling``; which keys are required is the caller's)."""
    if not isinstance(value, Mapping):
        raise error(
            f"{where}{name} must be a mapping with keys among {list(allowed)}, got {value!r}"
        )
    unknown = sorted(set(map(str, value)) - set(allowed))
    if unknown:
        raise error(f"{where}{name} has unknown key(s) {unknown}; allowed keys: {list(allowed)}")
    return dict(value)


_SHARD = re.compile(r"(\d+)/(\d+)")


def shard(
    name: str, value: Any, *, where: str = "", error: type[LymphnodeError] = ConfigError
) -> tuple[int, int] | None:
    """``value`` ``"i/n"`` (this job is shard ``i`` of ``n`` jobs, ``0 <= i < n``, e.g. a job
    array's task id and its size) as ``(i, n)``; None for None (one job does everything)."""
    if value is None:
        return None
    match = _SHARD.fullmatch(value.strip()) if isinstance(value, str) else None
    if match is not None:
        index, count = int(match[1]), int(match[2])
        if index < count:
            return index, count
    raise error(
        f"{where}{name} must be 'i/n' with 0 <= i < n (this job's index, counted from 0, and the "
        f"number of jobs: 0/4, 1/4, 2/4, 3/4) or null for one job, got {value!r}"
    )


def _budget(name: str, value: Any, error: type[LymphnodeError]) -> None:
    """``trainer.max_steps`` / ``max_epochs``: null, -1 (no limit) or an integer >= 1."""
    if value is None or (value == -1 and isinstance(value, numbers.Integral)):
        return
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise error(f"{name} must be an integer >= 1, or -1 (no limit), got {value!r}")


def training(config: Mapping[str, Any], *, error: type[LymphnodeError] = ConfigError) -> None:
    """The numbers of a resolved train config (plain dicts) that Lightning or torch would turn
    into a traceback or a run that learns nothing: ``task.optimizer.lr`` (a finite number > 0),
    ``task.optimizer.weight_decay`` (finite, >= 0), ``trainer.max_steps`` and
    ``trainer.max_epochs`` (an integer >= 1 or -1: no limit), ``trainer.val_check_interval``
    (an integer >= 1 of batches, a fraction in (0, 1] of an epoch, or null). Each message names
    the key, the value and what is allowed; a missing key is left to its default."""
    task = config.get("task") if isinstance(config.get("task"), Mapping) else {}
    optimizer = task.get("optimizer") if isinstance(task, Mapping) else None
    if isinstance(optimizer, Mapping):
        if "lr" in optimizer:
            number("task.optimizer.lr", optimizer["lr"], 0.0, strict_minimum=True, error=error)
        if optimizer.get("weight_decay") is not None:
            number("task.optimizer.weight_decay", optimizer["weight_decay"], 0.0, error=error)
    trainer = config.get("trainer")
    if not isinstance(trainer, Mapping):
        return
    for key in ("max_steps", "max_epochs"):
        if key in trainer:
            _budget(f"trainer.{key}", trainer[key], error)
    interval = trainer.get("val_check_interval")
    if interval is None:
        return
    if isinstance(interval, numbers.Integral) and not isinstance(interval, bool):
        integer("trainer.val_check_interval", interval, 1, unit="batches (or a fraction in (0, 1]"
                " of an epoch, or null)", error=error)  # fmt: skip
    else:
        number("trainer.val_check_interval", interval, 0.0, 1.0, strict_minimum=True,
               unit="of an epoch (or an integer >= 1 of batches, or null)", error=error)  # fmt: skip
