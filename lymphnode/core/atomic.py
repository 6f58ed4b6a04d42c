"""Atomic file writes: a file either keeps its old bytes or holds all of its new ones.

Every writer writes a temp file in the target's own folder (so the rename never crosses a file
system), fsyncs it, ``os.replace``-s it over the target and fsyncs the folder. A writer that
fails (a full disk, a bad value, Ctrl-C) leaves neither a half-written target nor its temp file.

Temp names are ``.<name>.tmp-<token>-<host>-<pid>``: :func:`is_stale_temp` tells a temp left by a
killed process of this machine from one that a live process (or another machine sharing the
folder, e.g. a job array on a network file system) is still writing.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import secrets
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

__all__ = [
    "atomic_path",
    "fsync_dir",
    "is_stale_temp",
    "npy_bytes",
    "owner_tag",
    "save_npy",
    "temp_name",
    "write_all",
    "write_bytes",
    "write_json",
    "write_text",
]


def write_all(fh: BinaryIO, data: Any) -> None:
    """Write ``data`` (bytes or a buffer) to the open binary file ``fh``.

    The one call every lymphnode file writer goes through, so that a test can make the disk fill
    up in one place (``monkeypatch.setattr(atomic, "write_all", ...)``).
    """
    fh.write(data)


def fsync_dir(path: str | Path) -> None:
    """fsync a directory, so that a rename inside it survives a power cut (a no-op where the OS
    cannot open directories)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except (IsADirectoryError, PermissionError):  # pragma: no cover - Windows
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def owner_tag() -> str:
    """``<host>-<pid>`` of this process (host reduced to letters, digits and dots)."""
    host = re.sub(r"[^A-Za-z0-9.]", "", socket.gethostname()) or "host"
    return f"{host}-{os.getpid()}"


def temp_name(name: str) -> str:
    """The temp file name for target file name ``name``: ``.<name>.tmp-<token>-<host>-<pid>``."""
    return f".{name}.tmp-{secrets.token_hex(4)}-{owner_tag()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def is_stale_temp(name: str, prefix: str, other_hosts: bool = False) -> bool:
    """Whether a temp entry ``<prefix>...-<host>-<pid>`` was left by a process of this machine
    that no longer runs (with ``other_hosts``, also any entry of another machine).

    A name whose last field is not a pid is stale (nothing live writes such names).
    """
    rest, _, pid_text = name[len(prefix) :].rpartition("-")
    if not pid_text.isdigit():
        return True
    host = owner_tag().rpartition("-")[0]
    if not (rest == host or rest.endswith(f"-{host}")):
        return other_hosts  # another machine's: it may still be writing
    pid = int(pid_text)
    return pid != os.getpid() and not _pid_alive(pid)


@contextlib.contextmanager
def atomic_path(path: str | Path, *, tmp: str | Path | None = None) -> Iterator[Path]:
    """Yield a temp path beside ``path``; when the block succeeds, the file (or folder) written
    there replaces ``path`` atomically; when it raises, the temp is removed and ``path`` is
    untouched.

    For writers that need a path (tifffile, PIL, a library's ``save``). ``tmp`` overrides the temp
    path (it must be in ``path``'s folder). The parent folder must exist.
    """
    path = Path(path)
    tmp_path = Path(tmp) if tmp is not None else path.with_name(temp_name(path.name))
    try:
        yield tmp_path
        if tmp_path.is_file():
            with open(tmp_path, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp_path, path)
        fsync_dir(path.parent)
    except BaseException:
        if tmp_path.is_dir() and not tmp_path.is_symlink():
            shutil.rmtree(tmp_path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                tmp_path.unlink()
        raise


def write_bytes(path: str | Path, data: Any, *, tmp: str | Path | None = None) -> None:
    """Replace ``path`` atomically with ``data`` (bytes or a buffer); OSError on failure."""
    with atomic_path(path, tmp=tmp) as temp, open(temp, "wb") as fh:
        write_all(fh, data)
        fh.flush()
        os.fsync(fh.fileno())


def write_text(
    path: str | Path, text: str, *, encoding: str = "utf-8", tmp: str | Path | None = None
) -> None:
    """Replace ``path`` atomically with ``text`` (encoded as ``encoding``)."""
    write_bytes(path, text.encode(encoding), tmp=tmp)


def write_json(
    path: str | Path,
    data: Any,
    *,
    indent: int | None = 2,
    sort_keys: bool = False,
    ensure_ascii: bool = True,
    tmp: str | Path | None = None,
) -> None:
    """Replace ``path`` atomically with ``json.dumps(data, ...)`` and a final newline (UTF-8)."""
    text = json.dumps(data, indent=indent, sort_keys=sort_keys, ensure_ascii=ensure_ascii)
    write_text(path, text + "\n", tmp=tmp)


def npy_bytes(array: np.ndarray) -> memoryview:
    """The bytes ``np.save`` writes for ``array`` (C order, no pickles)."""
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getbuffer()


def save_npy(path: str | Path, array: np.ndarray, *, atomic: bool = True) -> None:
    """``np.save`` of ``array`` to ``path``, fsynced; atomically unless ``atomic=False`` (for files
    inside a temp folder that is itself renamed into place)."""
    if atomic:
        write_bytes(path, npy_bytes(array))
        return
    with open(path, "wb") as fh:
        write_all(fh, npy_bytes(array))
        fh.flush()
        os.fsync(fh.fileno())
