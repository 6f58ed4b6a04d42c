"""The run-folder lock (lymphnode.core.locks): one process per run dir, released however its
holder exits, so a second job waits and a killed one never leaves a stale lock."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from tiny_runs import run, write_caches

from lymphnode.core.locks import LOCK_FILE, RunLockTimeout, run_lock

HOLD = """
import sys, time
from pathlib import Path
from lymphnode.core.locks import run_lock
with run_lock(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(60)
"""


def hold_in_child(run_dir: Path) -> subprocess.Popen[str]:
    """A child process that holds ``run_dir``'s lock until killed."""
    child = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert child.stdout is not None and child.stdout.readline().strip() == "held"
    return child


def test_a_second_process_waits_and_the_lock_dies_with_its_holder(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "scratch" / "size40" / "fold0" / "seed0"
    child = hold_in_child(run_dir)
    try:
        assert (run_dir / LOCK_FILE).read_text().strip() == f"{socket.gethostname()}:{child.pid}"
        start = time.monotonic()
        with (
            pytest.raises(RunLockTimeout, match=f"{child.pid}.*more than 0.6 s"),
            run_lock(run_dir, timeout_s=0.6),
        ):
            pass
        assert time.monotonic() - start >= 0.6  # it waited
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    # kill -9 released it: no stale lock
    with run_lock(run_dir, timeout_s=2) as path:
        assert path.read_text().strip() == f"{socket.gethostname()}:{os.getpid()}"


def test_the_lock_is_reentrant_across_sequential_uses(tmp_path: Path) -> None:
    for _ in range(3):
        with run_lock(tmp_path, timeout_s=0):
            pass
    with (
        run_lock(tmp_path, timeout_s=0),
        pytest.raises(RunLockTimeout),  # a second holder, even in the same process
        run_lock(tmp_path, timeout_s=0),
    ):
        pass


def test_train_waits_for_the_process_holding_its_run_dir_then_skips_it(tmp_path: Path) -> None:
    """Two jobs aimed at one run folder (e.g. a table sweep's scratch runs, shared by every
    pretext): the second waits for the first's lock, then finds the run completed and skips it."""
    caches = write_caches(tmp_path / "caches")
    steps = ("trainer.max_steps=2", "trainer.max_epochs=-1", "trainer.val_check_interval=2")
    outcome, first = run(tmp_path, caches, *steps)
    assert not isinstance(outcome, BaseException), first["error"]
    run_dir = Path(first["config"]["run_dir"])
    written = (run_dir / "results.json").read_bytes()
    child = hold_in_child(run_dir)
    killer = threading.Timer(1.5, child.send_signal, args=(signal.SIGKILL,))
    killer.start()
    start = time.monotonic()
    try:
        outcome, second = run(tmp_path, caches, *steps)
    finally:
        killer.cancel()
        child.kill()
        child.wait()
    assert time.monotonic() - start >= 1.5  # it waited for the holder
    assert not isinstance(outcome, BaseException)
    assert (run_dir / "results.json").read_bytes() == written  # skipped: not trained again
    assert second == first
