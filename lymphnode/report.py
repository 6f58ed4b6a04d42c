"""The paper's results table from a sweep's ``results.json`` files — no network needed.

``python -m lymphnode.report <sweep dir>... [--out DIR] [--paper] [--checkpoint best|last] [--wandb]``

Reads every run's ``results.json`` below the given folders, groups the fine-tuning runs by labeled
size and arm — ``scratch``, ``pretrained`` (the reconstruction pretext; also every older run that
names no pretext) and ``pretrained-<pretext>`` for each other pretext task (masked, contrastive,
stain, ...) — and writes into ``--out``:

- ``table.md`` and ``table.csv``: rows = labeled size; precision, recall and F1 (percent) per arm
  (scratch, reconstruction, then the other pretexts by name) as mean ± sample std over folds with
  n (and how many of them collapsed: test recall 0), plus the paired F1 difference of every
  pretext to scratch and of every other pretext to reconstruction (over the folds and seeds both
  arms completed) with a paired t-test p-value ("n/a", with the reason, when the test has none),
  and the all-tumour baseline F1 when the runs recorded it; under the table the checkpoint
  selection and the median optimizer steps per arm. With only reconstruction and scratch runs the
  table is the paper's two-arm one; ``--paper`` adds the paper's F1 of those two arms;
- ``f1_vs_labels.png``: F1 and recall vs labeled size, one line per arm with std error bars.

Runs that failed or were interrupted, and runs that the grid expects but that never wrote a
``results.json`` (a killed sweep, a run directory left without results, a run that the sweep's
``multirun.yaml`` defines and no folder holds), are listed by name under the table and never
averaged. The logic lives in :mod:`lymphnode.evaluation.runs` (reading),
:mod:`~lymphnode.evaluation.table` (figures) and :mod:`~lymphnode.evaluation.table_output` (files).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from lymphnode.evaluation.runs import CHECKPOINTS, collect_runs
from lymphnode.evaluation.table import summarize
from lymphnode.evaluation.table_output import log_to_wandb, write_report

log = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point behind the error boundary of :mod:`lymphnode.core.boundary`; returns the
    exit code (1 on a lymphnode error, with one ``error:`` line; 2 on a bug, with the traceback)."""
    from lymphnode.core.boundary import cli_boundary

    return cli_boundary(_main)(argv)


def _main(argv: Sequence[str] | None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lymphnode.report",
        description="The results table (scratch and each pretext task by labeled size) of a sweep.",
    )
    parser.add_argument("sweep_dirs", nargs="+", help="folders holding the runs' results.json")
    parser.add_argument("--out", default=None, help="output folder (default: <first dir>/report)")
    parser.add_argument("--paper", action="store_true", help="show the paper's F1 beside ours")
    parser.add_argument(
        "--checkpoint",
        choices=CHECKPOINTS,
        default="best",
        help="report the selected checkpoint's test metrics (best), the final step's (last), or "
        "those another selection picked (val_f1, val_loss: runs trained with compare_selections)",
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
    sys.exit(main())
