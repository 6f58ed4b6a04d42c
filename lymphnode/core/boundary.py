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
  failed job, runs the sweep's other jobs and exits non-zero at the end (Hydra's own code, 1);
- a run stopped by a signal (:class:`RunInterrupted`: SIGTERM from a cluster's time limit, Ctrl-C)
  prints one ``interrupted:`` line and exits ``128 + signal`` (143 for SIGTERM, 130 for SIGINT), as
  a shell reports a process the signal killed, in a sweep too: the signal was meant for the whole
  process.

Log records go through tqdm while the command runs, so that INFO lines do not break progress bars,
and the third-party notices that every run printed (:data:`QUIET_WARNINGS`) are filtered once,
here.
Modules whose functions run in worker processes (prepare, synth, the patch cache) import this
module inside their ``main`` only.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import logging
import shutil
import signal
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from hydra.errors import CompactHydraException

from lymphnode.core.errors import ConfigError, LymphnodeError
from lymphnode.core.locks import LOCK_FILE

EXIT_USER_ERROR = 1  # bad input: a LymphnodeError, one line on stderr
EXIT_BUG = 2  # anything else: the traceback on stderr
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), as a shell reports it
EXIT_TERMINATED = 143  # SIGTERM (128 + 15): a cluster's time limit or preemption stopped the run

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

#: Config sections whose entries the user names (a ``+`` key below them is a new entry, not a
#: typo): callbacks and loggers by name, the Trainer's keyword arguments (any Lightning Trainer
#: argument), and Hydra's own settings.
OPEN_SECTIONS = ("callbacks", "logger", "trainer", "hydra")

__all__ = [
    "EXIT_BUG",
    "EXIT_INTERRUPTED",
    "EXIT_TERMINATED",
    "EXIT_USER_ERROR",
    "RunInterrupted",
    "SweepJobError",
    "check_added_keys",
    "cli_boundary",
    "config_dir",
    "configure_logging",
    "hydra_boundary",
    "quiet_third_party",
    "user_error_of",
]


class RunInterrupted(Exception):
    """A run that a signal stopped after it recorded where it stopped: neither bad input nor a
    bug. The boundary prints the message and exits ``128 + signum``."""

    def __init__(self, message: str, signum: int = signal.SIGTERM) -> None:
        super().__init__(message)
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        """``128 + signum`` (143 for SIGTERM, 130 for SIGINT)."""
        return 128 + self.signum


def _exit_interrupted(exc: RunInterrupted) -> None:
    sys.stderr.write(f"interrupted: {exc}\n")
    sys.stderr.flush()
    sys.exit(exc.exit_code)


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
        except RunInterrupted as exc:
            sys.stderr.write(f"interrupted: {exc}\n")
            return exc.exit_code
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


def _flat_keys(node: Any, prefix: str = "") -> list[str]:
    """Dotted keys of every mapping entry below ``node`` (plain containers; lists are leaves)."""
    keys: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            dotted = f"{prefix}.{key}" if prefix else str(key)
            keys.append(dotted)
            keys += _flat_keys(value, dotted)
    return keys


def closest_keys(key: str, known: list[str], n: int = 3) -> list[str]:
    """The keys of ``known`` closest to ``key`` (difflib), compared whole and by their last
    component, so that ``paterh_size`` finds ``data.patch_size`` as well as ``patch_size``."""
    leaf = key.rsplit(".", 1)[-1]
    by_leaf: dict[str, list[str]] = {}
    for k in known:
        by_leaf.setdefault(k.rsplit(".", 1)[-1], []).append(k)
    out: list[str] = []

    def similarity(k: str) -> float:
        return difflib.SequenceMatcher(None, key, k).ratio()

    for name in difflib.get_close_matches(leaf, list(by_leaf), n=n, cutoff=0.6):
        out += sorted((k for k in by_leaf[name] if k not in out), key=similarity, reverse=True)
    out += [k for k in difflib.get_close_matches(key, known, n=n, cutoff=0.6) if k not in out]
    return out[:n]


def check_added_keys(
    cfg: Any, overrides: list[str], config_name: str, groups_dir: str | Path
) -> None:
    """ConfigError for a ``+key=value`` override that adds a key the composed config does not
    otherwise have (a typo such as ``+paterh_size=64``: Hydra would accept it silently), naming
    the closest known keys.

    Allowed: ``+group=option`` for a config group of ``groups_dir`` (``+experiment=``,
    ``+hydra/launcher=``...), keys below :data:`OPEN_SECTIONS` that the config has (``+callbacks.
    recorder._target_=...``, ``+trainer.max_time=...``), and ``++key=value`` (add-or-set, on
    purpose). ``cfg`` is the composed config, ``overrides`` Hydra's task overrides.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType
    from omegaconf import OmegaConf

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    added = [o for o in parsed if o.type == OverrideType.ADD and o.package is None]
    if not added:
        return
    container = OmegaConf.to_container(cfg, resolve=False) if OmegaConf.is_config(cfg) else cfg
    root = container if isinstance(container, dict) else {}
    added_keys = {o.key_or_group for o in added}
    for override in added:
        key = override.key_or_group
        if (Path(groups_dir) / key).is_dir() or key.split("/")[0] == "hydra":
            continue  # a config group (Hydra checks the option)
        first = key.split(".")[0]
        section = root.get(first)
        own = isinstance(section, dict) and any(
            f"{first}.{k}" not in added_keys for k in section
        )  # the section is the config's, not made by the `+` keys alone
        if first in OPEN_SECTIONS and "." in key and (own or first == "hydra"):
            continue
        known = [k for k in _flat_keys(root) if k not in added_keys and not any(
            k.startswith(f"{a}.") for a in added_keys
        )]  # fmt: skip
        near = closest_keys(key, known)
        hint = f"did you mean {' or '.join(repr(k) for k in near)}?" if near else (
            "no key of the config is close to it"
        )  # fmt: skip
        open_here = [s for s in OPEN_SECTIONS if isinstance(root.get(s), dict) or s == "hydra"]
        raise ConfigError(
            f"+{key}={override.get_value_element_as_str()} adds the key {key!r}, which the "
            f"{config_name} config does not have; {hint} (`+` adds a key; set an existing one "
            f"without `+`; new keys are accepted below {', '.join(open_here)})"
        )


def _check_hydra_overrides(cfg: Any) -> None:
    """:func:`check_added_keys` for the running Hydra app (nothing outside a Hydra app)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    check_added_keys(
        cfg, list(hydra_cfg.overrides.task), str(hydra_cfg.job.config_name), config_dir()
    )


def _discard_unstarted_output_dir() -> None:
    """Remove the Hydra output (run) directory of a job refused before it wrote anything: it holds
    only Hydra's own ``<output_subdir>/`` (config.yaml, hydra.yaml, overrides.yaml), the job's
    ``*.log`` and train's run lock (:mod:`lymphnode.core.locks`). A directory with anything else (results.json, checkpoints, the user's files), the
    working directory, or a job without an output subdir is left alone. Parents left empty are
    removed too, up to Hydra's sweep dir when the run dir lies below it (train: the runs dir)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    subdir = hydra_cfg.output_subdir
    out = Path(str(hydra_cfg.runtime.output_dir))
    if subdir is None or not out.is_dir() or out.resolve() == Path.cwd().resolve():
        return
    own_files = {"config.yaml", "hydra.yaml", "overrides.yaml"}
    for entry in out.iterdir():
        if entry.name == str(subdir) and entry.is_dir():
            if any(f.name not in own_files or not f.is_file() for f in entry.iterdir()):
                return
        elif not (entry.is_file() and (entry.suffix == ".log" or entry.name == LOCK_FILE)):
            return
    shutil.rmtree(out, ignore_errors=True)
    try:
        top = Path(str(hydra_cfg.sweep.dir)).resolve()
    except Exception:  # an unresolvable sweep dir: keep the parents
        return
    parent = out.resolve().parent
    while parent != top and parent.is_relative_to(top) and parent != Path.cwd().resolve():
        try:
            parent.rmdir()  # only when empty
        except OSError:
            break
        parent = parent.parent


def hydra_boundary(task: Callable[[Any], T]) -> Callable[[Any], T]:
    """Decorate a Hydra task function (below ``@hydra.main``): it logs through tqdm; a single run
    exits 1 with one ``error:`` line on a LymphnodeError and 2 with the traceback on a bug; a job of
    a ``--multirun`` sweep prints the same and re-raises, so that Hydra runs the other jobs and the
    sweep exits non-zero at the end; a :class:`RunInterrupted` exits ``128 + signal`` at once (143:
    SIGTERM). The task's return value (the metric a sweeper optimises) is passed on. Before the task, ``+key`` overrides that add unknown keys are refused
    (:func:`check_added_keys`); a job refused on bad input before it wrote anything leaves no
    run directory behind (:func:`_discard_unstarted_output_dir`)."""

    @functools.wraps(task)
    def wrapper(cfg: Any) -> T:
        quiet_third_party()
        try:
            with _logs_through_tqdm():
                _check_hydra_overrides(cfg)
                return task(cfg)
        except RunInterrupted as exc:  # a signal: the whole process stops, sweep or not
            _exit_interrupted(exc)
            raise  # unreachable (sys.exit raised)
        except Exception as exc:
            if user_error_of(exc) is not None:
                _discard_unstarted_output_dir()
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
