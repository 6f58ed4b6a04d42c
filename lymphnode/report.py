"""The paper's results table from a sweep's ``results.json`` files — no network needed.

``python -m lymphnode.report <sweep dir>... [--out DIR] [--paper] [--checkpoint best|last] [--wandb]``

Reads every run's ``results.json`` below the given folders, groups the fine-tuning runs by labeled
size and init (pretrained / scratch), and writes into ``--out``:

- ``table.md`` and ``table.csv``: rows = labeled size; precision, recall and F1 (percent) without and
  with pretraining as mean ± sample std over folds with n, plus the paired difference
  (pretrained − scratch, over the folds both inits completed) with a paired t-test p-value;
- ``f1_vs_labels.png``: F1 and recall vs labeled size for both inits with std error bars.

Runs that failed, and runs that the grid expects but that never wrote a ``results.json`` (a killed
sweep, a run directory left without results), are listed by name under the table and never averaged.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import os
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lymphnode.core.errors import LymphnodeError

log = logging.getLogger(__name__)

#: The metrics of the paper's Figure 3, in column order.
METRICS: tuple[str, ...] = ("precision", "recall", "f1")
#: Inits in column order: the paper puts "without pretraining" first.
INITS: tuple[str, ...] = ("scratch", "pretrained")
INIT_TITLES = {"scratch": "Without pretraining", "pretrained": "With pretraining"}

#: The paper's published Figure 3 (percent), for ``--paper``: size -> init -> metric -> value.
PAPER_TABLE: dict[int, dict[str, dict[str, float]]] = {
    200: {
        "scratch": {"precision": 57.71, "recall": 88.76, "f1": 69.94},
        "pretrained": {"precision": 59.37, "recall": 89.83, "f1": 71.49},
    },
    120: {
        "scratch": {"precision": 54.65, "recall": 81.0, "f1": 65.26},
        "pretrained": {"precision": 55.35, "recall": 84.79, "f1": 66.981},
    },
    80: {
        "scratch": {"precision": 49.87, "recall": 85.63, "f1": 63.18},
        "pretrained": {"precision": 56.56, "recall": 87.22, "f1": 68.62},
    },
    40: {
        "scratch": {"precision": 41.12, "recall": 76.8, "f1": 53.58},
        "pretrained": {"precision": 46.71, "recall": 77.06, "f1": 58.16},
    },
}


class ReportError(LymphnodeError):
    """The sweep folders hold nothing that can be reported."""


@dataclass(frozen=True)
class Run:
    """One fine-tuning run as read from its folder.

    ``metrics`` holds the test metrics as fractions (0..1) keyed ``precision``, ``recall``, ``f1``;
    empty when the run failed or never finished.
    """

    name: str
    init: str | None
    labeled_size: int | None
    fold: int | None
    seed: int | None
    status: str  # "completed" | "failed" | "missing"
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None


@dataclass(frozen=True)
class Cell:
    """Mean, sample std and count of one metric over folds (fractions 0..1)."""

    mean: float
    std: float
    n: int


@dataclass(frozen=True)
class Paired:
    """Pretrained − scratch over the folds both completed: mean/std of the difference, t-test p."""

    mean: float
    std: float
    n: int
    p_value: float | None


@dataclass
class Report:
    """Everything the table shows: cells by (size, init, metric), paired F1 differences, problems."""

    sizes: list[int]
    cells: dict[tuple[int, str, str], Cell]
    paired: dict[tuple[int, str], Paired]
    failed: list[Run]
    missing: list[Run]
    checkpoint: str
    n_runs: int


def _metric_block(result: dict, checkpoint: str) -> dict:
    key = "metrics" if checkpoint == "best" else "metrics_last"
    block = result.get(key)
    if block is None and checkpoint == "last":
        raise ReportError("results.json has no 'metrics_last' block (checkpoint='last' asked)")
    return block or {}


def _read_result(path: Path, root: Path, checkpoint: str) -> Run | None:
    """One ``results.json`` as a :class:`Run`; None for runs that are not fine-tuning runs."""
    try:
        result = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return Run(
            name=str(path.parent.relative_to(root)) if path.is_relative_to(root) else str(path.parent),
            init=None, labeled_size=None, fold=None, seed=None, status="failed",
            error=f"unreadable results.json ({exc})",
        )  # fmt: skip
    init = result.get("init")
    if init not in INITS:  # the pretraining run, or something else: not part of the table
        return None
    name = str(path.parent.relative_to(root)) if path.is_relative_to(root) else str(path.parent)
    status = result.get("status", "failed")
    metrics: dict[str, float] = {}
    error = result.get("error")
    if status == "completed":
        block = _metric_block(result, checkpoint)
        for metric in METRICS:
            value = block.get(f"test/seg_{metric}")
            if value is None or not math.isfinite(float(value)):
                status, error = "failed", f"test/seg_{metric} missing or not finite in {path}"
                metrics = {}
                break
            metrics[metric] = float(value)
    return Run(
        name=name,
        init=init,
        labeled_size=_int_or_none(result.get("labeled_size")),
        fold=_int_or_none(result.get("fold")),
        seed=_int_or_none(result.get("seed")),
        status=status if status in ("completed", "failed") else "failed",
        metrics=metrics,
        error=error,
    )


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

    init = overrides.get("init")
    return Run(
        name=str(run_dir.relative_to(root)) if run_dir.is_relative_to(root) else str(run_dir),
        init=init if init in INITS else None,
        labeled_size=pick("data.labeled_size"),
        fold=pick("data.fold"),
        seed=pick("seed"),
        status="missing",
        error="no results.json (the run was killed or never finished)",
    )


def collect_runs(dirs: Sequence[str | Path], checkpoint: str = "best") -> list[Run]:
    """Every fine-tuning run below ``dirs``, completed, failed or left without results.json."""
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


def _expected_missing(runs: list[Run]) -> list[Run]:
    """Grid points (size × fold × init × seed seen anywhere) that no run folder accounts for."""
    known = [r for r in runs if r.labeled_size is not None and r.fold is not None and r.init]
    sizes = sorted({r.labeled_size for r in known})  # type: ignore[type-var]
    folds = sorted({r.fold for r in known})  # type: ignore[type-var]
    seeds = sorted({r.seed for r in known}, key=lambda s: -1 if s is None else s)
    inits = [i for i in INITS if any(r.init == i for r in known)]
    present = {(r.labeled_size, r.fold, r.init, r.seed) for r in known}
    out = []
    for size in sizes:
        for fold in folds:
            for init in inits:
                for seed in seeds:
                    if (size, fold, init, seed) not in present:
                        out.append(
                            Run(
                                name=f"{init}/size{size}/fold{fold}/seed{seed}",
                                init=init,
                                labeled_size=size,
                                fold=fold,
                                seed=seed,
                                status="missing",
                                error="expected by the grid, no run folder found",
                            )
                        )
    return out


def _cell(values: list[float]) -> Cell:
    arr = np.asarray(values, dtype=np.float64)
    std = float(arr.std(ddof=1)) if arr.size > 1 else float("nan")
    return Cell(mean=float(arr.mean()), std=std, n=int(arr.size))


def _paired(scratch: dict[tuple, float], pretrained: dict[tuple, float]) -> Paired | None:
    keys = sorted(set(scratch) & set(pretrained), key=str)
    if not keys:
        return None
    diff = np.asarray([pretrained[k] - scratch[k] for k in keys], dtype=np.float64)
    p_value: float | None = None
    if diff.size > 1:
        if np.allclose(diff, diff[0]):
            p_value = 0.0 if diff[0] != 0 else 1.0
        else:
            from scipy.stats import ttest_rel

            p_value = float(
                ttest_rel([pretrained[k] for k in keys], [scratch[k] for k in keys]).pvalue
            )
    std = float(diff.std(ddof=1)) if diff.size > 1 else float("nan")
    return Paired(mean=float(diff.mean()), std=std, n=int(diff.size), p_value=p_value)


def summarize(runs: Iterable[Run], checkpoint: str = "best") -> Report:
    """Group runs into the table: mean ± std over folds per (size, init, metric), paired diffs."""
    runs = list(runs)
    completed = [r for r in runs if r.status == "completed" and r.labeled_size is not None]
    if not completed:
        names = ", ".join(r.name for r in runs[:5]) or "none"
        raise ReportError(
            f"no completed fine-tuning run found (runs seen: {len(runs)}; e.g. {names}); "
            "expected results.json files with status 'completed' and init pretrained|scratch"
        )
    failed = [r for r in runs if r.status == "failed"]
    missing = [r for r in runs if r.status == "missing"] + _expected_missing(runs)
    # A run folder that exists but holds no results (orphan) also shows up as an unaccounted grid
    # point only if no folder was found; keep one entry per grid point.
    seen: set[tuple] = set()
    unique_missing = []
    for r in missing:
        key = (r.init, r.labeled_size, r.fold, r.seed) if r.labeled_size is not None else (r.name,)
        if key not in seen:
            seen.add(key)
            unique_missing.append(r)
    sizes = sorted({r.labeled_size for r in completed if r.labeled_size is not None})
    cells: dict[tuple[int, str, str], Cell] = {}
    paired: dict[tuple[int, str], Paired] = {}
    for size in sizes:
        for metric in METRICS:
            by_init: dict[str, dict[tuple, float]] = {}
            for init in INITS:
                values = {
                    (r.fold, r.seed): r.metrics[metric]
                    for r in completed
                    if r.labeled_size == size and r.init == init
                }
                by_init[init] = values
                if values:
                    cells[(size, init, metric)] = _cell(list(values.values()))
            pair = _paired(by_init["scratch"], by_init["pretrained"])
            if pair is not None:
                paired[(size, metric)] = pair
    return Report(
        sizes=sizes,
        cells=cells,
        paired=paired,
        failed=failed,
        missing=unique_missing,
        checkpoint=checkpoint,
        n_runs=len(completed),
    )


def _fmt_cell(cell: Cell | None) -> str:
    if cell is None:
        return "–"
    std = "–" if math.isnan(cell.std) else f"{100 * cell.std:.1f}"
    return f"{100 * cell.mean:.1f} ± {std} (n={cell.n})"


def _fmt_paired(pair: Paired | None) -> str:
    if pair is None:
        return "–"
    p = "–" if pair.p_value is None else f"{pair.p_value:.3f}"
    return f"{100 * pair.mean:+.1f} (p={p}, n={pair.n})"


def to_markdown(report: Report, paper: bool = False) -> str:
    """The table as Markdown (percent), followed by the failed and missing runs."""
    header = ["Labeled patches"]
    for init in INITS:
        for metric in METRICS:
            header.append(
                f"{INIT_TITLES[init]}: {metric.capitalize() if metric != 'f1' else 'F1'} (%)"
            )
    header.append("Δ F1 pretrained − scratch (paired t-test)")
    if paper:
        header += [f"Paper {('scratch' if i == 'scratch' else 'pretrained')} F1 (%)" for i in INITS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for size in sorted(report.sizes, reverse=True):  # the paper lists 200 first
        row = [str(size)]
        for init in INITS:
            for metric in METRICS:
                row.append(_fmt_cell(report.cells.get((size, init, metric))))
        row.append(_fmt_paired(report.paired.get((size, "f1"))))
        if paper:
            for init in INITS:
                value = PAPER_TABLE.get(size, {}).get(init, {}).get("f1")
                row.append("–" if value is None else f"{value:.2f}")
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines.append(
        f"Test-set pixel metrics of the {report.checkpoint} checkpoint, mean ± sample std over folds "
        f"(n = folds), {report.n_runs} completed runs."
    )
    if report.failed:
        lines.append("")
        lines.append(f"Failed runs ({len(report.failed)}, not averaged):")
        lines += [f"- {r.name}: {r.error or 'no error message'}" for r in report.failed]
    if report.missing:
        lines.append("")
        lines.append(f"Missing runs ({len(report.missing)}, not averaged):")
        lines += [f"- {r.name}: {r.error}" for r in report.missing]
    return "\n".join(lines) + "\n"


def to_csv(report: Report) -> str:
    """One row per (size, init, metric) with mean, std, n in fractions; paired rows with init=diff."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["labeled_size", "init", "metric", "mean", "std", "n", "p_value"])
    for size in report.sizes:
        for init in INITS:
            for metric in METRICS:
                cell = report.cells.get((size, init, metric))
                if cell is not None:
                    writer.writerow(
                        [size, init, metric, f"{cell.mean:.6f}", f"{cell.std:.6f}", cell.n, ""]
                    )
        for metric in METRICS:
            pair = report.paired.get((size, metric))
            if pair is not None:
                p = "" if pair.p_value is None else f"{pair.p_value:.6g}"
                writer.writerow(
                    [
                        size,
                        "pretrained-scratch",
                        metric,
                        f"{pair.mean:.6f}",
                        f"{pair.std:.6f}",
                        pair.n,
                        p,
                    ]
                )
    return buf.getvalue()


def plot(report: Report, path: Path, paper: bool = False) -> None:
    """F1 and recall (percent) vs labeled size for both inits with std error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    colours = {"scratch": "tab:gray", "pretrained": "tab:red"}
    for ax, metric in zip(axes, ("f1", "recall")):
        for init in INITS:
            sizes = [s for s in report.sizes if (s, init, metric) in report.cells]
            if not sizes:
                continue
            cells = [report.cells[(s, init, metric)] for s in sizes]
            ax.errorbar(
                sizes,
                [100 * c.mean for c in cells],
                yerr=[0.0 if math.isnan(c.std) else 100 * c.std for c in cells],
                marker="o",
                capsize=4,
                color=colours[init],
                label=INIT_TITLES[init].lower(),
            )
            if paper:
                ps = sorted(PAPER_TABLE)
                ax.plot(
                    ps,
                    [PAPER_TABLE[s][init][metric] for s in ps],
                    linestyle="--",
                    marker="x",
                    color=colours[init],
                    alpha=0.6,
                    label=f"paper, {INIT_TITLES[init].lower()}",
                )
        ax.set_xlabel("labeled patches")
        ax.set_ylabel(f"test pixel {'F1' if metric == 'f1' else metric} (%)")
        ax.set_xticks(report.sizes)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Pretrained vs scratch: mean ± std over folds")
    fig.tight_layout()
    _atomic_save_fig(fig, path)
    plt.close(fig)


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_save_fig(fig, path: Path) -> None:  # type: ignore[no-untyped-def]
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_report(report: Report, out_dir: str | Path, paper: bool = False) -> dict[str, Path]:
    """Write table.md, table.csv and f1_vs_labels.png into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / "table.md", "csv": out / "table.csv", "plot": out / "f1_vs_labels.png"}
    _atomic_write(paths["md"], to_markdown(report, paper=paper))
    _atomic_write(paths["csv"], to_csv(report))
    plot(report, paths["plot"], paper=paper)
    return paths


def log_to_wandb(report: Report, paths: dict[str, Path], project: str = "lymphnode") -> None:
    """Log the table and plot to a wandb summary run (offline unless WANDB_MODE says otherwise)."""
    import wandb

    rows = []
    for size in report.sizes:
        for init in INITS:
            for metric in METRICS:
                cell = report.cells.get((size, init, metric))
                if cell is not None:
                    rows.append([size, init, metric, cell.mean, cell.std, cell.n])
    run = wandb.init(
        project=project,
        job_type="report",
        mode=os.environ.get("WANDB_MODE", "offline"),  # type: ignore[arg-type]
        dir=str(paths["md"].parent),
    )
    try:
        run.log(
            {
                "report/table": wandb.Table(
                    columns=["labeled_size", "init", "metric", "mean", "std", "n"], data=rows
                ),
                "report/f1_vs_labels": wandb.Image(str(paths["plot"])),
            }
        )
    finally:
        run.finish()


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point behind the error boundary of :mod:`lymphnode.core.boundary`; returns the
    exit code (1 on a lymphnode error, with one ``error:`` line; 2 on a bug, with the traceback)."""
    from lymphnode.core.boundary import cli_boundary

    return cli_boundary(_main)(argv)


def _main(argv: Sequence[str] | None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lymphnode.report",
        description="The results table (pretrained vs scratch by labeled size) of a sweep.",
    )
    parser.add_argument("sweep_dirs", nargs="+", help="folders holding the runs' results.json")
    parser.add_argument("--out", default=None, help="output folder (default: <first dir>/report)")
    parser.add_argument("--paper", action="store_true", help="show the paper's F1 beside ours")
    parser.add_argument(
        "--checkpoint",
        choices=("best", "last"),
        default="best",
        help="report the selected (best val) or the last checkpoint's test metrics",
    )
    parser.add_argument("--wandb", action="store_true", help="log table and plot to wandb")
    parser.add_argument("--wandb-project", default="lymphnode")
    args = parser.parse_args(argv)
    runs = collect_runs(args.sweep_dirs, checkpoint=args.checkpoint)
    report = summarize(runs, checkpoint=args.checkpoint)
    out = Path(args.out) if args.out else Path(args.sweep_dirs[0]) / "report"
    paths = write_report(report, out, paper=args.paper)
    if args.wandb:
        log_to_wandb(report, paths, project=args.wandb_project)
    sys.stdout.write(paths["md"].read_text())
    print(f"\nwrote {paths['md']}, {paths['csv']} and {paths['plot']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
