"""Active vs random labelling on synthetic slides, with their ground truth as the annotator.

    python experiments/active/run.py                  # 5 seeds, 40 -> 80 -> 120 labels (`make active`)
    python experiments/active/run.py --seeds 1 --rounds 1 --per-round 10 --folds 2 --steps 4 \\
        --slide-size 2048 --out /tmp/active           # a toy run (what the smoke test runs)

It lays out files and runs lymphnode's CLIs:

1. ``python -m lymphnode.synth``: small CAMELYON-like slides + ASAP XML under ``<out>/``;
2. ``python -m lymphnode.prepare caches=[test]``: the test cache of the held-out slides (128 px at
   level 1, as the demo) and ``split.json``; the training slides' tissue tiles (``select``'s
   candidate grid, :func:`lymphnode.inference.labelling.candidate_tiles`) are the pool to label;
3. per seed, round 0: ``--per-round`` tiles drawn uniformly from the pool (redrawn until each class
   has ``--folds`` patches, which the DataModule's class-stratified folds need), the same for both
   strategies; then ``python -m lymphnode.train experiment=scratch profile=active`` on them;
4. each further round, from the same init (scratch, the run's seed) and the same step budget:
   - active: ``python -m lymphnode.select`` with the previous round's last checkpoint over the
     pool, less the labeled squares (``exclude=<labeled cache>``), ``k=--per-round``; its
     ``selection.csv`` is what gets annotated;
   - random: ``--per-round`` tiles drawn uniformly from the same pool, less the labeled squares;
5. the table (strategy x labels, pixel P/R/F1 of each run's test metrics, the paired difference),
   the target check and the learning curves into ``<out>/results.{md,csv,json}`` and
   ``<out>/learning_curves.png``.

The annotator (:func:`annotate`) reads each square with :meth:`lymphnode.wsi.slide.Slide.read` and
rasterises its ground-truth mask with prepare's annotation reader and
:meth:`lymphnode.wsi.annotations.Annotations.mask`, and writes the labeled cache with
:class:`lymphnode.patches.cache.CacheWriter`, as prepare does for its sampled locations; the class
of a square is whether its mask has a tumour pixel (as ``cache import``). Every labeled set is also
listed in ``labels.csv`` beside its cache (slide, x, y, size in level-0 px, tumor, round, source).
A rerun skips what is finished (caches, selections and train runs resume), so a killed run
continues where it stopped.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))  # `python experiments/active/run.py` from a clone

from lymphnode.core import validate  # noqa: E402
from lymphnode.core.errors import ConfigError, LymphnodeError  # noqa: E402
from lymphnode.evaluation.runs import collect_runs  # noqa: E402
from lymphnode.evaluation.table import paired_difference  # noqa: E402
from lymphnode.inference.labelling import candidate_tiles, read_selection  # noqa: E402
from lymphnode.inference.settings import InferenceSettings  # noqa: E402
from lymphnode.inference.uncertainty import SCORES  # noqa: E402
from lymphnode.models.preprocess import Preprocess  # noqa: E402
from lymphnode.patches.build import read_annotations  # noqa: E402
from lymphnode.patches.cache import CacheWriter  # noqa: E402
from lymphnode.patches.split import SPLIT_FILE, SlideSource, find_slides  # noqa: E402
from lymphnode.wsi.geojson import QupathClasses  # noqa: E402
from lymphnode.wsi.slide import open_slide  # noqa: E402

STRATEGIES = ("random", "active")
LEVEL = 1  # the demo's patches: 128 px at level 1 (0.486 µm/px), 256 level-0 px a side
PATCH_SIZE = 128
MIN_TISSUE = 0.5  # select's default min_tissue_fraction: a candidate is at least half tissue
LABELS_CSV = "labels.csv"
LABEL_COLUMNS = ("slide", "x", "y", "size", "tumor", "round", "source")
MAX_DRAWS = 1000  # round-0 redraws before giving up (each class needs --folds patches)


@dataclass(frozen=True)
class Square:
    """One labeled tile: its slide (file stem), level-0 top-left ``(x, y)`` and side ``size`` in
    level-0 px, whether its ground-truth mask has tumour, the round it was labeled in and by
    whom (``random``, or ``active #<rank>`` of select's CSV)."""

    slide: str
    x: int
    y: int
    size: int
    tumor: int = -1
    round: int = 0
    source: str = "random"

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.slide, self.x, self.y)


def run(cmd: Sequence[str]) -> None:
    """Run one lymphnode CLI, echoing it; stop with its exit status when it fails."""
    print("+", shlex.join(cmd), flush=True)
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO)
    print(f"  ({time.perf_counter() - start:.0f} s)", flush=True)
    if done.returncode:
        raise SystemExit(done.returncode)


# ------------------------------------------------------------------------------ slides and pool
def training_slides(out: Path) -> dict[str, SlideSource]:
    """The training slides of ``<out>/caches/split.json`` (prepare's split), by name."""
    split = json.loads((out / "caches" / SPLIT_FILE).read_text())
    names = [e["name"] for e in split["train"]]
    sources = {s.name: s for s in find_slides(out / "slides", out / "annotations")}
    return {n: sources[n] for n in names}


def candidate_pool(sources: Mapping[str, SlideSource]) -> list[Square]:
    """Every candidate tile of the training slides, in slide then grid order: ``select``'s grid
    (the level and patch size of the demo checkpoints, non-overlapping, at least ``MIN_TISSUE``
    tissue), so that both strategies draw from the same set."""
    preprocess = Preprocess(level=LEVEL, patch_size=PATCH_SIZE)
    settings = InferenceSettings(min_tissue_fraction=MIN_TISSUE)
    pool: list[Square] = []
    for name, source in sources.items():
        with open_slide(source.path) as slide:
            corners, side = candidate_tiles(slide, preprocess, settings)
        pool += [Square(name, int(x), int(y), int(side)) for x, y in corners.tolist()]
    return pool


# ------------------------------------------------------------------------------------ annotator
def annotate(
    sources: Mapping[str, SlideSource], squares: Sequence[Square]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The ground truth of each square: its image, (P, P, 3) uint8 RGB read at ``LEVEL``, and
    its tumour mask, (P, P) bool, rasterised from the slide's ASAP XML (none: a normal slide, all
    0) by prepare's reader; P = ``PATCH_SIZE``. Squares are level-0 px."""
    out: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(squares)
    by_slide: dict[str, list[int]] = {}
    for i, sq in enumerate(squares):
        by_slide.setdefault(sq.slide, []).append(i)
    for name, indices in by_slide.items():
        source = sources[name]
        annotations = read_annotations(source, QupathClasses())
        with open_slide(source.path) as slide:
            ds = float(slide.level_downsamples[LEVEL])
            for i in indices:
                sq = squares[i]
                if sq.size != round(PATCH_SIZE * ds):
                    raise ConfigError(
                        f"square {sq.key} has side {sq.size} level-0 px; {PATCH_SIZE} px at "
                        f"level {LEVEL} of {source.path} is {round(PATCH_SIZE * ds)}"
                    )
                image = slide.read(sq.x, sq.y, PATCH_SIZE, PATCH_SIZE, LEVEL)
                if annotations is None or annotations.is_empty:
                    mask = np.zeros((PATCH_SIZE, PATCH_SIZE), bool)
                else:
                    mask = annotations.mask(sq.x, sq.y, sq.size, sq.size, ds)
                out[i] = (image, mask)
    return [o for o in out if o is not None]


def labeled(
    squares: Sequence[Square], truth: Sequence[tuple[np.ndarray, np.ndarray]]
) -> list[Square]:
    """``squares`` with their class from the ground-truth masks (1: a tumour pixel)."""
    return [
        Square(s.slide, s.x, s.y, s.size, int(m.any()), s.round, s.source)
        for s, (_, m) in zip(squares, truth)
    ]


def write_labeled(
    folder: Path, sources: Mapping[str, SlideSource], squares: Sequence[Square]
) -> Path:
    """``<folder>/labeled`` (a patch cache of ``squares`` with their ground-truth masks, one shard
    per slide in pool order) and ``<folder>/labels.csv``; an existing complete cache of the same
    squares is kept (CacheWriter refuses one of other squares)."""
    cache = folder / "labeled"
    config = {
        "kind": "labeled",
        "annotator": "ground truth (experiments/active/run.py)",
        "level": LEVEL,
        "mpp": None,
        "patch_size": PATCH_SIZE,
        "squares": [list(s.key) for s in squares],
    }
    writer = CacheWriter(cache, config, codec="raw", patch_size=PATCH_SIZE, has_masks=True)
    order = list(dict.fromkeys(n for n in sources if any(s.slide == n for s in squares)))
    for name in order:
        if writer.is_complete(name):
            continue
        mine = [s for s in squares if s.slide == name]
        truth = annotate(sources, mine)
        with writer.slide(name, n=len(mine)) as shard:
            for s, (image, mask) in zip(mine, truth):
                shard.add(image, mask, x=s.x, y=s.y, level=LEVEL, label=int(mask.any()))
        writer.commit(name, shard.info)
    writer.finalize(order)
    with open(folder / LABELS_CSV, "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(LABEL_COLUMNS)
        for s in squares:
            w.writerow([s.slide, s.x, s.y, s.size, s.tumor, s.round, s.source])
    return cache


def read_labels(path: Path) -> list[Square]:
    """The squares of a ``labels.csv``."""
    with open(path, newline="") as fh:
        return [
            Square(r["slide"], int(r["x"]), int(r["y"]), int(r["size"]), int(r["tumor"]),
                   int(r["round"]), r["source"])
            for r in csv.DictReader(fh)
        ]  # fmt: skip


# ------------------------------------------------------------------------------------- the rounds
def round0(
    pool: Sequence[Square], sources: Mapping[str, SlideSource], n: int, folds: int, seed: int
) -> list[Square]:
    """``n`` tiles drawn uniformly from ``pool`` with ``numpy.random.default_rng([seed, 0,
    draw])``, the first draw whose labels give each class at least ``folds`` patches (every
    validation fold needs each class)."""
    if n > len(pool):
        raise ConfigError(f"--per-round={n} is larger than the pool of {len(pool)} tissue tiles")
    for draw in range(MAX_DRAWS):
        rng = np.random.default_rng([seed, 0, draw])
        chosen = [pool[i] for i in np.sort(rng.choice(len(pool), n, replace=False))]
        squares = labeled(chosen, annotate(sources, chosen))
        tumour = sum(s.tumor for s in squares)
        if min(tumour, n - tumour) >= folds:
            print(f"seed {seed} round 0: draw {draw}, {tumour} of {n} tiles with tumour")
            return squares
    raise ConfigError(
        f"no draw of {n} tiles in {MAX_DRAWS} gave both classes {folds} patches (--folds): the "
        "pool has too few tumour (or normal) tiles; use larger slides or a larger --per-round"
    )


def train_cmd(args: argparse.Namespace, cache: Path, n: int, seed: int, run_dir: Path) -> list:
    """The fine-tuning command of one labeled set (scratch, the seed's init, the profile's budget)."""
    cmd = [
        sys.executable, "-m", "lymphnode.train", "experiment=scratch", "profile=active",
        f"hydra.searchpath=[file://{HERE / 'conf'}]", f"paths.root={args.out}",
        f"data.labeled_dir={cache}", f"data.labeled_size={n}", f"data.folds={args.folds}",
        f"seed={seed}", f"run_dir={run_dir}",
    ]  # fmt: skip
    if args.steps is not None:
        cmd += [
            f"demo_budget.finetune.max_steps={args.steps}",
            f"demo_budget.finetune.val_check_interval={min(args.steps, 25)}",
        ]
    return [*cmd, *args.override]


def train(args: argparse.Namespace, cache: Path, n: int, seed: int, run_dir: Path) -> None:
    """Fine-tune on ``cache`` unless ``run_dir`` holds a completed run (as ``skip_if_done``
    would decide, without starting a process)."""
    results = run_dir / "results.json"
    if results.is_file() and json.loads(results.read_text()).get("status") == "completed":
        print(f"= {run_dir}: completed", flush=True)
        return
    run(train_cmd(args, cache, n, seed, run_dir))


def last_checkpoint(run_dir: Path) -> Path:
    """The final step's checkpoint of a completed run (its results.json says where)."""
    results = json.loads((run_dir / "results.json").read_text())
    return Path(results["checkpoints"]["last"])


def next_round(
    args: argparse.Namespace,
    strategy: str,
    r: int,
    seed: int,
    pool: Sequence[Square],
    sources: Mapping[str, SlideSource],
    previous: Path,
) -> tuple[list[Square], Path]:
    """The labels of round ``r`` of ``strategy`` (the previous round's plus ``--per-round`` new
    ones) and its folder; ``previous`` is the previous round's folder."""
    folder = args.out / f"seed{seed}" / strategy / f"round{r}"
    if (folder / LABELS_CSV).is_file():
        return read_labels(folder / LABELS_CSV), folder
    before = read_labels(previous / LABELS_CSV)
    taken = {s.key for s in before}
    remaining = [s for s in pool if s.key not in taken]
    if args.per_round > len(remaining):
        raise ConfigError(
            f"round {r}: --per-round={args.per_round} is more than the {len(remaining)} "
            "unlabeled tiles left in the pool"
        )
    if strategy == "random":
        rng = np.random.default_rng([seed, r])
        idx = np.sort(rng.choice(len(remaining), args.per_round, replace=False))
        new = [Square(remaining[i].slide, remaining[i].x, remaining[i].y, remaining[i].size,
                      round=r, source="random") for i in idx]  # fmt: skip
    else:
        out_dir = folder / "select"
        if not (out_dir / "selection.csv").is_file():
            slides = ",".join(str(sources[n].path) for n in sources)
            run([
                sys.executable, "-m", "lymphnode.select", f"checkpoint={last_checkpoint(previous / 'run')}",
                f"slides=[{slides}]", f"out_dir={out_dir}", f"k={args.per_round}",
                f"score={args.score}", f"exclude=[{previous / 'labeled'}]",
                f"min_tissue_fraction={MIN_TISSUE}", "num_workers=0", "progress=false",
            ])  # fmt: skip
        chosen = read_selection(out_dir / "selection.csv")
        free = {s.key for s in remaining}
        outside = [(p.slide, p.x, p.y) for p in chosen if (p.slide, p.x, p.y) not in free]
        if outside:
            raise ConfigError(
                f"{out_dir / 'selection.csv'}: {len(outside)} selected squares are not unlabeled "
                f"tiles of the pool (e.g. {outside[0]}): select's candidate grid differs"
            )
        new = [Square(p.slide, p.x, p.y, p.size, round=r, source=f"active #{p.rank}")
               for p in chosen]  # fmt: skip
    squares = [*before, *labeled(new, annotate(sources, new))]
    write_labeled(folder, sources, squares)
    return squares, folder


# ---------------------------------------------------------------------------------------- table
def collect(args: argparse.Namespace, sizes: Sequence[int]) -> list[dict]:
    """One row per (seed, strategy, labels): the test pixel metrics of its run (round 0's run
    counts for both strategies) and the tumour tiles among its labels."""
    rows = []
    for seed in range(args.seeds):
        for strategy in STRATEGIES:
            for r, n in enumerate(sizes):
                folder = args.out / f"seed{seed}" / (strategy if r else "") / f"round{r}"
                (found,) = collect_runs([folder / "run"], sweeps=False)
                if found.status != "completed":
                    raise ConfigError(f"{folder / 'run'} is {found.status}: {found.error}")
                labels = read_labels(folder / LABELS_CSV)
                rows.append({
                    "seed": seed, "strategy": strategy, "labels": n,
                    **{k: found.metrics[k] for k in ("precision", "recall", "f1")},
                    "tumour_tiles": sum(s.tumor for s in labels),
                    "baseline_f1": found.baseline_f1,
                    "run_dir": str(folder / "run"),
                })  # fmt: skip
    return rows


def _values(rows: Sequence[dict], strategy: str, n: int, key: str) -> dict[tuple, float]:
    return {(r["seed"],): r[key] for r in rows if r["strategy"] == strategy and r["labels"] == n}


def _mean_sd(values: Sequence[float], scale: float = 100.0) -> str:
    v = np.asarray(values, np.float64) * scale
    sd = f"{v.std(ddof=1):.1f}" if v.size > 1 else "–"
    return f"{v.mean():.1f} ± {sd}"


def summarize(rows: Sequence[dict], sizes: Sequence[int]) -> dict:
    """Means, sds and the paired active − random differences per size (fractions), and the
    target check: does active reach random's F1 at the largest size with at most the
    second-largest number of labels (40 -> 80 -> 120: with <= 80)?"""
    table = {}
    for n in sizes:
        f1 = {s: _values(rows, s, n, "f1") for s in STRATEGIES}
        pair = paired_difference(f1["random"], f1["active"], both="strategies")
        table[n] = {
            **{
                f"{s}_{k}": float(np.mean(list(_values(rows, s, n, k).values())))
                for s in STRATEGIES
                for k in ("precision", "recall", "f1", "tumour_tiles")
            },
            **{f"{s}_f1_sd": _sd(list(f1[s].values())) for s in STRATEGIES},
            "diff_mean": pair.mean if pair else math.nan,
            "diff_sd": pair.std if pair else math.nan,
            "diff_p": pair.p_value if pair else None,
            "diff_note": pair.p_note if pair else None,
            "n": pair.n if pair else 0,
            "baseline_f1": _mean(r["baseline_f1"] for r in rows if r["labels"] == n),
        }
    target_size = sizes[-1]
    reference = table[target_size]["random_f1"]
    within = [n for n in sizes if n <= (sizes[-2] if len(sizes) > 1 else sizes[-1])]
    reached = [n for n in within if table[n]["active_f1"] >= reference]
    return {
        "sizes": list(sizes),
        "table": {str(n): v for n, v in table.items()},
        "target": {
            "random_size": target_size,
            "random_f1": reference,
            "active_max_labels": within[-1],
            "active_f1": {str(n): table[n]["active_f1"] for n in within},
            "reached_at": reached[0] if reached else None,
            "met": bool(reached),
        },
    }


def _mean(values: Iterable[float | None]) -> float:
    known = [v for v in values if v is not None]
    return float(np.mean(known)) if known else math.nan


def _sd(values: Sequence[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else math.nan


def markdown(rows: Sequence[dict], summary: Mapping, seeds: int, minutes: float) -> str:
    """The results table (%) and the target check as Markdown."""
    sizes = summary["sizes"]
    lines = [
        f"Test pixel metrics (%), mean ± sample sd over {seeds} seed(s); Δ = active − random, "
        "paired by seed (paired t-test p); tumour tiles = labeled tiles with a tumour pixel "
        "(mean); all-tumour baseline = F1 of calling every test pixel tumour. This invocation "
        f"took {minutes:.1f} min (steps finished before are skipped).",
        "",
        "| Labeled patches | Random: F1 | Active: F1 | Δ F1 (paired) | Random: P / R | "
        "Active: P / R | Tumour tiles random / active | All-tumour baseline F1 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n in sizes:
        t = summary["table"][str(n)]
        f1 = {s: list(_values(rows, s, n, "f1").values()) for s in STRATEGIES}
        if t["diff_p"] is not None:
            p = f"p={t['diff_p']:.3f}"
        else:
            p = "same runs" if n == sizes[0] else "no p"
        lines.append(
            f"| {n} | {_mean_sd(f1['random'])} | {_mean_sd(f1['active'])} | "
            f"{100 * t['diff_mean']:+.1f} ({p}, n={t['n']}) | "
            f"{100 * t['random_precision']:.1f} / {100 * t['random_recall']:.1f} | "
            f"{100 * t['active_precision']:.1f} / {100 * t['active_recall']:.1f} | "
            f"{t['random_tumour_tiles']:.1f} / {t['active_tumour_tiles']:.1f} | "
            f"{100 * t['baseline_f1']:.1f} |"
        )
    target = summary["target"]
    active = ", ".join(f"{100 * v:.1f} at {n}" for n, v in target["active_f1"].items())
    verdict = "yes" if target["met"] else "no"
    where = f" (at {target['reached_at']} labels)" if target["met"] else ""
    lines += [
        "",
        f"Target, active reaches random's {target['random_size']}-label F1 with <= "
        f"{target['active_max_labels']} labels: **{verdict}**{where}: random at "
        f"{target['random_size']} labels {100 * target['random_f1']:.1f}; active {active} "
        "(mean F1, %).",
    ]
    return "\n".join(lines) + "\n"


def write_results(
    out: Path, rows: Sequence[dict], summary: Mapping, seeds: int, minutes: float
) -> str:
    """``<out>/results.{md,csv,json}`` and ``learning_curves.png``; returns the Markdown."""
    text = markdown(rows, summary, seeds, minutes)
    (out / "results.md").write_text(text)
    with open(out / "results.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    (out / "results.json").write_text(
        json.dumps({"rows": list(rows), **summary, "minutes": minutes}, indent=2) + "\n"
    )
    plot(out / "learning_curves.png", rows, summary["sizes"])
    return text


def plot(path: Path, rows: Sequence[dict], sizes: Sequence[int]) -> None:
    """Test F1 vs labeled patches, mean ± sd over seeds, one line per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for strategy, colour in zip(STRATEGIES, ("tab:grey", "tab:red")):
        f1 = [np.asarray(list(_values(rows, strategy, n, "f1").values())) * 100 for n in sizes]
        sd = [v.std(ddof=1) if v.size > 1 else 0.0 for v in f1]
        ax.errorbar(sizes, [v.mean() for v in f1], yerr=sd, label=strategy, color=colour,
                    marker="o", capsize=3)  # fmt: skip
    ax.set_xlabel("labeled patches")
    ax.set_ylabel("test pixel F1 (%)")
    ax.set_xticks(list(sizes))
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ main
def check_args(args: argparse.Namespace) -> None:
    """ConfigError naming the option when the arguments cannot give a run (before anything runs)."""
    validate.integer("--seeds", args.seeds, 1)
    validate.integer("--rounds", args.rounds, 1)
    validate.integer("--folds", args.folds, 2)
    validate.integer("--per-round", args.per_round, 1)
    validate.integer("--slide-size", args.slide_size, 512, unit="level-0 px")
    validate.integer("--test-count", args.test_count, 1)
    if args.steps is not None:
        validate.integer("--steps", args.steps, 1)
    validate.choice("--score", args.score, SCORES)
    if args.per_round % args.folds:
        raise ConfigError(
            f"--per-round={args.per_round} is not a multiple of --folds={args.folds}: every "
            "labeled size must split into equal validation folds"
        )


def experiment(args: argparse.Namespace) -> str:
    """The whole experiment (module docstring); returns the results' Markdown."""
    check_args(args)
    os.environ.setdefault("WANDB_MODE", "offline")
    start = time.perf_counter()
    py = [sys.executable, "-m"]
    run([*py, "lymphnode.synth", f"out_dir={args.out}", f"n_tumor={args.n_tumor}",
         f"n_normal={args.n_normal}", f"width={args.slide_size}", f"height={args.slide_size}"])  # fmt: skip
    run([*py, "lymphnode.prepare", f"paths.root={args.out}", f"level={LEVEL}",
         f"patch_size={PATCH_SIZE}", "codec=raw", "caches=[test]",
         f"counts.test={args.test_count}", f"split.test_slides=[{','.join(args.test_slides)}]"])  # fmt: skip
    sources = training_slides(args.out)
    pool = candidate_pool(sources)
    sizes = [args.per_round * (r + 1) for r in range(args.rounds + 1)]
    print(f"pool: {len(pool)} tissue tiles of {len(sources)} training slides", flush=True)
    if sizes[-1] > len(pool):
        raise ConfigError(
            f"--per-round={args.per_round} x (--rounds={args.rounds} + 1) = {sizes[-1]} labels, "
            f"more than the {len(pool)} tissue tiles of the training slides: expected at most "
            f"{len(pool)} (larger --slide-size or fewer labels)"
        )
    for seed in range(args.seeds):
        folder = args.out / f"seed{seed}" / "round0"
        if not (folder / LABELS_CSV).is_file():
            squares = round0(pool, sources, args.per_round, args.folds, seed)
            write_labeled(folder, sources, squares)
        train(args, folder / "labeled", sizes[0], seed, folder / "run")
        for strategy in STRATEGIES:
            previous = folder
            for r in range(1, args.rounds + 1):
                squares, here = next_round(args, strategy, r, seed, pool, sources, previous)
                train(args, here / "labeled", len(squares), seed, here / "run")
                previous = here
    rows = collect(args, sizes)
    minutes = (time.perf_counter() - start) / 60
    text = write_results(args.out, rows, summarize(rows, sizes), args.seeds, minutes)
    print(text)
    print(f"active: done in {minutes:.1f} min; results in {args.out}")
    return text


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "outputs/active")
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1")
    parser.add_argument("--rounds", type=int, default=2, help="rounds after round 0")
    parser.add_argument("--per-round", type=int, default=40, help="labels added per round")
    parser.add_argument("--folds", type=int, default=5, help="data.folds (validation folds)")
    parser.add_argument("--steps", type=int, default=None, help="fine-tuning steps (profile's)")
    parser.add_argument("--score", default="tta", help=f"select's score: {'|'.join(SCORES)}")
    parser.add_argument("--n-tumor", type=int, default=6, help="synthetic tumour slides")
    parser.add_argument("--n-normal", type=int, default=3, help="synthetic normal slides")
    parser.add_argument("--slide-size", type=int, default=4096, help="level-0 px a side")
    parser.add_argument(
        "--test-slides", nargs="+", default=["tumor_005", "tumor_006", "normal_003"]
    )
    parser.add_argument("--test-count", type=int, default=40, help="test patches per slide")
    parser.add_argument(
        "override", nargs="*", help="extra Hydra overrides for every train run (key=value)"
    )
    args = parser.parse_args(argv)
    args.out = args.out.resolve()
    try:
        experiment(args)
    except LymphnodeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
