"""Per-slide test figures of the real-dev runs (issue #9 §1): does a result hold on each slide?

    python experiments/real_dev/per_slide.py outputs/real_dev/patch/runs
    python experiments/real_dev/per_slide.py outputs/real_dev/patch/runs --checkpoint last \\
        --out outputs/real_dev/patch/per_slide_last

The patch protocol's test cache mixes patches of three slides and a run's ``results.json`` records
the pixel metrics over all of them. For every completed fine-tuning run below the runs folder
(:func:`lymphnode.evaluation.runs.collect_runs`) this loads the run's selected checkpoint
(``checkpoints.best``; ``--checkpoint last``: the final step) with lymphnode's safe loader
(:func:`lymphnode.models.checkpoint.load_inference_model`, ``weights_only=True``), predicts every
patch of the run's test cache (``config.data.test_dir``) as the test step did — the same
:class:`lymphnode.data.datasets.CacheDataset`, evaluation pipeline (centre crop to
``data.transforms.crop``, then the checkpoint's preprocessing contract), batch size, memory format
and tumour rule (torchmetrics' binary stat scores: tumour where the probability is **>** the
module's ``threshold``, 0.5) — and counts pixel TP/FP/FN per slide (the cache's index names each
patch's slide).

Into ``--out`` (default: ``<runs>/../per_slide``, or ``per_slide_last`` with ``--checkpoint last``):

- ``per_slide.csv``: one row per run and slide: arm, size, fold, seed, slide, n_patches, pixels,
  tumour_pixels, tp, fp, fn, precision, recall, f1 (fractions; blank on a slide without tumour,
  where they are undefined), fp_rate (FP / normal pixels) and baseline_f1 (the all-tumour F1 of
  that slide's pixels, :func:`lymphnode.tasks.callbacks.all_tumour_f1`; blank without tumour);
- ``per_slide.md``: arm × size rows, one F1 column per slide (mean ± sample sd over folds and
  seeds, %), the recorded all-pixel F1 beside them, and the consistency check.

Consistency check: the per-slide counts summed over slides give the run's F1 over all test pixels,
which must equal the ``test/seg_f1`` its results.json recorded for that checkpoint (``metrics``,
or ``metrics_last``) to ``--tolerance`` (1e-6; the recorded value is float32). A run that differs
is listed and the command exits 1 after writing both files.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import sys
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader
from torchmetrics.functional.classification import binary_stat_scores

from lymphnode.core import atomic
from lymphnode.core.errors import EvaluationError
from lymphnode.core.records import read_record
from lymphnode.data.datasets import CacheDataset
from lymphnode.data.transforms import build_eval_transform
from lymphnode.evaluation.pixels import PixelCounts
from lymphnode.evaluation.runs import Run, collect_runs, order_arms
from lymphnode.models.checkpoint import InferenceModel, load_inference_model
from lymphnode.patches.cache import PatchCache
from lymphnode.tasks.callbacks import all_tumour_f1

CHECKPOINTS = ("best", "last")  # results.json's checkpoints.<name>; metrics / metrics_last
RECORDED = {"best": "metrics", "last": "metrics_last"}
TOLERANCE = 1e-6  # |summed F1 - recorded F1|: the recorded value is a float32 ratio of counts
COLUMNS = (
    "arm", "size", "fold", "seed", "slide", "n_patches", "pixels", "tumour_pixels", "tp", "fp",
    "fn", "precision", "recall", "f1", "fp_rate", "baseline_f1",
)  # fmt: skip


@dataclass
class SlideCounts:
    """Pixel counts of one slide's test patches (at the level and crop the network saw)."""

    n_patches: int = 0
    pixels: int = 0
    tumour_pixels: int = 0
    counts: PixelCounts = field(default_factory=PixelCounts)

    @property
    def fp_rate(self) -> float:
        """FP / normal pixels: the share of this slide's normal tissue called tumour."""
        normal = self.pixels - self.tumour_pixels
        return self.counts.fp / normal if normal else float("nan")

    @property
    def baseline_f1(self) -> float:
        """F1 of predicting tumour on every pixel of this slide (NaN without tumour)."""
        if not self.tumour_pixels:
            return float("nan")
        return all_tumour_f1(self.tumour_pixels / self.pixels)


class PerSlideCounter:
    """Pixel TP/FP/FN per slide, with the test step's rule (torchmetrics' binary stat scores, the
    code behind its BinaryPrecision/Recall/F1Score: a pixel is tumour where its probability is
    > ``threshold``; a probability of exactly ``threshold`` is normal)."""

    def __init__(self, threshold: float) -> None:
        self.threshold = float(threshold)
        self.slides: dict[str, SlideCounts] = {}

    def update(self, probabilities: Tensor, masks: Tensor, slides: Sequence[str]) -> None:
        """Add one batch: ``probabilities`` (B, 1, H, W) in [0, 1], ``masks`` (B, 1, H, W) {0, 1},
        ``slides`` the B patches' slide ids."""
        if probabilities.shape != masks.shape or len(slides) != probabilities.shape[0]:
            raise EvaluationError(
                f"a batch of probabilities {tuple(probabilities.shape)}, masks "
                f"{tuple(masks.shape)} and {len(slides)} slide ids: expected equal shapes "
                "(B, 1, H, W) and B ids"
            )
        per_patch = int(np.prod(masks.shape[1:]))
        for slide, prob, mask in zip(slides, probabilities.float(), masks.long()):
            # one patch at a time: multidim_average="samplewise" fails on a batch of one
            stats = binary_stat_scores(prob, mask, threshold=self.threshold, validate_args=False)
            tp, fp, _tn, fn, support = stats.tolist()  # pixel counts of this patch
            entry = self.slides.setdefault(slide, SlideCounts())
            entry.n_patches += 1
            entry.pixels += per_patch
            entry.tumour_pixels += int(support)
            entry.counts = entry.counts + PixelCounts(int(tp), int(fp), int(fn))


def count_test_cache(
    model: InferenceModel,
    test_dir: Path,
    *,
    crop: int | None,
    batch_size: int,
    threshold: float,
    device: str = "cpu",
) -> dict[str, SlideCounts]:
    """Per-slide pixel counts of ``model`` on every patch of the test cache at ``test_dir``, as the
    test step computes them: the cache in order, centre crop to ``crop`` px (None: whole
    patches), the model's preprocessing contract, batches of ``batch_size``, tumour where the
    probability is > ``threshold``. Slides in cache order."""
    cache = PatchCache(test_dir)
    slide_of = cache.index["slide"]  # (N,) slide id per cache position
    dataset = CacheDataset(test_dir, None, build_eval_transform(model.preprocess, crop=crop), True)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    counter = PerSlideCounter(threshold)
    task = model.task.to(device)
    if model.hparams.get("channels_last"):  # as TaskModule.setup leaves a tested module
        task = task.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    with torch.inference_mode():
        for batch in loader:
            probabilities = model.probabilities(batch["image"].to(device))  # (B, 1, H, W)
            slides = [str(slide_of[i]) for i in batch["index"].tolist()]
            counter.update(probabilities, batch["mask"].to(device), slides)
    return {s: counter.slides[s] for s in cache.slides if s in counter.slides}


@dataclass
class RunFigures:
    """One run's per-slide counts and what its results.json recorded over all test pixels."""

    run: Run
    checkpoint: Path
    slides: dict[str, SlideCounts]
    recorded_f1: float

    @property
    def total(self) -> PixelCounts:
        """The per-slide counts summed over slides: the test set's counts."""
        total = PixelCounts()
        for entry in self.slides.values():
            total = total + entry.counts
        return total

    @property
    def difference(self) -> float:
        """|F1 of the summed counts - the recorded test F1|."""
        return abs(self.total.f1 - self.recorded_f1)


def _setting(config: Mapping[str, Any], dotted: str, path: Path) -> Any:
    node: Any = config
    for key in dotted.split("."):
        if not isinstance(node, Mapping) or key not in node:
            raise EvaluationError(f"{path}: config has no {dotted} (expected a fine-tuning run)")
        node = node[key]
    return node


def _checkpoint_path(result: Mapping[str, Any], run_dir: Path, checkpoint: str) -> Path:
    """The run's ``checkpoints.<checkpoint>`` file; its name under ``<run_dir>/checkpoints`` when
    the recorded absolute path is gone (a runs folder that was moved)."""
    recorded = (result.get("checkpoints") or {}).get(checkpoint)
    if not recorded:
        raise EvaluationError(
            f"{run_dir / 'results.json'} records no checkpoints.{checkpoint} (expected the path "
            "of the checkpoint the run was tested with)"
        )
    for path in (Path(recorded), run_dir / "checkpoints" / Path(recorded).name):
        if path.is_file():
            return path
    raise EvaluationError(
        f"{run_dir / 'results.json'}: checkpoints.{checkpoint}={recorded} does not exist, nor "
        f"{run_dir / 'checkpoints' / Path(recorded).name}"
    )


def run_figures(
    run: Run, runs_dir: Path, checkpoint: str = "best", device: str = "cpu"
) -> RunFigures:
    """Per-slide counts of one completed run (``run`` from :func:`collect_runs` on ``runs_dir``)
    for its ``checkpoint`` (``best``: the selected one; ``last``)."""
    run_dir = runs_dir / run.name
    path = run_dir / "results.json"
    result = read_record(path, what="results.json", error=EvaluationError)
    if result is None:
        raise EvaluationError(f"{path} does not exist (the run folder was removed)")
    config = result.get("config")
    if not isinstance(config, Mapping):
        raise EvaluationError(f"{path} has no 'config' (expected the run's resolved config)")
    test_dir = Path(_setting(config, "data.test_dir", path))
    if not test_dir.is_dir():
        raise EvaluationError(f"{path}: data.test_dir={test_dir} does not exist")
    transforms = _setting(config, "data", path).get("transforms") or {}
    batch_size = int(_setting(config, "data.batch_size", path))
    ckpt = _checkpoint_path(result, run_dir, checkpoint)
    model = load_inference_model(ckpt)
    threshold = model.hparams.get("threshold")
    if threshold is None:
        raise EvaluationError(
            f"checkpoint {ckpt} records no 'threshold' hyperparameter (expected a fine-tuned "
            "lymphnode.tasks.MultiTaskModule)"
        )
    slides = count_test_cache(
        model, test_dir, crop=transforms.get("crop"), batch_size=batch_size,
        threshold=float(threshold), device=device,
    )  # fmt: skip
    return RunFigures(run=run, checkpoint=ckpt, slides=slides, recorded_f1=run.metrics["f1"])


def completed_runs(runs_dir: Path, checkpoint: str = "best") -> list[Run]:
    """The completed fine-tuning runs below ``runs_dir``, by arm, size, fold and seed."""
    if checkpoint not in CHECKPOINTS:
        raise EvaluationError(f"checkpoint={checkpoint!r} is not one of {list(CHECKPOINTS)}")
    runs = [
        r for r in collect_runs([runs_dir], checkpoint, sweeps=False) if r.status == "completed"
    ]
    if not runs:
        raise EvaluationError(
            f"{runs_dir} holds no completed fine-tuning run (expected <arm>/size<N>/fold<K>/"
            "seed<S>/results.json with status completed)"
        )
    arms = order_arms(r.arm for r in runs if r.arm)
    return sorted(
        runs, key=lambda r: (arms.index(r.arm), r.labeled_size or 0, r.fold or 0, r.seed or 0)
    )


def _number(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.6f}"


def rows_of(figures: Iterable[RunFigures]) -> list[dict[str, Any]]:
    """One CSV row (:data:`COLUMNS`) per run and slide."""
    rows = []
    for fig in figures:
        for slide, entry in fig.slides.items():
            c, has_tumour = entry.counts, entry.tumour_pixels > 0
            rows.append(
                {
                    "arm": fig.run.arm, "size": fig.run.labeled_size, "fold": fig.run.fold,
                    "seed": fig.run.seed, "slide": slide, "n_patches": entry.n_patches,
                    "pixels": entry.pixels, "tumour_pixels": entry.tumour_pixels, "tp": c.tp,
                    "fp": c.fp, "fn": c.fn,
                    "precision": _number(c.precision if c.tp + c.fp else float("nan")),
                    "recall": _number(c.recall if has_tumour else float("nan")),
                    "f1": _number(c.f1 if has_tumour else float("nan")),
                    "fp_rate": _number(entry.fp_rate), "baseline_f1": _number(entry.baseline_f1),
                }
            )  # fmt: skip
    return rows


def to_csv(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] = COLUMNS) -> str:
    """The rows as CSV text with a header of ``columns``."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def _mean_sd(values: Sequence[float]) -> str:
    """``mean ± sd (n=k)`` in %, sample sd; ``–`` for no value."""
    if not values:
        return "–"
    arr = 100 * np.asarray(values, dtype=np.float64)
    sd = f"{arr.std(ddof=1):.1f}" if arr.size > 1 else "–"
    return f"{arr.mean():.1f} ± {sd} (n={arr.size})"


def to_markdown(figures: Sequence[RunFigures], checkpoint: str, tolerance: float) -> str:
    """arm × size rows, per-slide F1 columns (mean ± sd over folds and seeds, %), the recorded F1
    over all test pixels, the slides' sizes and baselines, and the consistency check."""
    slides = list(dict.fromkeys(s for f in figures for s in f.slides))
    groups: dict[tuple[str, int], list[RunFigures]] = defaultdict(list)
    for fig in figures:
        groups[(str(fig.run.arm), int(fig.run.labeled_size or 0))].append(fig)
    arms = order_arms(a for a, _ in groups)
    head = ["arm", "labeled patches", *(f"{s} F1 (%)" for s in slides), "all test pixels F1 (%)"]
    lines = [
        f"Per-slide test pixel F1 (checkpoint `{checkpoint}`), mean ± sample sd over folds/seeds:",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for arm in arms:
        for size in sorted(s for a, s in groups if a == arm):
            runs = groups[(arm, size)]
            cells = []
            for slide in slides:
                entries = [f.slides[slide] for f in runs if slide in f.slides]
                if entries and all(e.tumour_pixels == 0 for e in entries):
                    rates = [e.fp_rate for e in entries]
                    cells.append(f"no tumour; FP rate {_mean_sd(rates)}")
                else:
                    cells.append(_mean_sd([e.counts.f1 for e in entries]))
            cells.append(_mean_sd([f.recorded_f1 for f in runs]))
            lines.append(f"| {arm} | {size} | " + " | ".join(cells) + " |")
    first = figures[0].slides if figures else {}
    lines += ["", "| slide | test patches | tumour pixels (%) | all-tumour baseline F1 (%) |"]
    lines.append("|---|---|---|---|")
    for slide, entry in first.items():
        share = 100 * entry.tumour_pixels / entry.pixels
        base = "–" if math.isnan(entry.baseline_f1) else f"{100 * entry.baseline_f1:.1f}"
        lines.append(f"| {slide} | {entry.n_patches} | {share:.1f} | {base} |")
    worst = max((f.difference for f in figures), default=0.0)
    bad = [f for f in figures if f.difference > tolerance]
    lines += [
        "",
        f"Consistency: in {len(figures) - len(bad)} of {len(figures)} runs the per-slide counts "
        f"summed give the recorded test F1 to {tolerance:g} (largest difference {worst:.2e}).",
    ]
    lines += [
        f"- {f.run.name}: summed {f.total.f1:.7f} vs recorded {f.recorded_f1:.7f}" for f in bad
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, help="a runs folder (<out>/<protocol>/runs)")
    parser.add_argument("--checkpoint", choices=CHECKPOINTS, default="best")
    parser.add_argument("--out", type=Path, help="default: <runs>/../per_slide[_last]")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE)
    args = parser.parse_args(argv)
    runs_dir = args.runs.resolve()
    suffix = "" if args.checkpoint == "best" else f"_{args.checkpoint}"
    out = args.out or runs_dir.parent / f"per_slide{suffix}"
    runs = completed_runs(runs_dir, args.checkpoint)
    print(f"per-slide: {len(runs)} completed runs under {runs_dir}", flush=True)
    figures = []
    for run in runs:
        fig = run_figures(run, runs_dir, args.checkpoint, args.device)
        f1s = ", ".join(f"{s} {100 * e.counts.f1:.1f}" for s, e in fig.slides.items())
        print(f"  {run.name}: F1 {f1s}; summed {fig.total.f1:.6f} vs recorded "
              f"{fig.recorded_f1:.6f}", flush=True)  # fmt: skip
        figures.append(fig)
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_text(out / "per_slide.csv", to_csv(rows_of(figures)))
    markdown = to_markdown(figures, args.checkpoint, args.tolerance)
    atomic.write_text(out / "per_slide.md", markdown)
    print(markdown + f"written: {out / 'per_slide.csv'}, {out / 'per_slide.md'}")
    bad = [f.run.name for f in figures if f.difference > args.tolerance]
    if bad:
        raise EvaluationError(
            f"per-slide counts do not sum to the recorded test F1 in {len(bad)} runs: {bad}"
        )
    return 0


if __name__ == "__main__":
    from lymphnode.core.boundary import cli_boundary

    sys.exit(cli_boundary(main)())
