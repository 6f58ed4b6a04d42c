"""The one error boundary and logging setup of every command line entry point.

Every CLI (``python -m lymphnode.<cmd>`` and ``lymphnode <cmd>``) runs its body through
:func:`cli_boundary` (argparse commands) or :func:`hydra_boundary` (Hydra apps), so that all of them
end the same way:

- a :class:`~lymphnode.core.errors.LymphnodeError` (bad input: its message names the file or
  parameter, the value and what was expected), also when Hydra's ``instantiate`` wrapped it in an
  ``InstantiationException``, prints one line ``error: <message>`` on stderr and exits with
  :data:`EXIT_USER_ERROR` (1);
- any other exception is a bug: the full traceback is printed and the exit code is
  :data:`EXIT_BUG` (2);
- inside a Hydra ``--multirun`` sweep the error is re-raised instead, so that Hydra records the
  failed job, runs the sweep's other jobs and exits non-zero at the end (Hydra's own code, 1).

Log records go through tqdm while the command runs, so that INFO lines do not break progress bars,
and the third-party notices that every run printed (:data:`QUIET_WARNINGS`) are filtered once,
here.
Modules whose functions run in worker processes (prepare, synth, the patch cache) import this
module inside their ``main`` only.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from hydra.errors import CompactHydraException

from lymphnode.core.errors import ConfigError, LymphnodeError

EXIT_USER_ERROR = 1  # bad input: a LymphnodeError, one line on stderr
EXIT_BUG = 2  # anything else: the traceback on stderr
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), as a shell reports it

LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"
# Loggers that do not propagate to the root and write to the console themselves (Lightning adds its
# own handler when it is imported before logging is configured).
_OWN_CONSOLE_LOGGERS = (
    "lightning.pytorch",
    "lightning.fabric",
    "pytorch_lightning",
    "lightning_fabric",
)

# Notices that every run printed and that say nothing about the run (issue 8), filtered once here
# for every command: (message regex, category).
QUIET_WARNINGS = (
    # torch 2.13 deprecates building a LeafSpec, which Lightning 2.6's own _pytree still does
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
    # Lightning's model summary cannot size bf16-mixed weights and says it counts 32 bits instead
    (r"Precision .* is not supported by the model summary", UserWarning),
    # a few-label set has fewer batches per epoch than log_every_n_steps; epoch metrics are logged
    (r"The number of training batches \(\d+\) is smaller than the logging interval", UserWarning),
)
# Log lines (start of the message) that are advertisements, not information about the run.
QUIET_LOG_PREFIXES = ("💡 Tip: For seamless cloud logging",)
_RANK_ZERO_LOGGERS = ("pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero",
                      "lightning_fabric.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")  # fmt: skip

T = TypeVar("T")

__all__ = [
    "EXIT_BUG",
    "EXIT_INTERRUPTED",
    "EXIT_USER_ERROR",
    "SweepJobError",
    "cli_boundary",
    "config_dir",
    "configure_logging",
    "hydra_boundary",
    "quiet_third_party",
    "user_error_of",
]


def user_error_of(exc: BaseException) -> LymphnodeError | None:
    """The :class:`LymphnodeError` that ``exc`` is or was raised from (following ``__cause__`` and
    ``__context__``, e.g. through Hydra's ``InstantiationException``); None for a bug."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, LymphnodeError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _print_error(error: LymphnodeError) -> None:
    sys.stderr.write(f"error: {error}\n")
    sys.stderr.flush()


def _exit_code(exc: BaseException) -> int:
    """Print what the user needs for ``exc`` and return the exit code it maps to."""
    if isinstance(exc, KeyboardInterrupt):
        sys.stderr.write("interrupted\n")
        return EXIT_INTERRUPTED
    error = user_error_of(exc)
    if error is not None:
        _print_error(error)
        return EXIT_USER_ERROR
    traceback.print_exception(type(exc), exc, exc.__traceback__)
    sys.stderr.flush()
    return EXIT_BUG


def configure_logging(level: int = logging.INFO) -> None:
    """INFO logging to stderr as ``LEVEL logger: message`` for the argparse commands (Hydra apps get
    theirs from ``hydra/job_logging``); a no-op when the root logger already has a handler."""
    logging.basicConfig(level=level, format=LOG_FORMAT)


class _DropPrefixes(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(QUIET_LOG_PREFIXES)


_DROP_PREFIXES = _DropPrefixes()


def quiet_third_party() -> None:
    """Silence :data:`QUIET_WARNINGS` and :data:`QUIET_LOG_PREFIXES` in this process (idempotent;
    every boundary calls it, so Hydra launcher workers and DDP processes are quiet too)."""
    for message, category in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name in _RANK_ZERO_LOGGERS:
        logger = logging.getLogger(name)
        if _DROP_PREFIXES not in logger.filters:
            logger.addFilter(_DROP_PREFIXES)


@contextlib.contextmanager
def _logs_through_tqdm() -> Iterator[None]:
    """Route every console log handler through ``tqdm.write`` while the command runs, so that a log
    line is printed above a progress bar instead of through it."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    def has_console_handler(logger: logging.Logger) -> bool:
        return any(
            type(h) is logging.StreamHandler and h.stream in (sys.stdout, sys.stderr)
            for h in logger.handlers
        )

    candidates = [logging.getLogger(), *(logging.getLogger(n) for n in _OWN_CONSOLE_LOGGERS)]
    loggers = [lg for lg in candidates if has_console_handler(lg)]
    if not loggers:
        yield
        return
    with logging_redirect_tqdm(loggers=loggers):
        yield


def cli_boundary(main: Callable[..., int]) -> Callable[..., int]:
    """Decorate an argparse ``main(argv) -> exit code``: it logs through tqdm, and an exception
    becomes an exit code (1 with one ``error:`` line for a LymphnodeError, 2 with the traceback for
    a bug) instead of escaping. An argparse usage error (argparse prints the usage and the message
    and exits 2) returns 1 as well: 2 is kept for bugs."""

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> int:
        configure_logging()
        quiet_third_party()
        try:
            with _logs_through_tqdm():
                return main(*args, **kwargs)
        except SystemExit as exc:
            if exc.code == 2:  # argparse: bad usage, already explained on stderr
                return EXIT_USER_ERROR
            raise
        except Exception as exc:
            return _exit_code(exc)
        except KeyboardInterrupt as exc:
            return _exit_code(exc)

    return wrapper


class SweepJobError(CompactHydraException):
    """A job of a Hydra ``--multirun`` sweep failed on bad input. Raised in place of the
    LymphnodeError so that Hydra records the job as failed and, when the sweep ends, reports it in
    one line (a ``CompactHydraException``) instead of a traceback."""


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def hydra_boundary(task: Callable[[Any], T]) -> Callable[[Any], T]:
    """Decorate a Hydra task function (below ``@hydra.main``): it logs through tqdm; a single run
    exits 1 with one ``error:`` line on a LymphnodeError and 2 with the traceback on a bug; a job of
    a ``--multirun`` sweep prints the same and re-raises, so that Hydra runs the other jobs and the
    sweep exits non-zero at the end. The task's return value (the metric a sweeper optimises) is
    passed on."""

    @functools.wraps(task)
    def wrapper(cfg: Any) -> T:
        quiet_third_party()
        try:
            with _logs_through_tqdm():
                return task(cfg)
        except Exception as exc:
            if not _in_multirun():
                sys.exit(_exit_code(exc))
            error = user_error_of(exc)
            if error is None:
                raise  # Hydra prints the traceback at the end of the sweep
            _print_error(error)
            raise SweepJobError(f"{type(error).__name__}: {error}") from exc
        except KeyboardInterrupt as exc:
            sys.exit(_exit_code(exc))

    return wrapper


def config_dir() -> str:
    """The absolute path of the Hydra configs: ``lymphnode/conf`` in an installed wheel (and in a
    checkout, where it links to the top-level ``conf/``), else the checkout's ``conf/`` (a checkout
    without symlinks). Passed as ``config_path`` to every ``@hydra.main``."""
    package = Path(__file__).resolve().parent.parent
    candidates = (package / "conf", package.parent / "conf")
    for candidate in candidates:
        if (candidate / "train.yaml").is_file():
            return str(candidate)
    raise ConfigError(
        f"no lymphnode configs (train.yaml) in {' or '.join(map(str, candidates))}; "
        "reinstall lymphnode (the wheel ships them as lymphnode/conf)"
    )
