"""The results table's figures: per (labeled size, arm, metric) mean ± sample std over folds, the
paired differences with their t-tests (every pretext − scratch, and every other pretext −
reconstruction), collapse counts, checkpoint steps, and the all-tumour baseline — from
:class:`~lymphnode.evaluation.runs.Run` records, as fractions (0..1).

An arm is ``scratch`` or one pretext, named as its run folders: ``pretrained`` (reconstruction, the
paper's), ``pretrained-<pretext>`` (see :mod:`lymphnode.evaluation.runs`). The table always has
the ``scratch`` and ``pretrained`` arms (the paper's two columns, "–" when a sweep lacks one) and
the reconstruction − scratch comparison, then the other arms the runs hold.

Completed runs are averaged (collapsed ones too, but counted in every cell they enter and listed by
name); failed, interrupted and missing runs never are, and are listed by name.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from lymphnode.evaluation.runs import (
    METRICS,
    ReportError,
    Run,
    arm_pretext,
    expected_missing,
    order_arms,
    scratch_of,
)

#: The arms every table shows (the paper's two columns), in this order before any other.
BASE_ARMS: tuple[str, ...] = ("scratch", "pretrained")

#: Paired differences whose spread is at most this (in fractions) count as constant: a t-test on
#: them has no p-value (its statistic divides by their zero standard deviation).
ZERO_SPREAD = 1e-9


@dataclass(frozen=True)
class Cell:
    """Mean, sample std and count of one metric over folds (fractions 0..1); ``collapsed`` of the
    ``n`` runs predicted no tumour (test recall 0)."""

    mean: float
    std: float
    n: int
    collapsed: int = 0


@dataclass(frozen=True)
class Paired:
    """One arm − a reference arm over the (fold, seed) pairs both completed: mean/std of the
    difference, paired t-test p.

    ``p_value`` is None when a paired t-test has none; ``p_note`` then says why (one pair only, or
    differences without variance).
    """

    mean: float
    std: float
    n: int
    p_value: float | None
    p_note: str | None = None


@dataclass(frozen=True)
class Steps:
    """Median optimizer step of the selected and of the last checkpoint over a group's runs (None
    when no run of the group recorded it)."""

    selected: float | None
    last: float | None


@dataclass
class Report:
    """Everything the table shows: the arms (table order) and the comparisons (arm, reference arm)
    made, cells by (size, arm, metric), paired differences by (size, arm, reference, metric), steps
    by (size, arm), baseline F1 by size, the checkpoint selections seen (name → run count, None =
    not recorded; and the recorded ones by (size, arm)), and the runs to list: failed,
    interrupted, missing, collapsed."""

    sizes: list[int]
    cells: dict[tuple[int, str, str], Cell]
    paired: dict[tuple[int, str, str, str], Paired]
    failed: list[Run]
    missing: list[Run]
    checkpoint: str
    n_runs: int
    interrupted: list[Run]
    collapsed: list[Run]
    steps: dict[tuple[int, str], Steps]
    baseline: dict[int, Cell]
    selections: dict[str | None, int]
    group_selections: dict[tuple[int, str], tuple[str, ...]]
    arms: list[str]
    comparisons: list[tuple[str, str]]

    @property
    def pretexts(self) -> list[str]:
        """The pretext tasks of the arms, in table order (``reconstruction`` first)."""
        return [p for p in (arm_pretext(a) for a in self.arms) if p is not None]


def _cell(values: list[float], collapsed: int = 0) -> Cell:
    arr = np.asarray(values, dtype=np.float64)
    std = float(arr.std(ddof=1)) if arr.size > 1 else float("nan")
    return Cell(mean=float(arr.mean()), std=std, n=int(arr.size), collapsed=collapsed)


def paired_difference(
    reference: dict[tuple, float], arm: dict[tuple, float], both: str = "inits"
) -> Paired | None:
    """``arm`` − ``reference`` (e.g. pretrained − scratch) over the keys (fold, seed) both have;
    None when they share none. ``both`` names the two in a note ("inits", or "pretexts" when
    both arms are pretrained).

    The p-value is the paired t-test's (scipy ``ttest_rel``), or None with a note when the test is
    undefined: a single pair, or differences that are all equal (to :data:`ZERO_SPREAD`) — a
    constant difference, however large, is no evidence about its variance, so no p is invented.
    """
    keys = sorted(set(reference) & set(arm), key=str)
    if not keys:
        return None
    diff = np.asarray([arm[k] - reference[k] for k in keys], dtype=np.float64)
    std = float(diff.std(ddof=1)) if diff.size > 1 else float("nan")
    p_value: float | None = None
    note: str | None = None
    if diff.size < 2:
        note = f"one fold completed by both {both}: a paired t-test needs two"
    elif float(np.ptp(diff)) <= ZERO_SPREAD:
        note = (
            f"the {diff.size} paired differences are all equal (zero variance): "
            "a paired t-test is undefined"
        )
    else:
        from scipy.stats import ttest_rel

        p = float(ttest_rel([arm[k] for k in keys], [reference[k] for k in keys]).pvalue)
        if np.isfinite(p):
            p_value = p
        else:
            note = "the paired t-test returned no finite p-value"
    return Paired(mean=float(diff.mean()), std=std, n=int(diff.size), p_value=p_value, p_note=note)


def _median(values: list[int]) -> float | None:
    return float(np.median(values)) if values else None


def _unique_missing(missing: list[Run]) -> list[Run]:
    """One entry per grid point: an orphan run folder and the grid's expectation may name the
    same one."""
    seen: set[tuple] = set()
    out = []
    for r in missing:
        key = (r.arm, r.labeled_size, r.fold, r.seed) if r.labeled_size is not None else (r.name,)
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def comparisons_of(arms: list[str]) -> list[tuple[str, str]]:
    """The paired comparisons (arm, reference) of a table's arms, in column order: every pretext
    arm − scratch, then every pretext other than reconstruction − reconstruction (``pretrained``)."""
    # arms of another network / method (``@<network>``, ``+<method>``) pair with their own
    # scratch and reconstruction arms (lymphnode.evaluation.runs.split_arm)
    pretext_arms = [a for a in arms if a != scratch_of(a)]
    out = [(a, scratch_of(a)) for a in pretext_arms if scratch_of(a) in arms]
    for a in pretext_arms:
        reference = "pretrained" + scratch_of(a).removeprefix("scratch")
        if reference in arms and a != reference:
            out.append((a, reference))
    return out


def summarize(runs: Iterable[Run], checkpoint: str = "best") -> Report:
    """Group runs into the table: mean ± std over folds per (size, arm, metric), paired diffs."""
    runs = list(runs)
    completed = [r for r in runs if r.status == "completed" and r.labeled_size is not None]
    if not completed:
        names = ", ".join(r.name for r in runs[:5]) or "none"
        raise ReportError(
            f"no completed fine-tuning run found (runs seen: {len(runs)}; e.g. {names}); "
            "expected results.json files with status 'completed' and init pretrained|scratch"
        )
    missing = _unique_missing([r for r in runs if r.status == "missing"] + expected_missing(runs))
    sizes = sorted({r.labeled_size for r in completed if r.labeled_size is not None})
    # the paper's two arms always, unless other pretexts' runs show that reconstruction was not
    # run at all (no run and none missing): then no empty "with reconstruction" columns
    seen = {r.arm for r in [*completed, *missing] if r.arm is not None}
    others = seen - set(BASE_ARMS)
    base = [a for a in BASE_ARMS if a in seen or not others or a == "scratch"]
    arms = order_arms([*base, *seen])
    comparisons = comparisons_of(arms)
    cells: dict[tuple[int, str, str], Cell] = {}
    paired: dict[tuple[int, str, str, str], Paired] = {}
    steps: dict[tuple[int, str], Steps] = {}
    baseline: dict[int, Cell] = {}
    for size in sizes:
        at_size = [r for r in completed if r.labeled_size == size]
        for arm in arms:
            group = [r for r in at_size if r.arm == arm]
            if group:
                steps[(size, arm)] = Steps(
                    selected=_median(
                        [r.steps_selected for r in group if r.steps_selected is not None]
                    ),
                    last=_median([r.steps_last for r in group if r.steps_last is not None]),
                )
        base_f1 = [r.baseline_f1 for r in at_size if r.baseline_f1 is not None]
        if base_f1:
            baseline[size] = _cell(base_f1)
        for metric in METRICS:
            by_arm: dict[str, dict[tuple, float]] = {}
            for arm in arms:
                chosen = {(r.fold, r.seed): r for r in at_size if r.arm == arm}
                values = {key: r.metrics[metric] for key, r in chosen.items()}
                by_arm[arm] = values
                if values:
                    cells[(size, arm, metric)] = _cell(
                        list(values.values()), collapsed=sum(r.collapsed for r in chosen.values())
                    )
            for arm, reference in comparisons:
                both = "inits" if reference == "scratch" else "pretexts"
                pair = paired_difference(by_arm[reference], by_arm[arm], both=both)
                if pair is not None:
                    paired[(size, arm, reference, metric)] = pair
    return Report(
        sizes=sizes,
        cells=cells,
        paired=paired,
        failed=[r for r in runs if r.status == "failed"],
        missing=missing,
        checkpoint=checkpoint,
        n_runs=len(completed),
        interrupted=[r for r in runs if r.status == "interrupted"],
        collapsed=[r for r in completed if r.collapsed],
        steps=steps,
        baseline=baseline,
        selections=dict(Counter(r.selection for r in completed)),
        group_selections={
            (size, arm): tuple(
                sorted(
                    {
                        r.selection
                        for r in completed
                        if r.labeled_size == size and r.arm == arm and r.selection is not None
                    }
                )
            )
            for (size, arm) in steps
        },
        arms=arms,
        comparisons=comparisons,
    )
