"""The runs of a sweep, read from their ``results.json`` files (and the folders that lack one).

A fine-tuning run's ``results.json`` (written by ``lymphnode.train``) holds ``status``
(``completed`` | ``failed`` | ``interrupted``; anything else counts as failed), ``init``
(``pretrained`` | ``scratch``), ``pretext`` (the pretrained runs' pretext task; absent in older
files: ``reconstruction``), ``labeled_size``, ``fold``, ``seed``, the test metrics of the
selected checkpoint (``metrics``) and of the last one (``metrics_last``), keyed
``test/seg_{precision,recall,f1}`` as fractions. Newer files also hold, and older ones may lack:

- ``selection``: ``val_f1`` | ``val_loss`` | ``last``, which checkpoint ``metrics`` are from;
- ``steps``: ``{"selected": int | null, "last": int | null}``, the optimizer step of each checkpoint;
- ``collapsed``: true when the selected checkpoint predicts no tumour (test recall 0); derived from
  the metrics when absent;
- ``metrics["test/baseline_all_tumour_f1"]``: F1 of predicting tumour on every test pixel.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lymphnode.core.errors import LymphnodeError
from lymphnode.core.records import read_record

#: Inits in column order: the paper puts "without pretraining" first.
INITS: tuple[str, ...] = ("scratch", "pretrained")
#: The pretext whose runs are the arm ``pretrained`` (the paper's); another pretext's runs are the
#: arm ``pretrained-<pretext>``.
PAPER_PRETEXT = "reconstruction"


def arm_of(init: str | None, pretext: str | None) -> str | None:
    """The table's arm of a run: ``scratch``, ``pretrained`` (reconstruction, or a file that names
    no pretext) or ``pretrained-<pretext>``; None for anything but a fine-tuning init."""
    if init not in INITS:
        return None
    if init == "scratch" or pretext in (None, PAPER_PRETEXT):
        return init
    return f"{init}-{pretext}"


def arm_order(arms: Sequence[str]) -> list[str]:
    """scratch, pretrained (reconstruction), then the other pretexts' arms by name."""
    rest = sorted(a for a in set(arms) if a not in INITS)
    return [a for a in INITS if a in arms] + rest


#: The metrics of the paper's Figure 3, in column order.
METRICS: tuple[str, ...] = ("precision", "recall", "f1")
#: Checkpoints a report can read: the selected one (``metrics``) or the last (``metrics_last``).
#: ``best``: the run's selected checkpoint (``metrics``); ``last``: the final step
#: (``metrics_last``); a selection name: that entry of ``metrics_by_selection`` (runs trained with
#: ``compare_selections``), so one sweep compares checkpoint selections.
CHECKPOINTS: tuple[str, ...] = ("best", "last", "val_f1", "val_loss")
#: The all-tumour baseline's key in a run's metrics.
BASELINE_KEY = "test/baseline_all_tumour_f1"


class ReportError(LymphnodeError):
    """The sweep folders hold nothing that can be reported."""


@dataclass(frozen=True)
class Run:
    """One fine-tuning run as read from its folder.

    ``metrics`` holds the test metrics as fractions (0..1) keyed ``precision``, ``recall``, ``f1``;
    empty when the run failed, was interrupted or never finished. ``selection`` is the checkpoint
    the metrics are from (None when the file does not say), ``steps_selected`` / ``steps_last`` the
    optimizer steps of the selected and the last checkpoint, ``collapsed`` whether the reported
    checkpoint predicted no tumour at all, ``baseline_f1`` the all-tumour baseline's test F1.
    """

    name: str
    init: str | None  # the arm (arm_of): scratch | pretrained | pretrained-<pretext>
    labeled_size: int | None
    fold: int | None
    seed: int | None
    status: str  # "completed" | "failed" | "interrupted" | "missing"
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    selection: str | None = None
    steps_selected: int | None = None
    steps_last: int | None = None
    collapsed: bool = False
    baseline_f1: float | None = None


def _metric_block(result: dict, checkpoint: str) -> dict:
    if checkpoint not in ("best", "last"):
        if result.get("selection") == checkpoint:  # the run's own selection
            return result.get("metrics") or {}
        entry = (result.get("metrics_by_selection") or {}).get(checkpoint)
        if not isinstance(entry, dict):
            raise ReportError(
                f"results.json has no metrics_by_selection[{checkpoint!r}] (checkpoint="
                f"{checkpoint!r} asked; train with compare_selections=[{checkpoint}])"
            )
        return entry.get("metrics") or {}
    key = "metrics" if checkpoint == "best" else "metrics_last"
    block = result.get(key)
    if block is None and checkpoint == "last":
        raise ReportError("results.json has no 'metrics_last' block (checkpoint='last' asked)")
    return block or {}


def _run_name(path: Path, root: Path) -> str:
    return str(path.parent.relative_to(root)) if path.is_relative_to(root) else str(path.parent)


def _finite_or_none(value: object) -> float | None:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _read_result(path: Path, root: Path, checkpoint: str) -> Run | None:
    """One ``results.json`` as a :class:`Run`; None for runs that are not fine-tuning runs."""
    try:
        result = read_record(path, what="results.json", error=ReportError)
        if result is None:  # removed since it was listed
            raise ReportError(f"{path} does not exist")
    except ReportError as exc:
        init, size, fold, seed = _identity_of(path.parent)
        if init is not None and init not in INITS:
            return None  # a corrupt pretraining record: not part of the table either
        return Run(
            name=_run_name(path, root), init=init, labeled_size=size, fold=fold, seed=seed,
            status="failed",
            error=f"unreadable results.json ({exc}); the file is corrupt: train the run again "
            "(skip_if_done trains it again)",
        )  # fmt: skip
    init = arm_of(result.get("init"), result.get("pretext"))
    if init is None:  # the pretraining run, or something else: not part of the table
        return None
    status = result.get("status", "failed")
    if status not in ("completed", "failed", "interrupted"):
        status = "failed"  # e.g. "debug" (fast_dev_run): neither averaged nor silently dropped
    metrics: dict[str, float] = {}
    error = result.get("error")
    collapsed = False
    if status == "completed":
        block = _metric_block(result, checkpoint)
        for metric in METRICS:
            value = _finite_or_none(block.get(f"test/seg_{metric}"))
            if value is None:
                status, error = "failed", f"test/seg_{metric} missing or not finite in {path}"
                metrics = {}
                break
            metrics[metric] = value
        if metrics:
            recorded = result.get("collapsed")
            if checkpoint == "best" and isinstance(recorded, bool):
                collapsed = recorded
            else:  # older files, or the last checkpoint (the flag is about the selected one)
                collapsed = metrics["recall"] == 0.0
    raw_steps = result.get("steps")
    steps: dict = raw_steps if isinstance(raw_steps, dict) else {}
    baseline = (result.get("metrics") or {}).get(BASELINE_KEY)
    if baseline is None:
        baseline = (result.get("metrics_last") or {}).get(BASELINE_KEY)
    return Run(
        name=_run_name(path, root),
        init=init,
        labeled_size=_int_or_none(result.get("labeled_size")),
        fold=_int_or_none(result.get("fold")),
        seed=_int_or_none(result.get("seed")),
        status=status,
        metrics=metrics,
        error=error,
        selection=result.get("selection") if checkpoint == "best" else checkpoint,
        steps_selected=_int_or_none(steps.get("selected")),
        steps_last=_int_or_none(steps.get("last")),
        collapsed=collapsed,
        baseline_f1=_finite_or_none(baseline) if status == "completed" else None,
    )


_RUN_PATH = re.compile(
    r"(?:^|/)(?P<init>[^/]+)/size(?P<size>\d+)/fold(?P<fold>\d+)/seed(?P<seed>\d+)$"
)


def _identity_of(run_dir: Path) -> tuple[str | None, int | None, int | None, int | None]:
    """(init, labeled_size, fold, seed) of a run folder whose results.json is corrupt: from the
    config Hydra saved beside it (``.hydra/config.yaml``), else from the run name
    ``<init>/size<N>/fold<K>/seed<S>``; Nones when neither tells. So that the run is counted
    once, as failed, and not also as missing from the grid."""
    config = run_dir / ".hydra" / "config.yaml"
    if config.is_file():
        try:
            from omegaconf import OmegaConf

            cfg = OmegaConf.load(config)

            def pick(key: str) -> object:
                return OmegaConf.select(cfg, key, default=None)

            init = "pretrain" if pick("stage") == "pretrain" else pick("init")
            return (
                None if init is None else str(init),
                _int_or_none(pick("data.labeled_size")),
                _int_or_none(pick("data.fold")),
                _int_or_none(pick("seed")),
            )
        except Exception:  # an unreadable saved config: fall back to the folder's name
            pass
    match = _RUN_PATH.search(run_dir.as_posix())
    if match is None:
        return None, None, None, None
    return match["init"], int(match["size"]), int(match["fold"]), int(match["seed"])


def _int_or_none(value: object) -> int | None:
    return None if value is None else int(value)  # type: ignore[call-overload]


def _orphan_run(run_dir: Path, root: Path) -> Run:
    """A Hydra run folder (``.hydra/`` present) that never wrote results.json: a killed run."""
    overrides: dict[str, str] = {}
    overrides_file = run_dir / ".hydra" / "overrides.yaml"
    if overrides_file.is_file():
        for line in overrides_file.read_text().splitlines():
            item = line.strip().lstrip("-").strip().strip("'\"")
            if "=" in item:
                key, value = item.split("=", 1)
                overrides[key.lstrip("+~")] = value

    def pick(*keys: str) -> int | None:
        for key in keys:
            if key in overrides:
                try:
                    return int(overrides[key])
                except ValueError:
                    return None
        return None

    init = arm_of(overrides.get("init"), overrides.get("pretext"))
    return Run(
        name=str(run_dir.relative_to(root)) if run_dir.is_relative_to(root) else str(run_dir),
        init=init,
        labeled_size=pick("data.labeled_size"),
        fold=pick("data.fold"),
        seed=pick("seed"),
        status="missing",
        error="no results.json (the run was killed or never finished)",
    )


def collect_runs(dirs: Sequence[str | Path], checkpoint: str = "best") -> list[Run]:
    """Every fine-tuning run below ``dirs``, completed, failed or left without results.json."""
    if checkpoint not in CHECKPOINTS:
        raise ReportError(f"checkpoint={checkpoint!r} is not one of {', '.join(CHECKPOINTS)}")
    runs: list[Run] = []
    for d in dirs:
        root = Path(d)
        if not root.is_dir():
            raise ReportError(f"sweep folder {root} does not exist (expected a folder of runs)")
        results = sorted(root.rglob("results.json"))
        done_dirs = {p.parent for p in results}
        for path in results:
            run = _read_result(path, root, checkpoint)
            if run is not None:
                runs.append(run)
        for hydra_dir in sorted(root.rglob(".hydra")):
            run_dir = hydra_dir.parent
            if run_dir not in done_dirs and (hydra_dir / "config.yaml").is_file():
                runs.append(_orphan_run(run_dir, root))
    return runs


def expected_missing(runs: list[Run]) -> list[Run]:
    """Grid points (size × fold × init × seed seen anywhere) that no run folder accounts for."""
    known = [r for r in runs if r.labeled_size is not None and r.fold is not None and r.init]
    sizes = sorted({r.labeled_size for r in known})  # type: ignore[type-var]
    folds = sorted({r.fold for r in known})  # type: ignore[type-var]
    seeds = sorted({r.seed for r in known}, key=lambda s: -1 if s is None else s)
    inits = arm_order([r.init for r in known if r.init])
    present = {(r.labeled_size, r.fold, r.init, r.seed) for r in known}
    out = []
    for size in sizes:
        for fold in folds:
            for init in inits:
                for seed in seeds:
                    if (size, fold, init, seed) not in present:
                        out.append(
                            Run(
                                name=f"{init}/size{size}/fold{fold}/seed{seed}",  # run_arm's folder
                                init=init,
                                labeled_size=size,
                                fold=fold,
                                seed=seed,
                                status="missing",
                                error="expected by the grid, no run folder found",
                            )
                        )
    return out
