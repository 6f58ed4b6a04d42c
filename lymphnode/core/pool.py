"""A process-pool runner: one job per task, results handled in the parent as they come.

What the stages need from a pool, written once: a bounded number of jobs in flight (so that an
error stops the rest quickly), results handed to the parent in completion order (it commits them),
a progress bar that logging does not tear, cancel-on-error (no job starts after a failure; running
ones finish and their results are still handed over, so finished work is kept), one thread per
worker for OpenCV, and workers that exit when the parent dies (Linux). ``workers <= 1`` runs the
jobs in this process, in order.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import TypeVar, cast

from tqdm import tqdm

__all__ = ["mp_context", "run_jobs"]

J = TypeVar("J")
R = TypeVar("R")

_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_END = object()


class _Progress(tqdm):
    """tqdm without its monitor thread, so that worker processes can be forked safely."""

    monitor_interval = 0


def mp_context(start_method: str | None = None) -> multiprocessing.context.BaseContext:
    """The multiprocessing context for ``start_method``; None: ``fork`` on Linux when this process
    runs one thread (workers start in milliseconds and inherit the imports), else ``spawn``
    (threads and fork do not mix; macOS)."""
    if start_method is not None:
        return multiprocessing.get_context(start_method)
    if sys.platform.startswith("linux") and threading.active_count() == 1:
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def _worker_init(threads: int | None, initializer: Callable[..., None] | None, args: tuple) -> None:
    """In each worker: die with the parent (Linux), ``threads`` OpenCV threads (None: inherited
    from a forking parent, which set them), the caller's initializer."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if threads is not None:
        with contextlib.suppress(ImportError):
            import cv2

            cv2.setNumThreads(threads)
    if initializer is not None:
        initializer(*args)


@contextlib.contextmanager
def _parent_cv2_threads(threads: int | None) -> Iterator[None]:
    """OpenCV's thread count set in this process while a forking pool starts workers, then
    restored. A forked child must not reconfigure OpenCV's thread pool itself: the pool's threads
    are not copied by fork, and ``cv2.setNumThreads`` in the child then waits on them forever."""
    if threads is None:
        yield
        return
    try:
        import cv2
    except ImportError:  # pragma: no cover - OpenCV is a dependency
        yield
        return
    before = cv2.getNumThreads()
    cv2.setNumThreads(threads)
    try:
        yield
    finally:
        cv2.setNumThreads(before)


def run_jobs(
    fn: Callable[[J], R],
    jobs: Sequence[J],
    *,
    workers: int,
    on_result: Callable[[J, R], bool | None],
    desc: str,
    unit: str = "job",
    total: int | None = None,
    initial: int = 0,
    progress: bool = True,
    postfix: Callable[[J, R], str] | None = None,
    start_method: str | None = None,
    threads_per_worker: int = 1,
    initializer: Callable[..., None] | None = None,
    initargs: tuple = (),
) -> None:
    """Run ``fn(job)`` for every job; call ``on_result(job, result)`` in this process for each.

    ``on_result`` returning ``False`` stops: no further job is started, running ones finish and
    are handed over. An exception raised by ``fn`` (in a worker) or by ``on_result`` does the
    same, then is re-raised here. The bar counts ``total`` (default ``len(jobs)``) from
    ``initial`` (jobs done before). ``workers <= 1`` or a single job runs in this process, without
    a pool; otherwise ``min(workers, len(jobs))`` processes of ``start_method`` (see
    :func:`mp_context`), each with ``threads_per_worker`` OpenCV threads, at most ``2 * workers``
    jobs in flight.
    """
    if not jobs:
        return
    from tqdm.contrib.logging import logging_redirect_tqdm

    count = len(jobs) + initial if total is None else total
    with (
        logging_redirect_tqdm(),
        _Progress(total=count, initial=initial, unit=unit, desc=desc, disable=not progress) as bar,
    ):

        def hand_over(job: J, result: R) -> bool:
            keep_going = on_result(job, result) is not False
            bar.update(1)
            if postfix is not None:
                bar.set_postfix_str(postfix(job, result), refresh=False)
            return keep_going

        if workers <= 1 or len(jobs) == 1:
            for job in jobs:
                if not hand_over(job, fn(job)):
                    break
            return

        n = min(workers, len(jobs))
        error: BaseException | None = None
        stop = False
        context = mp_context(start_method)
        forked = context.get_start_method() == "fork"
        with (
            _parent_cv2_threads(threads_per_worker if forked else None),
            ProcessPoolExecutor(
                max_workers=n,
                mp_context=context,
                initializer=_worker_init,
                initargs=(None if forked else threads_per_worker, initializer, initargs),
            ) as pool,
        ):
            pending: dict[Future[R], J] = {}
            queue: Iterator[J] = iter(jobs)
            window = 2 * n  # jobs in flight: bounded, so that an error stops the rest quickly
            while True:
                while not stop and len(pending) < window:
                    item = next(queue, _END)
                    if item is _END:
                        break
                    next_job = cast("J", item)
                    pending[pool.submit(fn, next_job)] = next_job
                if not pending:
                    break
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    job = pending.pop(future)
                    try:
                        if not hand_over(job, future.result()):
                            stop = True
                    except BaseException as exc:  # a worker's error, or on_result's
                        stop = True
                        if error is None:
                            error = exc
        if error is not None:
            raise error
