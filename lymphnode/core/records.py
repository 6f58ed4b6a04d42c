"""Run records: resume a job that wrote a record with the same config, refuse one with another.

Every stage that writes outputs incrementally (the synthetic slide set, the patch caches, the
split file, training runs) keeps a JSON record beside them holding the config that decides their
bytes. A rerun compares its config with the record's: equal, it resumes (skips what is done);
different, it refuses with a message naming every differing key (``seed: 0 → 1``) unless the user
forces a rebuild. Keys are compared flattened (``sampling.n``), so key order never matters; keys
that cannot change the outputs (a progress bar, a log folder) are left out of the comparison by
name (``ignore``), and :func:`fingerprint` is the short identity of what is compared.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lymphnode.core.errors import ConfigError, LymphnodeError

__all__ = [
    "Resume",
    "config_differences",
    "fingerprint",
    "flatten",
    "is_ignored",
    "read_record",
    "resume_or_refuse",
]

_ABSENT = object()


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as ``{"a.b.c": leaf}``; an empty mapping or a non-mapping is a leaf."""
    if isinstance(value, Mapping) and value:
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: value}


def _show(value: Any) -> str:
    if value is _ABSENT:
        return "<absent>"
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return repr(value)


def is_ignored(key: str, ignore: Iterable[str]) -> bool:
    """Whether the flattened ``key`` is one of ``ignore`` or lies below one (``logger`` covers
    ``logger.csv.save_dir``; ``log`` does not cover ``logger``)."""
    return any(key == name or key.startswith(f"{name}.") for name in ignore)


def _compared(config: Mapping[str, Any], ignore: Iterable[str]) -> dict[str, Any]:
    names = tuple(ignore)
    return {k: v for k, v in flatten(dict(config)).items() if not is_ignored(k, names)}


def fingerprint(config: Mapping[str, Any], ignore: Iterable[str] = ()) -> str:
    """The first 16 hex digits of the SHA-256 of ``config`` flattened, without the ``ignore``d
    keys, as canonical JSON (sorted keys): equal for configs :func:`config_differences` calls
    equal with the same ``ignore``, whatever their key order."""
    text = json.dumps(_compared(config, ignore), sort_keys=True, ensure_ascii=True, default=repr)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def config_differences(
    old: Mapping[str, Any],
    new: Mapping[str, Any],
    ignore: Iterable[str] = (),
    absent_is_null: bool = False,
) -> list[str]:
    """``"key: old → new"`` for every flattened key whose value differs, sorted by key (values as
    JSON; ``<absent>`` for a key only one side has), leaving out the keys of ``ignore`` and those
    below them (:func:`is_ignored`). With ``absent_is_null``, a key that ``old`` lacks and ``new``
    sets to null is no difference (a key added since, whose null default keeps the old
    behaviour). Empty when the configs are equal."""
    a, b = _compared(old, ignore), _compared(new, ignore)

    def differs(key: str) -> bool:
        before, after = a.get(key, _ABSENT), b.get(key, _ABSENT)
        if absent_is_null and before is _ABSENT and after is None:
            return False
        return before != after

    return [
        f"{key}: {_show(a.get(key, _ABSENT))} → {_show(b.get(key, _ABSENT))}"
        for key in sorted(set(a) | set(b))
        if differs(key)
    ]


def read_record(
    path: str | Path,
    *,
    what: str,
    required_keys: Mapping[str, type] | None = None,
    error: type[LymphnodeError] = ConfigError,
) -> dict[str, Any] | None:
    """The JSON object at ``path``; None when the file does not exist.

    Raises ``error`` naming the file when it is unreadable, not a JSON object, or lacks one of
    ``required_keys`` (name → the type its value must have). ``what`` names the record in the
    message (e.g. ``"synth manifest"``).
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise error(f"{path} is not a readable {what}: {exc}") from exc
    if not isinstance(record, dict):
        raise error(f"{path} is not a {what}: expected a JSON object, got {type(record).__name__}")
    for key, kind in (required_keys or {}).items():
        if not isinstance(record.get(key), kind):
            raise error(
                f"{path} is not a {what}: its {key!r} is {record.get(key)!r}, expected a "
                f"{kind.__name__}"
            )
    return record


@dataclass(frozen=True)
class Resume:
    """What :func:`resume_or_refuse` found.

    Attributes:
        record: the existing record (None: there is none, or it was unreadable and forced).
        changes: the differing keys (empty: the same config, or no record).
    """

    record: dict[str, Any] | None
    changes: list[str] = field(default_factory=list)

    @property
    def resumes(self) -> bool:
        """Whether an existing record with the same config continues."""
        return self.record is not None and not self.changes


def resume_or_refuse(
    path: str | Path,
    config: Mapping[str, Any],
    *,
    what: str,
    remedy: str,
    force: bool = False,
    config_key: str = "config",
    required_keys: Mapping[str, type] | None = None,
    error: type[LymphnodeError] = ConfigError,
    ignore: Iterable[str] = (),
    absent_is_null: bool = False,
) -> Resume:
    """Compare ``config`` with the config stored under ``config_key`` in the record at ``path``.

    - no record: ``Resume(None)``, start afresh;
    - the same config: ``Resume(record)``, resume;
    - another config: raise ``error`` naming every differing key and ``remedy`` (e.g. "use another
      out_dir or overwrite=true"); with ``force``, return ``Resume(record, changes)`` instead so
      that the caller rebuilds;
    - an unreadable record: raise ``error`` naming the file and ``remedy``; with ``force``,
      ``Resume(None)``.

    Keys of ``ignore`` (and below them) do not count as differences, nor with ``absent_is_null``
    keys the record lacks that ``config`` sets to null (:func:`config_differences`).
    """
    keys = {config_key: dict, **(required_keys or {})}
    try:
        record = read_record(path, what=what, required_keys=keys, error=error)
    except LymphnodeError as exc:
        if force:
            return Resume(None)
        raise error(f"{exc}; {remedy}") from exc
    if record is None:
        return Resume(None)
    changes = config_differences(record[config_key], config, ignore, absent_is_null)
    if changes and not force:
        raise error(
            f"{path} was made with another config (differing keys: {'; '.join(changes)}); {remedy}"
        )
    return Resume(record, changes)
