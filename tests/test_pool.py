"""Tests of lymphnode.core.pool: results in the parent, cancel on error, finished work kept."""

from __future__ import annotations

import os
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


def test_on_result_returning_false_stops_starting_jobs() -> None:
    got: list[int] = []

    def record(job: int, result: tuple[int, int]) -> bool:
        got.append(job)
        return job != 1

    run_jobs(square_and_pid, list(range(30)), workers=2, on_result=record, desc="t", progress=False)
    assert 1 in got and len(got) <= 1 + 2 * 2 + 1  # the failure, then only what was in flight
