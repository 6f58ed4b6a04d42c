"""The cross-centre check (#18 §1): do the real-dev models survive other centres' stains?

    python experiments/real_dev/cross_centre.py build outputs/real_dev/slide
    python experiments/real_dev/cross_centre.py evaluate outputs/real_dev/slide [--adapt none adabn]

The real-dev labelled patches all come from one centre (Radboud UMC, CAMELYON16), so every test
figure of ``make real-dev`` is a within-centre figure. This script builds, from the real-dev
folder only, test sets that carry the stains of the CAMELYON17 centres of the unlabeled crops:

``build <root>``: for every centre ``c`` of ``<data>/unlabeled`` (``centre_<c>_...png``) and every
transfer method (``macenko``: stain-matrix transfer; ``reinhard``: CIELAB statistics transfer;
:class:`lymphnode.data.stain_transfer.StainBank`), each test patch of ``<root>/caches/test`` is
re-stained from the test set's pooled stain (the Radboud centre's, one estimate for all test
patches, so that a dark lymphocyte patch stays darker than a pale tumour patch) to the stain of
one of that centre's crops (drawn per patch, seeded by its position, so the centre's spread of
stains is kept; the crops' intensity statistics pooled, their chroma per crop), written as PNG with its unchanged mask under
``<root>/cross_centre/images/<method>_centre<c>/`` and imported with ``lymphnode.cache import``
into ``<root>/cross_centre/caches/<method>_centre<c>``. A montage of real crops beside re-stained
test patches goes to ``<root>/cross_centre/restained.jpg``.

``evaluate <root>``: every completed fine-tuning run below ``<root>/runs`` (its selected
checkpoint) predicts the unshifted test cache and every re-stained one, as the test step does
(:func:`per_slide.count_test_cache`: centre crop, the checkpoint's preprocessing, tumour where
p > threshold), with the checkpoint's BatchNorm statistics (``--adapt none``) and/or with them
re-estimated on the target test set's own patches first (``adabn``,
:func:`lymphnode.inference.adapt.adapt_batchnorm`). Writes ``cross_centre.csv`` (one row per run,
target and adaptation: TP/FP/FN, P/R/F1, the all-tumour baseline) and ``cross_centre.md`` (per
arm: within-centre F1, F1 per target centre and method, the mean over target centres, its
precision, the gap, and how many runs collapsed or fell below the all-tumour baseline).

What this proxy cannot capture: scanner optics (focus, JPEG/compression, resolution and
sharpness), tissue processing (fixation, section thickness, folds), other patients' morphology;
only colour moves. Use it for direction; a real slide of another centre is the test that counts.
"""

from __future__ import annotations

import argparse
import io
import logging
import math
import re
import shlex
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import DataLoader

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))

from per_slide import completed_runs, count_test_cache, to_csv  # noqa: E402

from lymphnode.core import atomic  # noqa: E402
from lymphnode.core.errors import EvaluationError  # noqa: E402
from lymphnode.core.records import read_record  # noqa: E402
from lymphnode.data.datasets import CacheDataset  # noqa: E402
from lymphnode.data.stain_transfer import StainBank, fit_source  # noqa: E402
from lymphnode.data.transforms import build_eval_transform  # noqa: E402
from lymphnode.evaluation.pixels import PixelCounts  # noqa: E402
from lymphnode.evaluation.runs import Run, order_arms  # noqa: E402
from lymphnode.inference.adapt import adapt_batchnorm  # noqa: E402
from lymphnode.models.checkpoint import load_inference_model  # noqa: E402
from lymphnode.patches.cache import PatchCache  # noqa: E402
from lymphnode.tasks.callbacks import all_tumour_f1  # noqa: E402

METHODS = ("macenko", "reinhard")
ADAPT = ("none", "adabn", "adabn4")  # adabn4: only the first 4 BatchNorm layers adapted
UNSHIFTED = "unshifted"
SEED = 0  # which centre crop each test patch takes its stain from
COLLAPSE_F1 = 0.05  # a run below this test F1 on a target with tumour has collapsed there
CENTRE = re.compile(r"^centre_(\d+)_")
# CAMELYON17's centre numbers (Bandi et al. 2019): 0 is Radboud UMC, the hospital of the
# real-dev labelled slides (other years), 1-4 other hospitals.
SAME_HOSPITAL = {"0"}
COLUMNS = (
    "arm", "size", "fold", "seed", "target", "method", "centre", "adapt", "tp", "fp", "fn",
    "precision", "recall", "f1", "baseline_f1", "collapsed", "below_baseline",
)  # fmt: skip


def centre_crops(unlabeled: Path) -> dict[str, list[Path]]:
    """The unlabeled crops by CAMELYON17 centre (``centre_<c>_...png``), names sorted."""
    out: dict[str, list[Path]] = defaultdict(list)
    for path in sorted(unlabeled.glob("centre_*.png")):
        match = CENTRE.match(path.name)
        if match:
            out[match.group(1)].append(path)
    if not out:
        raise EvaluationError(f"{unlabeled} holds no centre_<c>_*.png crop")
    return dict(sorted(out.items()))


def read_rgb(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB of an image file."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def target_name(method: str, centre: str) -> str:
    """``macenko_centre2``: the folder / cache name of one re-stained test set."""
    return f"{method}_centre{centre}"


def test_items(root: Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, image, mask) of every patch of ``<root>/caches/test`` in cache order; names follow
    ``<slide>_<x>_<y>.png`` (what ``cache import`` reads back)."""
    cache = PatchCache(root / "caches" / "test")
    index = cache.index
    items = []
    for i in range(len(cache)):
        image, mask = cache[i][:2]
        name = f"{index['slide'][i]}_{int(index['x'][i])}_{int(index['y'][i])}.png"
        items.append((name, np.asarray(image), np.asarray(mask)))
    return items


def run_cli(cmd: Sequence[str]) -> None:
    """Run one lymphnode CLI, echoing it; stop with its exit status when it fails."""
    print("+", shlex.join(cmd), flush=True)
    done = subprocess.run(cmd, cwd=REPO)
    if done.returncode:
        raise SystemExit(done.returncode)


def build(root: Path, data: Path, *, methods: Sequence[str] = METHODS, seed: int = SEED) -> None:
    """Re-stained copies of the test cache, one per centre and method, imported as caches."""
    crops = centre_crops(data / "unlabeled")
    items = test_items(root)
    out = root / "cross_centre"
    summaries: dict[str, Any] = {}
    for method in methods:
        for centre, paths in crops.items():
            name = target_name(method, centre)
            cache_dir = out / "caches" / name
            if (cache_dir / "manifest.json").is_file():
                print(f"{name}: cache exists, kept", flush=True)
                continue
            bank = StainBank.fit([read_rgb(p) for p in paths], method,
                                 names=[p.name for p in paths])  # fmt: skip
            summaries[name] = bank.summary()
            source = fit_source([image for _, image, _ in items], method)
            images, masks = out / "images" / name, out / "masks" / name
            images.mkdir(parents=True, exist_ok=True)
            masks.mkdir(parents=True, exist_ok=True)
            for position, (file, image, mask) in enumerate(items):
                restained = bank.restain(image, bank.index_for(position, seed), source)
                Image.fromarray(restained).save(images / file)
                Image.fromarray((mask > 0).astype(np.uint8) * 255).save(masks / file)
            run_cli([sys.executable, "-m", "lymphnode.cache", "import", str(images),
                     "--masks", str(masks), str(cache_dir)])  # fmt: skip
    if summaries:
        atomic.write_json(out / "banks.json", summaries)
    montage(out / "restained.jpg", crops, items, methods, seed)


def montage(
    path: Path,
    crops: Mapping[str, Sequence[Path]],
    items: Sequence[tuple[str, np.ndarray, np.ndarray]],
    methods: Sequence[str],
    seed: int,
    n_real: int = 2,
    n_test: int = 2,
) -> None:
    """One row per centre: ``n_real`` of its real crops, then ``n_test`` test patches re-stained
    with each method; the unshifted test patches in the first row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picks = np.linspace(0, len(items) - 1, n_test).round().astype(int).tolist()
    cols = n_real + n_test * len(methods)
    rows = len(crops) + 1
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.7 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for j, k in enumerate(picks):
        axes[0, n_real + j].imshow(items[k][1])
        axes[0, n_real + j].set_title("test (Radboud)", fontsize=7)
    for r, (centre, paths) in enumerate(crops.items(), start=1):
        for j in range(n_real):
            axes[r, j].imshow(read_rgb(paths[(j * 17) % len(paths)]))
            axes[r, j].set_title(f"real centre {centre}", fontsize=7)
        for m, method in enumerate(methods):
            bank = StainBank.fit([read_rgb(p) for p in paths], method)
            source = fit_source([image for _, image, _ in items], method)
            for j, k in enumerate(picks):
                ax = axes[r, n_real + m * n_test + j]
                ax.imshow(bank.restain(items[k][1], bank.index_for(k, seed), source))
                ax.set_title(f"{method} → c{centre}", fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    out = io.BytesIO()  # JPEG: tissue photographs, a tenth of the PNG's size
    Image.open(buffer).convert("RGB").save(out, format="JPEG", quality=85)
    atomic.write_bytes(path, out.getvalue())


# ------------------------------------------------------------------------------- evaluation
@dataclass
class Figure:
    """One run on one target test set with one adaptation."""

    run: Run
    target: str
    adapt: str
    counts: PixelCounts
    baseline_f1: float

    @property
    def method(self) -> str:
        return "" if self.target == UNSHIFTED else self.target.split("_centre")[0]

    @property
    def centre(self) -> str:
        return "" if self.target == UNSHIFTED else self.target.split("_centre")[1]

    @property
    def collapsed(self) -> bool:
        """F1 below :data:`COLLAPSE_F1` on a test set that has tumour (no tumour predicted, or
        next to none of it right)."""
        return self.counts.f1 < COLLAPSE_F1

    @property
    def below_baseline(self) -> bool:
        return self.counts.f1 < self.baseline_f1


def _targets(root: Path, only: Sequence[str] | None) -> dict[str, Path]:
    targets = {UNSHIFTED: root / "caches" / "test"}
    for cache in sorted((root / "cross_centre" / "caches").glob("*_centre*")):
        if (cache / "manifest.json").is_file():
            targets[cache.name] = cache
    if len(targets) == 1:
        raise EvaluationError(
            f"{root / 'cross_centre' / 'caches'} holds no re-stained test cache: run "
            f"`cross_centre.py build {root}` first"
        )
    if only:
        targets = {k: v for k, v in targets.items() if k == UNSHIFTED or k.split("_centre")[1]
                   in only}  # fmt: skip
    return targets


def _adapt_on(
    model: Any, cache_dir: Path, crop: int | None, batch_size: int, layers: int | None = None
) -> None:
    """AdaBN: the model's BatchNorm statistics (the first ``layers``; None: all) re-estimated on
    every patch of ``cache_dir``."""
    dataset = CacheDataset(cache_dir, None, build_eval_transform(model.preprocess, crop=crop), True)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    adapt_batchnorm(model.task, (b["image"] for b in loader), model.probabilities, layers=layers)


def _checkpoint_of(record: Mapping[str, Any], run_dir: Path) -> Path:
    best = Path(record["checkpoints"]["best"])
    return best if best.is_file() else run_dir / "checkpoints" / best.name


def _stamp(path: Path) -> list[int]:
    """What identifies a file's content cheaply: [size, mtime ns]."""
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def evaluate_run(
    run: Run,
    runs_dir: Path,
    targets: Mapping[str, Path],
    adapts: Sequence[str],
    memo: Path | None = None,
) -> list[Figure]:
    """Counts of one run's selected checkpoint on every target, for every adaptation.

    ``memo``: a JSON file of this run's counts from an earlier call; reused for the (target,
    adaptation) pairs it holds when the checkpoint and the target caches are the same files
    (size and mtime), computed and added otherwise."""
    run_dir = runs_dir / run.name
    record = read_record(run_dir / "results.json", what="results.json", error=EvaluationError)
    if record is None:
        raise EvaluationError(f"{run_dir / 'results.json'} does not exist")
    config = record["config"]
    crop = (config["data"].get("transforms") or {}).get("crop")
    batch_size = int(config["data"]["batch_size"])
    checkpoint = _checkpoint_of(record, run_dir)
    stamps = {"checkpoint": _stamp(checkpoint)}
    stamps.update({t: _stamp(c / "manifest.json") for t, c in targets.items()})
    known: dict[str, Any] = {}
    if memo is not None and memo.is_file():
        old = read_record(memo, what="cross-centre memo", error=EvaluationError) or {}
        if old.get("checkpoint") == stamps["checkpoint"]:
            known = {
                k: v
                for k, v in (old.get("counts") or {}).items()
                if old.get("stamps", {}).get(k.split("|")[0]) == stamps.get(k.split("|")[0])
            }
    model = None
    source_state: dict[str, Any] = {}
    figures = []
    for adapt in adapts:
        for target, cache_dir in targets.items():
            key = f"{target}|{adapt}"
            if key not in known:
                if model is None:
                    model = load_inference_model(checkpoint)
                    source_state = {k: v.clone() for k, v in model.task.state_dict().items()}
                model.task.load_state_dict(source_state)
                model.task.eval()
                if adapt == "adabn":
                    _adapt_on(model, cache_dir, crop, batch_size)
                elif adapt == "adabn4":
                    _adapt_on(model, cache_dir, crop, batch_size, layers=4)
                slides = count_test_cache(model, cache_dir, crop=crop, batch_size=batch_size,
                                          threshold=float(model.hparams["threshold"]))  # fmt: skip
                counts, pixels, tumour = PixelCounts(), 0, 0
                for entry in slides.values():
                    counts = counts + entry.counts
                    pixels, tumour = pixels + entry.pixels, tumour + entry.tumour_pixels
                known[key] = [counts.tp, counts.fp, counts.fn, pixels, tumour]
            tp, fp, fn, pixels, tumour = known[key]
            baseline = all_tumour_f1(tumour / pixels) if tumour else float("nan")
            figures.append(Figure(run, target, adapt, PixelCounts(tp, fp, fn), baseline))
    if memo is not None:
        memo.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_json(memo, {"checkpoint": stamps["checkpoint"], "stamps": stamps,
                                 "counts": known})  # fmt: skip
    return figures


def _number(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.6f}"


def rows_of(figures: Sequence[Figure]) -> list[dict[str, Any]]:
    """One CSV row (:data:`COLUMNS`) per figure."""
    return [
        {
            "arm": f.run.arm, "size": f.run.labeled_size, "fold": f.run.fold, "seed": f.run.seed,
            "target": f.target, "method": f.method, "centre": f.centre, "adapt": f.adapt,
            "tp": f.counts.tp, "fp": f.counts.fp, "fn": f.counts.fn,
            "precision": _number(f.counts.precision), "recall": _number(f.counts.recall),
            "f1": _number(f.counts.f1), "baseline_f1": _number(f.baseline_f1),
            "collapsed": int(f.collapsed), "below_baseline": int(f.below_baseline),
        }
        for f in figures
    ]  # fmt: skip


def _ms(values: Sequence[float]) -> str:
    if not values:
        return "–"
    arr = 100 * np.asarray(values, dtype=np.float64)
    return f"{arr.mean():.1f} ± {arr.std(ddof=1):.1f}" if arr.size > 1 else f"{arr.mean():.1f}"


def summarise(figures: Sequence[Figure], label: str = "") -> str:
    """The markdown tables: per arm × size × adaptation, F1 per target (mean ± sd over folds)."""
    groups: dict[tuple[str, int, str], list[Figure]] = defaultdict(list)
    for f in figures:
        groups[(str(f.run.arm), int(f.run.labeled_size or 0), f.adapt)].append(f)
    arms = order_arms(a for a, _, _ in groups)
    centres = sorted({f.centre for f in figures if f.centre})
    methods = sorted({f.method for f in figures if f.method})
    baseline = next((f.baseline_f1 for f in figures if f.target == UNSHIFTED), float("nan"))
    lines = [f"Cross-centre check{label}: test pixel F1 % (mean ± sd over folds; selected "
             f"checkpoint). All-tumour baseline {100 * baseline:.1f} on every target (masks "
             "unchanged).", ""]  # fmt: skip
    head = [
        "arm",
        "labels",
        "BN stats",
        "within (unshifted)",
        *(f"{m} c{c}" for m in methods for c in centres),
        "mean target F1",
        "mean target P / R",
        "gap to within",
        "collapsed / below baseline",
    ]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm in arms:
        for size in sorted({s for a, s, _ in groups if a == arm}):
            for adapt in ADAPT:
                group = groups.get((arm, size, adapt))
                if not group:
                    continue
                within = [f.counts.f1 for f in group if f.target == UNSHIFTED]
                name = {"none": "source", "adabn": "AdaBN", "adabn4": "AdaBN, 4 layers"}[adapt]
                cells = [arm, str(size), name, _ms(within)]
                for m in methods:
                    for c in centres:
                        cells.append(_ms([f.counts.f1 for f in group
                                          if f.method == m and f.centre == c]))  # fmt: skip
                shifted = [f for f in group if f.target != UNSHIFTED]
                per_run: dict[str, list[Figure]] = defaultdict(list)
                for f in shifted:
                    per_run[f.run.name].append(f)
                mean_f1 = [float(np.mean([f.counts.f1 for f in fs])) for fs in per_run.values()]
                mean_p = [float(np.mean([f.counts.precision for f in fs]))
                          for fs in per_run.values()]  # fmt: skip
                mean_r = [float(np.mean([f.counts.recall for f in fs])) for fs in per_run.values()]
                gap = (
                    (100 * (np.mean(mean_f1) - np.mean(within))) if mean_f1 and within else math.nan
                )
                bad_c = sum(f.collapsed for f in shifted)
                bad_b = sum(f.below_baseline for f in shifted)
                cells += [_ms(mean_f1), f"{_ms(mean_p)} / {_ms(mean_r)}", f"{gap:+.1f}",
                          f"{bad_c} / {bad_b} of {len(shifted)}"]  # fmt: skip
                lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Centre 0 is Radboud UMC (the labelled slides' hospital, other years); "
              "1–3 are other hospitals. Collapsed: F1 < 5 % on that target. Mean target F1: per run, the mean over every "
              "re-stained target (methods × centres), then mean ± sd over folds."]  # fmt: skip
    return "\n".join(lines) + "\n"


def evaluate(
    root: Path,
    adapts: Sequence[str],
    out: Path | None = None,
    centres: Sequence[str] | None = None,
    label: str = "",
) -> list[Figure]:
    """Evaluate every completed run of ``<root>/runs`` on every target; write csv + md."""
    runs_dir = (root / "runs").resolve()
    targets = _targets(root, centres)
    runs = completed_runs(runs_dir, "best")
    print(f"cross-centre: {len(runs)} runs × {len(targets)} targets × {list(adapts)}", flush=True)
    figures: list[Figure] = []
    for run in runs:
        start = time.perf_counter()
        memo = root / "cross_centre" / "memo" / f"{run.name.replace('/', '__')}.json"
        got = evaluate_run(run, runs_dir, targets, adapts, memo)
        figures += got
        mean = {a: np.mean([f.counts.f1 for f in got if f.adapt == a and f.target != UNSHIFTED])
                for a in adapts}  # fmt: skip
        within = {a: next(f.counts.f1 for f in got if f.adapt == a and f.target == UNSHIFTED)
                  for a in adapts}  # fmt: skip
        print(f"  {run.name}: " + ", ".join(f"{a}: within {100 * within[a]:.1f} targets "
              f"{100 * mean[a]:.1f}" for a in adapts)
              + f" ({time.perf_counter() - start:.0f} s)", flush=True)  # fmt: skip
    out = out or root / "cross_centre"
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_text(out / "cross_centre.csv", to_csv(rows_of(figures), COLUMNS))
    markdown = summarise(figures, label)
    atomic.write_text(out / "cross_centre.md", markdown)
    print(markdown + f"written: {out / 'cross_centre.csv'}, {out / 'cross_centre.md'}")
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("build", "evaluate"))
    parser.add_argument("root", type=Path, help="a protocol folder (<out>/<protocol>)")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared/data/real_dev")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--adapt", nargs="+", choices=ADAPT, default=list(ADAPT))
    parser.add_argument("--centres", nargs="+", help="only these target centres (default all)")
    parser.add_argument("--out", type=Path, help="evaluate: default <root>/cross_centre")
    parser.add_argument("--label", default="", help="evaluate: a title suffix for the table")
    args = parser.parse_args(argv)
    logging.getLogger("lymphnode.models.stain").setLevel(logging.WARNING)  # one line per crop
    if args.command == "build":
        if not (args.data / "unlabeled").is_dir():
            print(f"cross-centre: skipped, no unlabeled crops at {args.data / 'unlabeled'}")
            return 0
        build(args.root, args.data, methods=args.methods)
    else:
        evaluate(args.root, args.adapt, args.out, args.centres, args.label)
    return 0


if __name__ == "__main__":
    from lymphnode.core.boundary import cli_boundary

    sys.exit(cli_boundary(main)())
