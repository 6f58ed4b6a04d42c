"""experiments/active/run.py end to end at toy scale (1 seed, 1 round of 10 labels, 2 folds, 2
steps, 2048² slides): the files and table it writes, that the active round labels exactly the top
k of select's CSV, that the random round draws new tiles of the same pool, and that the labeled
caches hold the ground truth of their squares."""

from __future__ import annotations

import csv
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import shapely
from script_tools import load_script

from lymphnode.inference.labelling import read_selection
from lymphnode.patches.cache import PatchCache
from lymphnode.wsi.annotations import read_asap
from lymphnode.wsi.slide import open_slide

REPO = Path(__file__).resolve().parents[1]
DRIVER = REPO / "experiments" / "active" / "run.py"
TOY = [
    "--seeds", "1", "--rounds", "1", "--per-round", "10", "--folds", "2", "--steps", "2",
    "--slide-size", "2048", "--n-tumor", "3", "--n-normal", "1", "--test-slides", "tumor_003",
    "--test-count", "8",
]  # fmt: skip


def _driver(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(DRIVER), "--out", str(out), *args],
        capture_output=True, text=True, env=env, timeout=600, cwd=REPO,
    )  # fmt: skip


def _module():
    return load_script(DRIVER, "active_run")


def _labels(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _keys(rows: list[dict]) -> list[tuple[str, int, int]]:
    return [(r["slide"], int(r["x"]), int(r["y"])) for r in rows]


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("active") / "out"
    res = _driver(out, *TOY)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return out


@pytest.mark.slow
def test_the_driver_writes_the_table_the_curves_and_one_run_per_labeled_set(toy: Path) -> None:
    for name in ("results.md", "results.csv", "results.json", "learning_curves.png"):
        assert (toy / name).is_file(), name
    with open(toy / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["strategy"], int(r["labels"])) for r in rows] == [
        ("random", 10), ("random", 20), ("active", 10), ("active", 20),
    ]  # fmt: skip
    for r in rows:  # each row is its run's test metrics
        metrics = json.loads((Path(r["run_dir"]) / "results.json").read_text())["metrics"]
        assert float(r["f1"]) == pytest.approx(metrics["test/seg_f1"])
        assert float(r["precision"]) == pytest.approx(metrics["test/seg_precision"])
    # round 0 is one run shared by both strategies; round 1 is one run per strategy
    by = {(r["strategy"], int(r["labels"])): r for r in rows}
    assert (
        by["random", 10]["run_dir"]
        == by["active", 10]["run_dir"]
        == str(toy / "seed0" / "round0" / "run")
    )
    assert by["random", 20]["run_dir"] != by["active", 20]["run_dir"]
    text = (toy / "results.md").read_text()
    assert "| Labeled patches | Random: F1 | Active: F1 | Δ F1 (paired) |" in text
    assert "| 10 | " in text and "| 20 | " in text
    met = float(by["active", 10]["f1"]) >= float(by["random", 20]["f1"])
    verdict = "yes" if met else "no"
    assert f"Target, active reaches random's 20-label F1 with <= 10 labels: **{verdict}**" in text
    summary = json.loads((toy / "results.json").read_text())
    assert summary["target"]["met"] is met and summary["sizes"] == [10, 20]


@pytest.mark.slow
def test_the_active_round_labels_exactly_the_top_k_of_selects_csv(toy: Path) -> None:
    round0 = _labels(toy / "seed0" / "round0" / "labels.csv")
    active = _labels(toy / "seed0" / "active" / "round1" / "labels.csv")
    chosen = read_selection(toy / "seed0" / "active" / "round1" / "select" / "selection.csv")
    assert [p.rank for p in chosen] == list(range(1, 11))  # k = --per-round
    assert all(a.score >= b.score for a, b in itertools.pairwise(chosen))
    assert _keys(active[:10]) == _keys(round0)  # the round-0 labels come first, unchanged
    # then select's CSV, in rank order
    assert _keys(active[10:]) == [(p.slide, p.x, p.y) for p in chosen]
    assert [r["source"] for r in active[10:]] == [f"active #{k}" for k in range(1, 11)]
    assert not set(_keys(round0)) & {(p.slide, p.x, p.y) for p in chosen}  # exclude= worked
    cache = PatchCache(toy / "seed0" / "active" / "round1" / "labeled")
    stored = {(str(r["slide"]), int(r["x"]), int(r["y"])) for r in cache.index}
    assert len(cache) == 20 and stored == set(_keys(active))


@pytest.mark.slow
def test_the_random_round_draws_new_tiles_of_the_same_pool(toy: Path) -> None:
    run = _module()
    pool = {s.key for s in run.candidate_pool(run.training_slides(toy))}
    round0 = _keys(_labels(toy / "seed0" / "round0" / "labels.csv"))
    random = _keys(_labels(toy / "seed0" / "random" / "round1" / "labels.csv"))
    active = _keys(_labels(toy / "seed0" / "active" / "round1" / "labels.csv"))
    assert random[:10] == round0 and len(set(random)) == 20  # 10 new, none labeled twice
    assert set(random) <= pool and set(active) <= pool
    assert {k[0] for k in pool} == {"tumor_001", "tumor_002", "normal_001"}  # tumor_003 held out


@pytest.mark.slow
def test_the_labeled_cache_holds_the_ground_truth_of_each_square(toy: Path) -> None:
    folder = toy / "seed0" / "active" / "round1"
    labels = {(r["slide"], int(r["x"]), int(r["y"])): int(r["tumor"]) for r in
              _labels(folder / "labels.csv")}  # fmt: skip
    cache = PatchCache(folder / "labeled")
    checked = 0
    for i, row in enumerate(cache.index):
        slide, x, y = str(row["slide"]), int(row["x"]), int(row["y"])
        image, mask = cache[i][0], cache[i][1]
        assert int(row["level"]) == 1 and image.shape == (128, 128, 3)
        # the class is whether the mask has tumour, in the index and in labels.csv
        assert int(row["label"]) == labels[slide, x, y] == int(mask.any())
        xml = toy / "annotations" / f"{slide}.xml"
        if not xml.is_file():
            assert not mask.any()  # a normal slide
            continue
        # reference: area of (tumour - exclusion) within the 256² level-0 square, in level-1 px
        ann = read_asap(xml)
        region = shapely.union_all([shapely.Polygon(p) for p in ann.tumor])
        if ann.exclusion:
            region = region.difference(
                shapely.union_all([shapely.Polygon(p) for p in ann.exclusion])
            )
        area = region.intersection(shapely.box(x, y, x + 256, y + 256)).area / 4.0
        boundary = region.boundary.intersection(shapely.box(x, y, x + 256, y + 256)).length / 2
        assert abs(int(mask.sum()) - area) <= 0.02 * area + boundary + 1, (slide, x, y)
        checked += area > 0
    assert checked >= 2  # both classes of the round-0 draw (--folds 2)
    with open_slide(toy / "slides" / f"{cache.index[0]['slide']}.tif") as slide:
        first = slide.read(int(cache.index[0]["x"]), int(cache.index[0]["y"]), 128, 128, 1)
    assert np.array_equal(cache[0][0], first)  # the square's pixels at level 1


def test_labels_per_round_must_split_into_the_folds_and_nothing_runs(tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = _driver(out, "--per-round", "7", "--folds", "5")
    assert res.returncode == 1
    assert res.stderr.strip().splitlines()[-1] == (
        "error: --per-round=7 is not a multiple of --folds=5: every labeled size must split "
        "into equal validation folds"
    )
    assert not out.exists()
    res = _driver(out, "--score", "margin")
    assert res.returncode == 1 and "--score" in res.stderr and "'margin'" in res.stderr
    assert not out.exists()
