"""The real development loop: real CAMELYON16 patches through lymphnode's own CLIs.

    python experiments/real_dev/run.py                  # both protocols (what `make real-dev` runs)
    python experiments/real_dev/run.py --protocols slide --sizes 20 --folds 5
    python experiments/real_dev/run.py --data ../shared/data/real_dev --out outputs/real_dev

For each protocol (``patch``: the paper's, a class-stratified third of the 57 patches held out with
seed 0; ``slide``: train on tumor_001 + tumor_004, test on tumor_064), it

1. writes the file lists of the pool, the test set and the unlabeled set (the CAMELYON17 crops + the
   pool images without their masks) under ``<out>/<protocol>/lists/``;
2. imports them with ``python -m lymphnode.cache import --list ...`` into
   ``<out>/<protocol>/caches/{labeled,test,unlabeled}``;
3. pretrains with every pretext of ``--pretexts`` (``python -m lymphnode.train experiment=pretrain
   pretext=<p> profile=real_dev``; default reconstruction, masked, contrastive, dense_contrastive,
   stain);
4. runs the table sweep (once per ``--variants`` arm: the recipe, or a cross-centre method in its
   own run folders), each pretext's fine-tuning (the pretrained encoder at lr × 0.1,
   ``FINETUNE_RECIPE``) and scratch (once) × sizes × folds
   (``--multirun experiment=table pretext=<p1>,<p2>,...``);
5. writes the reports (``python -m lymphnode.report``) into ``<out>/<protocol>/report/`` (the
   selected checkpoint), ``report_val_loss/`` and ``report_last/`` (the other selections);
6. the cross-centre check (``cross_centre.py``): the test set re-stained to each CAMELYON17
   centre's stain (Macenko and Reinhard transfer), every run evaluated on each with its own and
   with test-time-adapted BatchNorm statistics, into ``<out>/<protocol>/cross_centre/``; with
   ``--loco-variants`` also leave-one-centre-out arms (the centre left out of the unlabeled pool);
7. writes the per-slide figures (``per_slide.py``: test P/R/F1 on each test slide, checked against
   each run's recorded F1) into ``<out>/<protocol>/per_slide/`` and ``per_slide_last/``.

Every step but the per-slide one (this folder's script, on lymphnode's library) is a lymphnode
CLI; this script only lays out the files and prints what it runs. Finished
runs are skipped on a rerun (each CLI resumes), so a killed run continues where it stopped. When the
data folder is absent (a clone without ``../shared``) it says so and exits 0.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PROTOCOLS = ("patch", "slide")
PRETEXTS = ("reconstruction", "masked", "contrastive", "dense_contrastive", "stain")
# The fine-tuning recipe of the sweep (#10): the pretrained encoder at a tenth of the lr, the decoder
# and heads at the full lr; scratch runs ignore it. `--finetune task.pretrained_lr_scale=1` gives
# the paper's single lr (experiments/real_dev/README.md has both).
FINETUNE_RECIPE = ("task.pretrained_lr_scale=0.1", "task.pretrained_lr_scope=encoder")
# Cross-centre methods (#18 §2): each one more fine-tuning arm of the sweep, in its own run folders
# (<arm>+<method>); `--variants` picks them (experiments/real_dev/README.md has their tables).
STAIN_UNLABELED = "${paths.cache_dir}/unlabeled"
VARIANTS: dict[str, tuple[str, ...]] = {
    # HED jitter at the strong end of Tellez et al. 2019 (scale and offset ±0.2 per stain)
    "hed_strong": ("method=hed_strong", "data.transforms.hed={sigma:0.2,bias:0.2}"),
    # RandStainNA: a random stain per patch from the unlabeled pool's stain distribution
    "randstain": ("method=randstain", f"data.transforms.randstain={{cache:{STAIN_UNLABELED}}}"),
    # Reinhard normalisation to the labelled cache's stain (fitted there, applied everywhere)
    "reinhard": ("method=reinhard", "data.stain_norm={method:reinhard}"),
    # FixMatch pseudo-labels on the unlabeled pool under strong stain views
    "fixmatch": ("semi=fixmatch",),
    # RandStainNA + FixMatch
    "randstain_fixmatch": (
        "semi=fixmatch", "method=randstain_fixmatch",
        f"data.transforms.randstain={{cache:{STAIN_UNLABELED}}}",
    ),
}  # fmt: skip
SLIDE_PROTOCOL = {"pool": ("tumor_001", "tumor_004"), "test": ("tumor_064",)}
TEST_FRACTION = 1 / 3  # patch protocol: the held-out share of each class
SPLIT_SEED = 0


def slide_of(name: str) -> str:
    """``tumor_001_69916_134313.png`` -> ``tumor_001`` (the name convention <slide>_<x>_<y>)."""
    return name.rsplit("_", 2)[0]


def has_tumour(mask: Path) -> bool:
    """Whether a 0/255 mask PNG has any tumour pixel."""
    return bool((np.asarray(Image.open(mask)) > 0).any())


def split(data: Path, protocol: str) -> tuple[list[str], list[str]]:
    """(pool, test) image names of ``data/images`` for ``protocol``, each sorted.

    ``patch``: per class (a patch is tumour when its mask has a tumour pixel), a permutation seeded
    by (SPLIT_SEED, class) and its first round(n_class / 3) names are the test set. ``slide``: by
    slide name (SLIDE_PROTOCOL).
    """
    names = sorted(p.name for p in (data / "images").glob("*.png"))
    if not names:
        raise SystemExit(f"error: no PNG patches in {data / 'images'}")
    if protocol == "slide":
        pool = [n for n in names if slide_of(n) in SLIDE_PROTOCOL["pool"]]
        test = [n for n in names if slide_of(n) in SLIDE_PROTOCOL["test"]]
        return pool, test
    labels = np.array([has_tumour(data / "masks" / n) for n in names])
    test_idx: list[int] = []
    for c in (False, True):
        idx = np.flatnonzero(labels == c)
        perm = np.random.default_rng([SPLIT_SEED, int(c)]).permutation(idx)
        test_idx += perm[: round(len(idx) * TEST_FRACTION)].tolist()
    chosen = set(test_idx)
    return [n for i, n in enumerate(names) if i not in chosen], sorted(names[i] for i in chosen)


def write_list(path: Path, files: Sequence[Path]) -> Path:
    """One absolute path per line (the ``--list`` input of ``cache import``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{f.resolve()}\n" for f in files))
    return path


def run(cmd: Sequence[str]) -> None:
    """Run one lymphnode CLI, echoing it; stop with its exit status when it fails."""
    print("+", shlex.join(cmd), flush=True)
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO)
    print(f"  ({time.perf_counter() - start:.0f} s)", flush=True)
    if done.returncode:
        raise SystemExit(done.returncode)


def protocol_runs(args: argparse.Namespace, protocol: str) -> None:
    """Lists, caches, pretraining, the sweep and the report of one protocol."""
    data, root = args.data, args.out / protocol
    pool, test = split(data, protocol)
    print(f"== {protocol} protocol: pool {len(pool)} patches, test {len(test)} ==", flush=True)
    lists = root / "lists"
    images, masks = data / "images", data / "masks"
    py = [sys.executable, "-m"]
    caches = root / "caches"
    imp = [*py, "lymphnode.cache", "import"]
    masks_opt = ["--masks", str(masks)]
    if protocol == "slide":  # by slide name: filters on the images folder
        pool_in = [str(images), *[f"--include={s}_*" for s in SLIDE_PROTOCOL["pool"]]]
        test_in = [str(images), *[f"--include={s}_*" for s in SLIDE_PROTOCOL["test"]]]
    else:  # a seeded, class-stratified split: file lists
        pool_in = ["--list", str(write_list(lists / "pool.txt", [images / n for n in pool]))]
        test_in = ["--list", str(write_list(lists / "test.txt", [images / n for n in test]))]
    run([*imp, *pool_in, *masks_opt, str(caches / "labeled")])
    run([*imp, *test_in, *masks_opt, str(caches / "test")])
    # unlabeled: the CAMELYON17 crops (their names hold tile offsets, not level-0 px) + the pool
    # images without their masks
    # images without their masks (a list: include filters would drop the crops)
    pool_list = write_list(lists / "unlabeled_pool.txt", [images / n for n in pool])
    unlabeled_in = [str(data / "unlabeled"), "--list", str(pool_list), "--no-coordinates"]
    run([*imp, *unlabeled_in, str(caches / "unlabeled")])
    common = [
        f"hydra.searchpath=[file://{HERE / 'conf'}]",
        "profile=real_dev",
        f"paths.root={root}",
        *args.override,
    ]
    for pretext in args.pretexts:
        run([*py, "lymphnode.train", "experiment=pretrain", f"pretext={pretext}", *common])
    sizes = ",".join(str(s) for s in args.sizes)
    folds = ",".join(str(k) for k in range(args.folds))
    for variant in args.variants:
        run(
            [
                *py, "lymphnode.train", "--multirun", "experiment=table", *common,
                f"pretext={','.join(args.pretexts)}", f"data.labeled_size={sizes}",
                f"data.fold={folds}", *FINETUNE_RECIPE, *VARIANTS.get(variant, ()),
                *args.finetune,
            ]
        )  # fmt: skip
    # the selected checkpoint (selection=val_f1), and what val_loss and the final step would give
    for checkpoint, out in (
        ("best", "report"),
        ("val_loss", "report_val_loss"),
        ("last", "report_last"),
    ):
        report = [*py, "lymphnode.report", str(root / "runs"), "--out", str(root / out)]
        run([*report, "--checkpoint", checkpoint])
    if args.cross_centre:  # the test set re-stained to each CAMELYON17 centre (cross_centre.py)
        centre = [sys.executable, str(HERE / "cross_centre.py")]
        run([*centre, "build", str(root), "--data", str(data)])
        run([*centre, "evaluate", str(root)])
        if args.loco_variants:
            loco_runs(args, root, pool_list)
    # per-slide test figures of the selected and the final-step checkpoints (per_slide.py)
    for checkpoint in ("best", "last"):
        run(
            [
                sys.executable,
                str(HERE / "per_slide.py"),
                str(root / "runs"),
                "--checkpoint",
                checkpoint,
            ]
        )


def _link(link: Path, target: Path) -> None:
    """``link`` -> ``target`` (a relative symlink), replacing an older link."""
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink():
        link.unlink()
    if not link.exists():
        link.symlink_to(os.path.relpath(target, link.parent))


def loco_runs(args: argparse.Namespace, root: Path, pool_list: Path) -> None:
    """Leave one centre out of the unlabeled pool (#18 §1): for every CAMELYON17 centre ``c``,
    ``<root>/loco/centre<c>`` holds the protocol's labeled and test caches (links), an unlabeled
    cache without centre ``c``'s crops, the pretrainings of ``--loco-pretexts`` on it and the
    fine-tuning arms of ``--loco-variants`` (scratch only without pretexts); they are evaluated on
    centre ``c``'s re-stained test sets only (links to ``<root>/cross_centre/caches``): a centre
    whose stain neither the pretraining nor RandStainNA nor FixMatch saw."""
    sys.path.insert(0, str(HERE))
    from cross_centre import METHODS, centre_crops, target_name

    py = [sys.executable, "-m"]
    sizes = ",".join(str(s) for s in args.sizes)
    folds = ",".join(str(k) for k in range(args.folds))
    for centre in centre_crops(args.data / "unlabeled"):
        loco = root / "loco" / f"centre{centre}"
        print(f"== leave centre {centre} out: {loco} ==", flush=True)
        for name in ("labeled", "test"):
            _link(loco / "caches" / name, root / "caches" / name)
        for method in METHODS:
            name = target_name(method, centre)
            _link(loco / "cross_centre" / "caches" / name, root / "cross_centre" / "caches" / name)
        run([
            *py, "lymphnode.cache", "import", str(args.data / "unlabeled"), "--list",
            str(pool_list), "--no-coordinates", f"--exclude=centre_{centre}_*",
            str(loco / "caches" / "unlabeled"),
        ])  # fmt: skip
        common = [f"hydra.searchpath=[file://{HERE / 'conf'}]", "profile=real_dev",
                  f"paths.root={loco}", *args.override]  # fmt: skip
        for pretext in args.loco_pretexts:
            run([*py, "lymphnode.train", "experiment=pretrain", f"pretext={pretext}", *common])
        arms = (
            [f"pretext={','.join(args.loco_pretexts)}"] if args.loco_pretexts else ["init=scratch"]
        )
        for variant in args.loco_variants:
            run([
                *py, "lymphnode.train", "--multirun", "experiment=table", *common, *arms,
                f"data.labeled_size={sizes}", f"data.fold={folds}", *FINETUNE_RECIPE,
                *VARIANTS.get(variant, ()), *args.finetune,
            ])  # fmt: skip
        run([sys.executable, str(HERE / "cross_centre.py"), "evaluate", str(loco), "--centres",
             centre, "--label", f" (centre {centre} left out of the unlabeled pool)"])  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared/data/real_dev")
    parser.add_argument("--out", type=Path, default=REPO / "outputs/real_dev")
    parser.add_argument("--protocols", nargs="+", choices=PROTOCOLS, default=list(PROTOCOLS))
    parser.add_argument("--sizes", nargs="+", type=int, default=[10, 20, 30])
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--pretexts", nargs="+", choices=PRETEXTS, default=list(PRETEXTS))
    parser.add_argument(
        "--finetune",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a Hydra override for the fine-tuning sweep only (not the pretrainings), after "
        "the sweep's recipe (FINETUNE_RECIPE), e.g. --finetune task.pretrained_lr_scale=1; "
        "repeatable",
    )
    parser.add_argument(
        "--variants",
        nargs="*",
        choices=["default", *VARIANTS],
        default=["default"],
        help="fine-tuning arms beside the recipe's (each its own run folders): default (the "
        "recipe alone), " + ", ".join(VARIANTS) + "; none: no sweep (reports only)",
    )
    parser.add_argument(
        "--loco-variants",
        nargs="*",
        choices=["default", *VARIANTS],
        default=[],
        help="leave-one-centre-out: these fine-tuning arms again with each CAMELYON17 centre left "
        "out of the unlabeled pool, tested on that centre (default: none)",
    )
    parser.add_argument(
        "--loco-pretexts",
        nargs="*",
        choices=PRETEXTS,
        default=[],
        help="leave-one-centre-out: pretrain these pretexts without the centre (default: none, "
        "scratch arms only)",
    )
    parser.add_argument(
        "--no-cross-centre",
        dest="cross_centre",
        action="store_false",
        help="skip the cross-centre check (cross_centre.py build + evaluate)",
    )
    parser.add_argument(
        "override", nargs="*", help="extra Hydra overrides for every train run (key=value)"
    )
    args = parser.parse_args(argv)
    if not (args.data / "images").is_dir():
        print(
            f"real-dev: skipped, the real development set is not at {args.data} (it comes with "
            "../shared beside the project; pass --data DIR to point elsewhere)"
        )
        return 0
    os.environ.setdefault("WANDB_MODE", "offline")
    start = time.perf_counter()
    for protocol in args.protocols:
        protocol_runs(args, protocol)
    print(
        f"real-dev: done in {(time.perf_counter() - start) / 60:.1f} min; reports under {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
