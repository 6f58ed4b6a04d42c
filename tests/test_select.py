"""select: uncertainty scores, greedy spread-out choice, the QuPath squares and CSV, bad input,
the CLI end to end with a tiny trained checkpoint, and the loop back into prepare's GeoJSON import."""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import shapely
import torch
from shapely.geometry import shape

from lymphnode.core.errors import (
    CheckpointError,
    ConfigError,
    SlideError,
    TissueError,
)
from lymphnode.inference import labelling
from lymphnode.inference.labelling import (
    SelectedPatch,
    Selection,
    SelectSettings,
    read_selection,
    select_patches,
    write_selection,
)
from lymphnode.inference.selection import overlaps_any, select_spread
from lymphnode.inference.settings import InferenceSettings
from lymphnode.inference.uncertainty import batch_scores, binary_entropy
from lymphnode.models.checkpoint import InferenceModel
from lymphnode.models.preprocess import Preprocess
from lymphnode.patches.build import read_annotations
from lymphnode.patches.split import SlideSource
from lymphnode.tasks import ReconstructionModule
from lymphnode.wsi.geojson import QupathClasses, polygon_feature, read_features, write_geojson
from lymphnode.wsi.pyramid import write_pyramid
from lymphnode.wsi.slide import open_slide
from lymphnode.wsi.tissue import tissue_mask

TESTS = Path(__file__).resolve().parent
MPP = 2.0  # µm/px: coarse, so that the 64 × 128 px blocks pass the tissue size filter
P = 64  # px, the stub models' patch side at level 0
CPU = InferenceSettings(num_workers=0, batch_size=4, device="cpu", min_tissue_fraction=0.5)


# --- stub models whose probabilities we control ---------------------------------------------------
class _Stub(torch.nn.Module):
    """A 'task' with ``probabilities(x)`` given by ``fn`` (B, 3, H, W) -> (B, 1, H, W)."""

    def __init__(self, fn) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        self.fn = fn
        self.dummy = torch.nn.Parameter(torch.zeros(1))  # a device to live on

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def _fixed(mask: np.ndarray):  # type: ignore[no-untyped-def]
    """A model whose prediction is ``mask`` (H, W) whatever the input (not D4-invariant)."""
    m = torch.as_tensor(mask, dtype=torch.float32)
    return _Stub(lambda x: m.expand(x.shape[0], 1, *m.shape).clone())


def _red(x: torch.Tensor) -> torch.Tensor:
    """p = the red channel in 0..1 (the stub contract has mean 0, std 1): pointwise, so it
    commutes with every D4 transform."""
    return x[:, :1].clamp(0, 1)


def test_binary_entropy_matches_the_formula_in_bits() -> None:
    p = torch.tensor([0.0, 0.5, 0.25, 0.9, 1.0])
    expected = [0.0, 1.0, 0.8112781244591328, 0.4689955935892812, 0.0]
    assert binary_entropy(p).tolist() == pytest.approx(expected, abs=1e-6)
    h = -(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75))
    assert h == pytest.approx(expected[2])


def test_tta_disagreement_of_a_half_map_is_one_and_of_a_quadrant_three_quarters() -> None:
    x = torch.rand(2, 3, 8, 8)
    left = np.zeros((8, 8), np.float32)
    left[:, :4] = 1  # the D4 orbit of a half: left, right, top, bottom, each twice
    # every pixel lies in exactly one of left/right and one of top/bottom: 4 of 8 views say 1
    assert batch_scores(_fixed(left), x, "tta").tolist() == [1.0, 1.0]
    assert batch_scores(_fixed(left), x, "entropy").tolist() == [0.0, 0.0]  # plain view is 0/1
    assert batch_scores(_fixed(left), x, "tta_entropy").tolist() == [1.0, 1.0]  # (1 + H(.5)) / 2
    corner = np.zeros((8, 8), np.float32)
    corner[:4, :4] = 1  # the orbit: the 4 quadrants, each twice -> 2 of 8 views, p̄ = 1/4
    assert batch_scores(_fixed(corner), x, "tta").tolist() == pytest.approx([0.75] * 2)  # 4·3/16
    both = (0.75 + 0.8112781244591328) / 2
    assert batch_scores(_fixed(corner), x, "tta_entropy").tolist() == pytest.approx([both] * 2)


def test_a_d4_invariant_prediction_has_zero_disagreement() -> None:
    x = torch.rand(3, 3, 16, 16)
    assert batch_scores(_Stub(_red), x, "tta").tolist() == [0.0, 0.0, 0.0]
    half = _Stub(lambda x: torch.full((x.shape[0], 1, *x.shape[2:]), 0.5))
    assert batch_scores(half, x, "tta").tolist() == [0.0] * 3
    assert batch_scores(half, x, "entropy").tolist() == pytest.approx([1.0] * 3)
    assert batch_scores(half, x, "tta_entropy").tolist() == pytest.approx([0.5] * 3)
    # pointwise in the input: the entropy is the mean entropy of the red channel
    ref = binary_entropy(x[:, 0]).mean(dim=(1, 2))
    assert batch_scores(_Stub(_red), x, "entropy").tolist() == pytest.approx(ref.tolist())


# --- greedy spread-out choice ---------------------------------------------------------------------
def test_greedy_skips_neighbours_closer_than_min_distance_chebyshev() -> None:
    # one slide, a row of 6 tiles (side 10) plus one diagonal neighbour of the best
    centres = np.array([[5, 5], [15, 5], [25, 5], [35, 5], [45, 5], [55, 5], [15, 15]])
    scores = np.array([0.9, 0.95, 0.1, 0.8, 0.7, 0.2, 0.85])
    ids = np.zeros(7, int)
    # min 10: squares may touch, never overlap -> in score order all fit
    assert select_spread(scores, ids, centres, 4, min_distance=10).tolist() == [1, 0, 6, 3]
    # min 20: 1 (x 15) first; 0 (x 5) and 6 (diagonal, Chebyshev 10) too close; 3 (x 35, 20
    # away) fits; 4 (x 45) 10 from 3, no; 5 (x 55) fits; 2 (x 25) 10 from 1, no
    assert select_spread(scores, ids, centres, 3, min_distance=20).tolist() == [1, 3, 5]
    # Euclid would let the diagonal (distance 10·√2 ≈ 14.1) pass at min 12; Chebyshev does not
    assert 6 not in select_spread(scores, ids, centres, 3, min_distance=12).tolist()


def test_spacing_counts_within_a_slide_and_the_cap_holds() -> None:
    centres = np.array([[5, 5]] * 3 + [[5, 5]] * 3)  # the same spot on two slides, three times
    ids = np.array([0, 0, 0, 1, 1, 1])
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    assert select_spread(scores, ids, centres, 2, min_distance=10).tolist() == [0, 3]
    # random candidates: no two chosen of a slide within min_distance, cap respected, best first
    rng = np.random.default_rng(0)
    n = 400
    centres = rng.integers(0, 1000, (n, 2)).astype(float)
    ids = rng.integers(0, 3, n)
    scores = rng.random(n)
    chosen = select_spread(scores, ids, centres, 30, min_distance=64, per_slide_cap=10)
    assert len(chosen) == 30 and np.all(np.diff(scores[chosen]) <= 0)
    assert np.bincount(ids[chosen], minlength=3).tolist() == [10, 10, 10]
    for a in chosen:
        for b in chosen:
            if a != b and ids[a] == ids[b]:
                assert np.abs(centres[a] - centres[b]).max() >= 64
    # a skipped candidate was skipped for a reason: cap full or a better chosen one too close
    taken = set(chosen.tolist())
    last = scores[chosen[-1]]
    for i in np.flatnonzero(scores > last):
        if i in taken:
            continue
        mine = [j for j in chosen if ids[j] == ids[i] and scores[j] > scores[i]]
        near = any(np.abs(centres[j] - centres[i]).max() < 64 for j in mine)
        assert near or len(mine) >= 10


def test_k_larger_than_the_candidates_or_unreachable_is_refused_unless_allow_fewer() -> None:
    centres = np.array([[5, 5], [15, 5], [25, 5]])
    ids, scores = np.zeros(3, int), np.array([0.3, 0.2, 0.1])
    with pytest.raises(ConfigError, match=r"k=4 is larger than the 3 candidate patches"):
        select_spread(scores, ids, centres, 4, min_distance=0, allow_fewer=True)
    with pytest.raises(ConfigError, match=r"only 2 of the 3 candidates .* min_distance=20"):
        select_spread(scores, ids, centres, 3, min_distance=20)
    fewer = select_spread(scores, ids, centres, 3, min_distance=20, allow_fewer=True)
    assert fewer.tolist() == [0, 2]
    with pytest.raises(ConfigError, match=r"k must be an integer >= 1, got 0"):
        select_spread(scores, ids, centres, 0, min_distance=0)
    with pytest.raises(ConfigError, match=r"no candidate patches"):
        select_spread(np.empty(0), np.empty(0, int), np.empty((0, 2)), 1, min_distance=0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k": 0}, r"k must be an integer >= 1, got 0"),
        ({"k": -3}, r"k must be an integer >= 1, got -3"),
        ({"k": 5, "score": "bald"}, r"score must be one of \['tta', 'entropy', 'tta_entropy'\]"),
        ({"k": 5, "min_distance": -1}, r"min_distance must be a finite number >= 0"),
        ({"k": 5, "per_slide_cap": 0}, r"per_slide_cap must be an integer >= 1, got 0"),
        ({"k": 5, "color": (1, 2)}, r"color must be \[r, g, b\] integers in 0..255"),
    ],
)
def test_bad_settings_are_named(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        SelectSettings(**kwargs)


def test_overlap_with_labeled_regions_needs_positive_area() -> None:
    corners = np.array([[0, 0], [64, 0], [128, 0]])
    labeled = [shapely.box(64, 0, 128, 64)]  # exactly the second square
    assert overlaps_any(corners, 64, labeled).tolist() == [False, True, False]  # edges touch only
    assert overlaps_any(corners, 64, [shapely.box(120, 10, 130, 20)]).tolist() == [
        False, True, True,
    ]  # fmt: skip


# --- slides with known answers --------------------------------------------------------------------
UNSURE, TUMOUR, NORMAL = (128, 0, 128), (255, 0, 255), (0, 0, 200)  # red 128 -> p = 0.502


def _blocks_slide(path: Path) -> Path:
    """512 × 512, white; tissue (exact colours, lossless): an 'unsure' block x 64..192, y 64..128
    (2 tiles of 64), a 'tumour' block x 256..448, y 64..192 (6 tiles), a 'normal' block x 64..448,
    y 320..448 (12 tiles)."""
    img = np.full((512, 512, 3), 245, np.uint8)
    img[64:128, 64:192] = UNSURE
    img[64:192, 256:448] = TUMOUR
    img[320:448, 64:448] = NORMAL
    write_pyramid(path, img, mpp=MPP, tile_size=128, min_size=128, compression="deflate")
    return path


def _blank_slide(path: Path) -> Path:
    write_pyramid(path, np.full((512, 512, 3), 245, np.uint8), mpp=MPP, tile_size=128,
                  min_size=128, compression="deflate")  # fmt: skip
    return path


@pytest.fixture()
def stub_model(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """``load_inference_model`` returns the red-channel stub with a 64 px level-0 contract."""
    pre = Preprocess(level=0, patch_size=P, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    model = InferenceModel(task=_Stub(_red), preprocess=pre, hparams={})
    monkeypatch.setattr(
        "lymphnode.models.checkpoint.load_inference_model", lambda path, **kwargs: model
    )
    return model


@pytest.fixture(scope="module")
def blocks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("blocks")
    _blocks_slide(root / "blocks_a.tif")
    _blocks_slide(root / "blocks_b.tif")
    return root


def test_the_unsure_tiles_rank_first_and_the_others_score_zero(
    blocks: Path, stub_model: InferenceModel
) -> None:
    slide = blocks / "blocks_a.tif"
    sel = select_patches("stub.ckpt", [slide], SelectSettings(k=20, score="entropy"),
                         inference=CPU, progress=False)  # fmt: skip
    assert sel.candidates == {"blocks_a": 20}  # 2 + 6 + 12 tissue tiles, no white one
    top = [(p.x, p.y) for p in sel.patches[:2]]
    assert sorted(top) == [(64, 64), (128, 64)]
    h = float(binary_entropy(torch.tensor(128 / 255)))
    assert [p.score for p in sel.patches[:2]] == pytest.approx([h, h], abs=1e-5)
    assert all(p.score < 1e-5 for p in sel.patches[2:])  # p = 0 or 1 there
    assert [p.rank for p in sel.patches] == list(range(1, 21)) and {
        p.size for p in sel.patches
    } == {P}
    # TTA: the stub is pointwise, so the 8 views agree on every tile
    tta = select_patches("stub.ckpt", [slide], SelectSettings(k=3, score="tta"),
                         inference=CPU, progress=False)  # fmt: skip
    assert [p.score for p in tta.patches] == [0.0, 0.0, 0.0]
    both = select_patches("stub.ckpt", [slide], SelectSettings(k=2, score="tta_entropy"),
                          inference=CPU, progress=False)  # fmt: skip
    assert [p.score for p in both.patches] == pytest.approx([h / 2, h / 2], abs=1e-5)


def test_spacing_cap_and_exclusion_on_slides(
    blocks: Path, stub_model: InferenceModel, tmp_path: Path
) -> None:
    slides = [blocks / "blocks_a.tif", blocks / "blocks_b.tif"]
    spaced = select_patches("s", slides, SelectSettings(k=2, score="entropy", min_distance=65),
                            inference=CPU, progress=False)  # fmt: skip
    # the two unsure tiles of a slide are 64 apart: one per slide (each slide's first, x 64)
    assert [(p.slide, p.x, p.y) for p in spaced.patches] == [
        ("blocks_a", 64, 64), ("blocks_b", 64, 64),
    ]  # fmt: skip
    capped = select_patches("s", slides, SelectSettings(k=5, score="entropy", per_slide_cap=3),
                            inference=CPU, progress=False)  # fmt: skip
    per = [sum(p.slide == s for p in capped.patches) for s in ("blocks_a", "blocks_b")]
    assert sorted(per) == [2, 3]
    # exclude the unsure squares of slide a (as a previous round's GeoJSON): its best is gone
    prev = tmp_path / "prev"
    write_selection(prev, Selection([SelectedPatch(1, "blocks_a", 64, 64, P, 1.0),
                                     SelectedPatch(2, "blocks_a", 128, 64, P, 1.0)],
                                    ["blocks_a"], {"blocks_a": 20}, "entropy"))  # fmt: skip
    again = select_patches("s", slides, SelectSettings(k=3, score="entropy"), inference=CPU,
                           exclude=[prev], progress=False)  # fmt: skip
    assert again.candidates == {"blocks_a": 18, "blocks_b": 20}
    assert [(p.slide, p.x) for p in again.patches[:2]] == [("blocks_b", 64), ("blocks_b", 128)]
    with pytest.raises(ConfigError, match=r"exclude=.*other\.geojson.*named after no slide"):
        other = write_geojson(tmp_path / "other.geojson", [])
        select_patches("s", slides, SelectSettings(k=1), inference=CPU, exclude=[other],
                       progress=False)  # fmt: skip


def test_a_labeled_cache_excludes_its_patches(stub_model: InferenceModel, tmp_path: Path) -> None:
    from lymphnode.patches.cache import CacheWriter

    slide = _blocks_slide(tmp_path / "blocks_c.tif")
    cache = tmp_path / "labeled"
    writer = CacheWriter(cache, {"level": 0, "patch_size": P}, codec="raw", patch_size=P,
                         has_masks=True)  # fmt: skip
    with writer.slide("blocks_c", n=1) as shard:
        shard.add(np.zeros((P, P, 3), np.uint8), np.zeros((P, P), np.uint8), x=64, y=64,
                  level=0, label=0)  # fmt: skip
    writer.commit("blocks_c", shard.info)
    writer.finalize(["blocks_c"])
    sel = select_patches("s", [slide], SelectSettings(k=1, score="entropy"), inference=CPU,
                         exclude=[cache], progress=False)  # fmt: skip
    assert sel.candidates == {"blocks_c": 19}
    assert [(p.x, p.y) for p in sel.patches] == [(128, 64)]  # the other unsure tile


# --- bad input, each named, nothing written -------------------------------------------------------
def _pretrain_checkpoint(path: Path) -> Path:
    net = {"_target_": "lymphnode.models.UNet", "base_width": 4, "depth": 2}
    module = ReconstructionModule(net=net, preprocess=Preprocess(level=0, patch_size=P))
    ckpt = {"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    torch.save(ckpt, path)
    return path


def test_a_pretraining_checkpoint_is_refused_before_any_slide(blocks: Path, tmp_path: Path) -> None:
    ckpt = _pretrain_checkpoint(tmp_path / "pretrain.ckpt")
    with pytest.raises(CheckpointError, match=r"pretrain\.ckpt cannot rank patches: "
                       r"ReconstructionModule .* predicts no tumour probabilities"):  # fmt: skip
        select_patches(ckpt, [blocks / "blocks_a.tif"], SelectSettings(k=1), inference=CPU)


def test_a_missing_slide_is_named_before_the_checkpoint_is_read(
    blocks: Path, tmp_path: Path
) -> None:
    missing = tmp_path / "nope.tif"
    with pytest.raises(SlideError, match=r"slide not found: .*nope\.tif"):
        select_patches(tmp_path / "no.ckpt", [blocks / "blocks_a.tif", missing],
                       SelectSettings(k=1), inference=CPU)  # fmt: skip


def test_a_slide_without_tissue_gives_no_candidates(
    stub_model: InferenceModel, tmp_path: Path
) -> None:
    blank = _blank_slide(tmp_path / "blank.tif")
    with pytest.raises(TissueError, match=r"no tissue found in slide .*blank\.tif"):
        select_patches("s", [blank], SelectSettings(k=1), inference=CPU, progress=False)


def test_k_larger_than_the_candidates_fails_before_scoring(
    blocks: Path, stub_model: InferenceModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    def never(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("scored although k cannot be met")

    monkeypatch.setattr(labelling, "score_candidates", never)
    with pytest.raises(ConfigError, match=r"k=21 is larger than the 20 candidate patches of 1 "
                       r"slide\(s\) \(blocks_a: 20\)"):  # fmt: skip
        select_patches("s", [blocks / "blocks_a.tif"], SelectSettings(k=21), inference=CPU)


# --- outputs --------------------------------------------------------------------------------------
def test_geojson_squares_have_the_qupath_layout_and_the_csv_the_ranks(tmp_path: Path) -> None:
    patches = [SelectedPatch(1, "s1", 640, 320, 300, 0.875), SelectedPatch(2, "s2", 0, 900, 300, 0.5),
               SelectedPatch(3, "s1", 0, 0, 300, 0.25)]  # fmt: skip
    sel = Selection(patches, ["s1", "s2", "s3"], {"s1": 9, "s2": 4, "s3": 1}, "tta")
    written = write_selection(tmp_path, sel)
    assert sorted(p.name for p in written) == ["s1.geojson", "s2.geojson", "s3.geojson",
                                               "selection.csv"]  # fmt: skip
    data = json.loads((tmp_path / "s1.geojson").read_text())
    assert data["type"] == "FeatureCollection" and len(data["features"]) == 2
    for feature, p in zip(data["features"], [patches[0], patches[2]]):
        assert feature["type"] == "Feature" and feature["geometry"]["type"] == "Polygon"
        [ring] = feature["geometry"]["coordinates"]
        assert ring[0] == ring[-1] and len(ring) == 5  # closed
        geom = shape(feature["geometry"])
        assert geom.is_valid and geom.equals(shapely.box(p.x, p.y, p.x + 300, p.y + 300))
        props = feature["properties"]
        assert props["objectType"] == "annotation"
        assert props["classification"] == {"name": "To label", "color": [250, 200, 0]}
        assert props["measurements"] == {"Rank": p.rank, "Score": p.score}
    assert json.loads((tmp_path / "s3.geojson").read_text()) == {
        "type": "FeatureCollection", "features": []
    }  # fmt: skip
    [f2] = read_features(tmp_path / "s2.geojson")  # lymphnode's own QuPath reader
    assert f2.class_name == "To label" and f2.geometry.bounds == (0, 900, 300, 1200)
    rows = list(csv.reader((tmp_path / "selection.csv").open()))
    assert rows == [["rank", "slide", "x", "y", "size", "score"], ["1", "s1", "640", "320", "300",
                    "0.875"], ["2", "s2", "0", "900", "300", "0.5"],
                    ["3", "s1", "0", "0", "300", "0.25"]]  # fmt: skip
    assert read_selection(tmp_path / "selection.csv") == patches


# --- the CLI end to end and the loop back into prepare --------------------------------------------
def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(TESTS.parent)}
    return subprocess.run(
        [sys.executable, "-m", "lymphnode.cli", "select", *args, "num_workers=0", "progress=false",
         "device=cpu"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny fine-tuned checkpoint (32 px at level 1, tests/tiny_runs.py) and a synthetic tumour
    slide with its ASAP outlines."""
    sys.path.insert(0, str(TESTS))
    from tiny_runs import run, write_caches

    from lymphnode.synth import make_slide

    root = tmp_path_factory.mktemp("select_e2e")
    caches = write_caches(root / "caches")
    outcome, results = run(root, caches, "trainer.max_steps=4", experiment="scratch")
    assert not isinstance(outcome, BaseException), outcome
    slides = root / "slides"
    make_slide(slides / "tumor_a.tif", size=(1024, 1024), seed=11, tumor=True)
    return {"ckpt": Path(results["checkpoints"]["last"]), "slides": slides, "root": root}


def test_cli_selects_spread_squares_on_tissue_and_the_loop_closes(
    trained: dict, tmp_path: Path
) -> None:
    out = tmp_path / "to_label"
    res = _cli(f"checkpoint={trained['ckpt']}", f"slides={trained['slides']}", f"out_dir={out}",
               "k=6", "score=tta_entropy", "per_slide_cap=6")  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "selected 6 patches (tta_entropy)" in res.stdout
    chosen = read_selection(out / "selection.csv")
    assert [p.rank for p in chosen] == [1, 2, 3, 4, 5, 6]
    assert all(a.score >= b.score for a, b in itertools.pairwise(chosen))
    assert {p.size for p in chosen} == {64}  # 32 px at level 1 (downsample 2)
    for a in chosen:
        for b in chosen:
            if a is not b:
                assert max(abs(a.x - b.x), abs(a.y - b.y)) >= 64  # one patch side
    with open_slide(trained["slides"] / "tumor_a.tif") as slide:
        tissue = tissue_mask(slide)
    assert all(tissue.fraction(p.x, p.y, p.size, p.size) >= 0.5 for p in chosen)  # the default
    features = read_features(out / "tumor_a.geojson")
    assert [f.measurements["Rank"] for f in features] == [1, 2, 3, 4, 5, 6]

    # the pathologist draws a Tumor outline inside each square (a triangle in its upper left)
    # and exports the squares and the outlines from QuPath as <slide>.geojson
    drawn = [shapely.Polygon([(p.x + 4, p.y + 4), (p.x + 40, p.y + 4), (p.x + 4, p.y + 40)])
             for p in chosen]  # fmt: skip
    exported = [*json.loads((out / "tumor_a.geojson").read_text())["features"]] + [
        polygon_feature(g, name=f"tumour {i}", id_seed=f"t{i}") for i, g in enumerate(drawn)
    ]
    ann_dir = tmp_path / "annotations"
    write_geojson(ann_dir / "tumor_a.geojson", exported)
    source = SlideSource("tumor_a", trained["slides"] / "tumor_a.tif", ann_dir / "tumor_a.geojson")
    # prepare's import: the squares' class is ignored, the outlines are tumour, exactly
    classes = QupathClasses.from_config({"ignored_classes": ["Region*", "Ignore*", "To label"]})
    ann = read_annotations(source, classes)
    assert ann is not None and len(ann.tumor) == 6 and not ann.exclusion
    back = shapely.union_all([shapely.Polygon(t) for t in ann.tumor])
    assert back.symmetric_difference(shapely.union_all(drawn)).area < 1e-6
    for p in chosen:  # each square's mask holds its triangle: 1 inside, 0 beyond the hypotenuse
        m = ann.mask(p.x, p.y, p.size, p.size, 1.0)
        assert (
            m[10, 10] == 1
            and m[4 + 30, 4 + 30] == 0
            and m.sum() == pytest.approx(36 * 36 / 2, rel=0.1)
        )
    # prepare's default classes ignore the squares themselves: the same tumour regions
    again = read_annotations(source, QupathClasses())
    assert again is not None and len(again.tumor) == 6 and not again.exclusion


def test_cli_bad_input_exits_1_with_one_error_line_and_writes_nothing(
    trained: dict, tmp_path: Path
) -> None:
    out = tmp_path / "to_label"
    res = _cli(f"checkpoint={trained['ckpt']}", f"slides={trained['slides']}", f"out_dir={out}",
               "k=100000")  # fmt: skip
    assert res.returncode == 1
    assert "error: k=100000 is larger than the" in res.stderr
    assert not out.exists()
    res = _cli(f"checkpoint={trained['ckpt']}", f"slides={trained['slides']}", f"out_dir={out}",
               "k=0")  # fmt: skip
    assert res.returncode == 1 and "error: k must be an integer >= 1, got 0" in res.stderr
    assert not out.exists()
