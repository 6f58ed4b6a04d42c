"""Tests of lymphnode.core.pool: results in the parent, cancel on error, finished work kept."""

from __future__ import annotations

import os
import subprocess
import sys
import time

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
