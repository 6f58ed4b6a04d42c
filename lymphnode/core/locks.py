"""One process at a time per run folder: an advisory ``flock`` on ``<run_dir>/.lock``.

Two jobs of a sweep can point at the same run folder — the scratch runs of a table sweep over
several pretexts (scratch is shared by every pretext), a resubmitted cluster job whose first
attempt still runs, two users' sweeps into one ``paths.root``. Without a lock both would train
into the same checkpoints and results.json. With it, the second waits until the first is done,
then finds its results.json (``skip_if_done`` skips a completed run) or trains it again.

The lock is the kernel's (``fcntl.flock``): it is released when its holder exits, however it exits
(kill -9 included), so a crashed job never leaves a stale lock; the file itself stays (empty of
meaning once unlocked). It holds the holder's host and pid for the waiting job's message.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lymphnode.core.errors import LymphnodeError

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
POLL_S = 0.5  # how often a waiting process retries


class RunLockTimeout(LymphnodeError):
    """Another process held a run folder's lock for longer than the caller would wait."""


def _holder(path: Path) -> str:
    """``host:pid`` written by the current holder (``unknown`` when unreadable)."""
    try:
        return path.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


@contextmanager
def run_lock(run_dir: Path, timeout_s: float | None = None) -> Iterator[Path]:
    """Hold the exclusive lock of ``run_dir`` (created if missing) for the ``with`` body.

    Waits while another process holds it, logging once who (host:pid); ``timeout_s`` None waits
    as long as it takes, else :class:`RunLockTimeout` after that many seconds. Yields the lock
    file's path.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        start = time.monotonic()
        waited = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waited:
                    log.info(
                        "%s is being trained by another process (%s); waiting for it",
                        run_dir,
                        _holder(path),
                    )
                    waited = True
                if timeout_s is not None and time.monotonic() - start >= timeout_s:
                    raise RunLockTimeout(
                        f"{run_dir}: locked by another process ({_holder(path)}) for more than "
                        f"{timeout_s:g} s; wait for it to finish or stop it"
                    ) from None
                time.sleep(POLL_S)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{socket.gethostname()}:{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock


__all__ = ["LOCK_FILE", "RunLockTimeout", "run_lock"]
