"""The results table's files: ``table.md``, ``table.csv``, ``f1_vs_labels.png`` (and wandb).

Markdown rows are labeled sizes (200 first, as the paper); one column group (precision, recall,
F1) per arm — without pretraining, with (reconstruction) pretraining, then one per other pretext —
then the paired F1 difference of every pretext to scratch and of every other pretext to
reconstruction. A cell is ``mean ± std (n=folds)`` in percent, with ``, k collapsed`` when k of its
runs predicted no tumour. Under the table: which checkpoint the metrics are from (``selection``),
the median optimizer steps, why a p-value is n/a, and the collapsed, failed, interrupted and
missing runs by name. With only the reconstruction pretext the table is the paper's two-arm one.

CSV rows are (labeled_size, init, metric) in fractions, ``init`` being the arm as its run folders
name it: ``scratch``, ``pretrained`` (reconstruction), ``pretrained-<pretext>``; paired differences
have init ``pretrained-scratch`` (reconstruction − scratch, the name older readers know),
``<pretext>-scratch`` and ``<pretext>-reconstruction``; the all-tumour baseline has init
``all_tumour_baseline``. The last column, ``pretext``, names the pretext of a row's arm (of the
arm compared, for a difference; empty for scratch and the baseline).
"""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

from lymphnode.core import atomic
from lymphnode.evaluation.runs import INITS, METRICS, Run, arm_pretext, split_arm
from lymphnode.evaluation.table import Cell, Paired, Report

if TYPE_CHECKING:
    from matplotlib.figure import Figure

INIT_TITLES = {"scratch": "Without pretraining", "pretrained": "With pretraining"}
#: Line colours of the plot: the paper's two arms, then the other pretexts in table order.
ARM_COLOURS = {"scratch": "tab:gray", "pretrained": "tab:red"}
OTHER_COLOURS = ("tab:blue", "tab:green", "tab:purple", "tab:orange", "tab:brown", "tab:olive")

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


#: CSV columns, in order (the first seven are the original ones).
CSV_COLUMNS: tuple[str, ...] = (
    "labeled_size", "init", "metric", "mean", "std", "n", "p_value",
    "p_note", "collapsed", "selection", "median_selected_step", "median_last_step", "pretext",
)  # fmt: skip


def _two_arm(report: Report) -> bool:
    """Only the paper's arms (scratch, reconstruction): the table reads as it always did."""
    return all(arm in INITS for arm in report.arms)


def arm_title(report: Report, arm: str) -> str:
    """An arm's column title: "Without pretraining", "With pretraining" (reconstruction; "With
    reconstruction pretraining" beside other pretexts), "With <pretext> pretraining"."""
    base, variant = split_arm(arm)[0], arm[len(split_arm(arm)[0]) :]  # variant: @<net>+<method>
    if base in INIT_TITLES and (base == "scratch" or _two_arm(report)):
        title = INIT_TITLES[base]
    else:
        title = f"With {arm_pretext(arm)} pretraining"
    return f"{title} ({variant})" if variant else title


def _arm_word(report: Report, arm: str) -> str:
    """An arm in a difference's label: scratch, pretrained (two arms) or its pretext's name."""
    base, variant = split_arm(arm)[0], arm[len(split_arm(arm)[0]) :]
    if base == "scratch" or (base == "pretrained" and _two_arm(report)):
        return arm
    return f"{arm_pretext(arm)}{variant}"


def comparison_label(report: Report, arm: str, reference: str) -> str:
    """A paired difference in words: "pretrained − scratch" (two arms), "masked − scratch",
    "masked − reconstruction"."""
    return f"{_arm_word(report, arm)} − {_arm_word(report, reference)}"


def csv_comparison_name(arm: str, reference: str) -> str:
    """A paired difference's CSV ``init``: ``pretrained-scratch`` for reconstruction − scratch
    (the name older readers know), ``<pretext>-scratch``, ``<pretext>-reconstruction``."""
    if (arm, reference) == ("pretrained", "scratch"):
        return "pretrained-scratch"
    variant = arm[len(split_arm(arm)[0]) :]  # @<network>+<method>, shared with the reference
    ref_base = split_arm(reference)[0]
    other = "scratch" if ref_base == "scratch" else arm_pretext(reference)
    return f"{arm_pretext(arm)}-{other}{variant}"


def _fmt_cell(cell: Cell | None) -> str:
    if cell is None:
        return "–"
    std = "–" if math.isnan(cell.std) else f"{100 * cell.std:.1f}"
    collapsed = f", {cell.collapsed} collapsed" if cell.collapsed else ""
    return f"{100 * cell.mean:.1f} ± {std} (n={cell.n}{collapsed})"


def _fmt_paired(pair: Paired | None) -> str:
    if pair is None:
        return "–"
    p = "n/a" if pair.p_value is None else f"{pair.p_value:.3f}"
    return f"{100 * pair.mean:+.1f} (p={p}, n={pair.n})"


def _fmt_step(value: float | None) -> str:
    return "–" if value is None else f"{value:g}"


def _selection_line(report: Report) -> str:
    if report.checkpoint == "last":
        return "Checkpoint: the last one (metrics_last) of every run."
    parts = [
        f"{name if name is not None else 'not recorded'} ({count} run{'s' if count != 1 else ''})"
        for name, count in sorted(report.selections.items(), key=lambda kv: str(kv[0]))
    ]
    return "Checkpoint selection: " + ", ".join(parts) + "."


def _steps_lines(report: Report) -> list[str]:
    if not any(s.selected is not None or s.last is not None for s in report.steps.values()):
        return []
    lines = ["Median optimizer step (selected / last checkpoint):"]
    for size in sorted(report.sizes, reverse=True):
        groups = [
            f"{arm} {_fmt_step(report.steps[(size, arm)].selected)} / "
            f"{_fmt_step(report.steps[(size, arm)].last)}"
            for arm in report.arms
            if (size, arm) in report.steps
        ]
        lines.append(f"- {size}: " + ", ".join(groups))
    return lines


def _run_list(title: str, runs: list[Run], default: str) -> list[str]:
    if not runs:
        return []
    return ["", f"{title} ({len(runs)}, not averaged):"] + [
        f"- {r.name}: {r.error or default}" for r in runs
    ]


def to_markdown(report: Report, paper: bool = False) -> str:
    """The table as Markdown (percent), followed by its notes and the runs not averaged.

    ``paper`` adds the paper's published F1 without and with (reconstruction) pretraining."""
    header = ["Labeled patches"]
    for arm in report.arms:
        for metric in METRICS:
            header.append(
                f"{arm_title(report, arm)}: {metric.capitalize() if metric != 'f1' else 'F1'} (%)"
            )
    for arm, reference in report.comparisons:
        header.append(f"Δ F1 {comparison_label(report, arm, reference)} (paired t-test)")
    if report.baseline:
        header.append("All-tumour baseline F1 (%)")
    if paper:
        header += [f"Paper {('scratch' if i == 'scratch' else 'pretrained')} F1 (%)" for i in INITS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for size in sorted(report.sizes, reverse=True):  # the paper lists 200 first
        row = [str(size)]
        for arm in report.arms:
            for metric in METRICS:
                row.append(_fmt_cell(report.cells.get((size, arm, metric))))
        for arm, reference in report.comparisons:
            row.append(_fmt_paired(report.paired.get((size, arm, reference, "f1"))))
        if report.baseline:
            row.append(_fmt_cell(report.baseline.get(size)))
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
    lines.append(_selection_line(report))
    for size in sorted(report.sizes, reverse=True):
        for arm, reference in report.comparisons:
            pair = report.paired.get((size, arm, reference, "f1"))
            if pair is not None and pair.p_note:
                which = "" if _two_arm(report) else f" ({comparison_label(report, arm, reference)})"
                lines.append(f"p = n/a at {size}{which}: {pair.p_note}.")
    steps = _steps_lines(report)
    if steps:
        lines += ["", *steps]
    if report.collapsed:
        lines.append("")
        lines.append(
            f"Collapsed runs ({len(report.collapsed)}, test recall 0: no tumour predicted; "
            "averaged, and counted in their cells):"
        )
        lines += [f"- {r.name}" for r in report.collapsed]
    lines += _run_list("Failed runs", report.failed, "no error message")
    lines += _run_list(
        "Interrupted runs", report.interrupted, "stopped before the end (max_time / SIGTERM)"
    )
    lines += _run_list("Missing runs", report.missing, "no results.json")
    return "\n".join(lines) + "\n"


def _selection_of(report: Report, size: int, arm: str) -> str:
    """The selections of the runs behind a (size, arm) cell, ';'-joined ('' when unrecorded)."""
    return ";".join(report.group_selections.get((size, arm), ()))


def to_csv(report: Report) -> str:
    """One row per (size, arm, metric) with mean, std, n in fractions (init = the arm's folder
    name); paired rows per comparison (init = :func:`csv_comparison_name`; p_value, or p_note
    when there is none); baseline rows with init=all_tumour_baseline; per (size, arm) the
    collapsed count, selection and median steps; ``pretext``: the arm's pretext task."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for size in report.sizes:
        for arm in report.arms:
            steps = report.steps.get((size, arm))
            for metric in METRICS:
                cell = report.cells.get((size, arm, metric))
                if cell is not None:
                    writer.writerow(
                        [
                            size, arm, metric, f"{cell.mean:.6f}", f"{cell.std:.6f}", cell.n, "",
                            "", cell.collapsed, _selection_of(report, size, arm),
                            _fmt_csv_step(steps.selected if steps else None),
                            _fmt_csv_step(steps.last if steps else None),
                            arm_pretext(arm) or "",
                        ]
                    )  # fmt: skip
        for arm, reference in report.comparisons:
            for metric in METRICS:
                pair = report.paired.get((size, arm, reference, metric))
                if pair is not None:
                    p = "" if pair.p_value is None else f"{pair.p_value:.6g}"
                    writer.writerow(
                        [
                            size, csv_comparison_name(arm, reference), metric, f"{pair.mean:.6f}",
                            f"{pair.std:.6f}", pair.n, p, pair.p_note or "", "", "", "", "",
                            arm_pretext(arm),
                        ]
                    )  # fmt: skip
        base = report.baseline.get(size)
        if base is not None:
            writer.writerow(
                [size, "all_tumour_baseline", "f1", f"{base.mean:.6f}", f"{base.std:.6f}", base.n,
                 "", "", "", "", "", "", ""]
            )  # fmt: skip
    return buf.getvalue()


def _fmt_csv_step(value: float | None) -> str:
    return "" if value is None else f"{value:g}"


def arm_colour(report: Report, arm: str) -> str:
    """The plot colour of an arm: grey scratch, red reconstruction, then one per other pretext."""
    if arm in ARM_COLOURS:
        return ARM_COLOURS[arm]
    others = [a for a in report.arms if a not in ARM_COLOURS]
    return OTHER_COLOURS[others.index(arm) % len(OTHER_COLOURS)]


def make_figure(report: Report, paper: bool = False) -> Figure:
    """F1 (left axes) and recall (right) in percent vs labeled size: one line per arm with std
    error bars (an ``ErrorbarContainer`` labeled by the arm's title, lower-case), and with
    ``paper`` the paper's two arms dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    for ax, metric in zip(axes, ("f1", "recall")):
        for arm in report.arms:
            sizes = [s for s in report.sizes if (s, arm, metric) in report.cells]
            if not sizes:
                continue
            cells = [report.cells[(s, arm, metric)] for s in sizes]
            ax.errorbar(
                sizes,
                [100 * c.mean for c in cells],
                yerr=[0.0 if math.isnan(c.std) else 100 * c.std for c in cells],
                marker="o",
                capsize=4,
                color=arm_colour(report, arm),
                label=arm_title(report, arm).lower(),
            )
            if paper and arm in INITS:
                ps = sorted(PAPER_TABLE)
                ax.plot(
                    ps,
                    [PAPER_TABLE[s][arm][metric] for s in ps],
                    linestyle="--",
                    marker="x",
                    color=arm_colour(report, arm),
                    alpha=0.6,
                    label=f"paper, {INIT_TITLES[arm].lower()}",
                )
        ax.set_xlabel("labeled patches")
        ax.set_ylabel(f"test pixel {'F1' if metric == 'f1' else metric} (%)")
        ax.set_xticks(report.sizes)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    what = "Pretrained vs scratch" if _two_arm(report) else "Pretext tasks vs scratch"
    fig.suptitle(f"{what}: mean ± std over folds")
    fig.tight_layout()
    return fig


def plot(report: Report, path: Path, paper: bool = False) -> Figure:
    """Write :func:`make_figure` to ``path`` (PNG, atomically); returns the (closed) figure."""
    import matplotlib.pyplot as plt

    fig = make_figure(report, paper=paper)
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return fig


def write_report(report: Report, out_dir: str | Path, paper: bool = False) -> dict[str, Path]:
    """Write table.md, table.csv and f1_vs_labels.png into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / "table.md", "csv": out / "table.csv", "plot": out / "f1_vs_labels.png"}
    atomic.write_text(paths["md"], to_markdown(report, paper=paper))
    atomic.write_text(paths["csv"], to_csv(report))
    plot(report, paths["plot"], paper=paper)
    return paths


def log_to_wandb(report: Report, paths: dict[str, Path], project: str = "lymphnode") -> None:
    """Log the table and plot to a wandb summary run (offline unless WANDB_MODE says otherwise)."""
    import wandb

    rows = []
    for size in report.sizes:
        for arm in report.arms:
            for metric in METRICS:
                cell = report.cells.get((size, arm, metric))
                if cell is not None:
                    rows.append([size, arm, metric, cell.mean, cell.std, cell.n])
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
