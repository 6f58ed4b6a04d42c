"""Tests of lymphnode.core.pool: results in the parent, cancel on error, finished work kept."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lymphnode.core.pool import run_jobs


def square_and_pid(k: int) -> tuple[int, int]:
    return k * k, os.getpid()


def fail_on_three(k: int) -> int:
    if k == 3:
        raise ValueError(f"job {k} failed")
    time.sleep(0.05 if k > 3 else 0)
    return k


@pytest.mark.parametrize("workers", [0, 2])
def test_every_result_reaches_the_parent(workers: int) -> None:
    got: dict[int, tuple[int, int]] = {}
    run_jobs(
        square_and_pid,
        list(range(6)),
        workers=workers,
        on_result=lambda job, result: got.__setitem__(job, result),
        desc="t",
        progress=False,
    )
    assert {k: v[0] for k, v in got.items()} == {k: k * k for k in range(6)}
    pids = {v[1] for v in got.values()}
    assert (pids == {os.getpid()}) == (workers == 0)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_failing_job_stops_new_ones_and_is_re_raised_after_finished_ones(workers: int) -> None:
    got: list[int] = []
    with pytest.raises(ValueError, match="job 3 failed"):
        run_jobs(
            fail_on_three,
            list(range(40)),
            workers=workers,
            on_result=lambda job, result: got.append(result),
            desc="t",
            progress=False,
        )
    assert {0, 1, 2} <= set(got) and 3 not in got
    assert len(got) < 39  # jobs after the failure were not started (at most the window ran)


def slow_but_first(k: int) -> int:
    time.sleep(0 if k == 0 else 0.1)
    return k


def test_on_result_returning_false_stops_starting_jobs() -> None:
    got: list[int] = []

    def record(job: int, result: int) -> bool:
        got.append(job)
        return job != 0

    run_jobs(slow_but_first, list(range(30)), workers=2, on_result=record, desc="t", progress=False)
    after_stop = len(got) - (got.index(0) + 1)
    assert after_stop <= 2 * 2 - 1  # only the jobs already in flight (window 2 x workers) finish
    assert len(got) < 30


FORK_AFTER_OPENCV = """
import sys, cv2, numpy as np
from lymphnode.core.pool import run_jobs
image = np.random.default_rng(0).random((3000, 3000), dtype=np.float32)
cv2.GaussianBlur(image, (0, 0), 5)  # the parent's OpenCV thread pool is up and used
before = cv2.getNumThreads()

def blur(k):
    cv2.GaussianBlur(image, (0, 0), 5)
    return cv2.getNumThreads()

got = []
run_jobs(blur, [0, 1, 2], workers=2, on_result=lambda j, r: got.append(r), desc="t",
         progress=False, start_method="fork")
print("threads", sorted(got), "parent", cv2.getNumThreads() == before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork start method: Linux")
def test_forked_workers_get_one_opencv_thread_from_the_parent_which_is_restored() -> None:
    # The parent sets the count before forking: a child that reconfigures OpenCV's inherited
    # thread pool itself can hang (racy, seen in the full suite), so this runs in a subprocess
    # with a timeout.
    result = subprocess.run(
        [sys.executable, "-c", FORK_AFTER_OPENCV], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "threads [1, 1, 1] parent True" in result.stdout


PARENT = """
import os, sys, time
from pathlib import Path
from lymphnode.core.pool import run_jobs

def job(i):
    (Path(sys.argv[1]) / f"worker-{os.getpid()}").touch()
    time.sleep(120)
    return i

if __name__ == "__main__":
    run_jobs(job, list(range(4)), workers=2, on_result=lambda j, r: None, desc="t",
             progress=False, start_method=sys.argv[2])
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie has exited
        return stat.read().split(")")[-1].split()[0] != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_workers_exit_when_the_parent_is_killed(tmp_path: Path, start_method: str) -> None:
    """kill -9 of prepare's parent process must not leave its pool workers blocked forever."""
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    parent = subprocess.Popen([sys.executable, str(script), str(tmp_path), start_method], env=env)
    try:
        deadline = time.monotonic() + 60
        while len(list(tmp_path.glob("worker-*"))) < 2:
            assert time.monotonic() < deadline, "the workers did not start"
            assert parent.poll() is None, "the parent exited early"
            time.sleep(0.1)
        workers = [int(p.name.split("-")[1]) for p in tmp_path.glob("worker-*")]
        assert all(_alive(pid) for pid in workers)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in workers if _alive(pid)], "workers outlived their parent"
    finally:
        parent.kill()
        for p in tmp_path.glob("worker-*"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(p.name.split("-")[1]), signal.SIGKILL)
