"""experiments/benchmarks/infer_peers.py at tiny scale: the peers produce lymphnode's heatmap."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from script_tools import load_script

from lymphnode.core.errors import ConfigError

pytest.importorskip("monai", reason="MONAI is a bench extra (pip install -e .[bench])")
pytest.importorskip("psutil", reason="psutil is a bench extra (pip install -e .[bench])")

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "benchmarks" / "infer_peers.py"


@pytest.fixture(scope="module")
def peers():
    return load_script(SCRIPT, "infer_peers")


@pytest.fixture(scope="module")
def setup(peers, tmp_path_factory):
    # 1024² slide, 128-px tiles, heatmap downsample 32: 64 tile slots, about half on tissue
    return peers.prepare(
        tmp_path_factory.mktemp("peers"), size=1024, tissue=0.5, cell=256, patch_size=128,
        downsample=32, width=4, depth=2, batch_size=8, workers=0, threads=1,
    )  # fmt: skip


def test_add_tile_blocks_averages_each_cell_of_each_tile(peers):
    # two 4-px tiles on a downsample-2 grid, the second overlapping the first by one cell column
    probs = np.zeros((2, 4, 4), np.float32)
    probs[0] = np.arange(16).reshape(4, 4)  # cell (0, 0) holds 0, 1, 4, 5 -> mean 2.5
    probs[1] = 1.0
    sums = np.zeros((2, 4))
    counts = np.zeros((2, 4), np.int32)
    peers.add_tile_blocks(sums, counts, probs, np.array([[0, 0], [2, 0]]), 2)
    heat = peers.heatmap_from_sums(sums, counts)
    expected = np.array([[2.5, (4.5 + 1) / 2, 1, 0], [10.5, (12.5 + 1) / 2, 1, 0]], np.float32)
    np.testing.assert_allclose(heat, expected)
    assert counts.tolist() == [[1, 2, 1, 0], [1, 2, 1, 0]]


def test_canvas_to_heatmap_is_the_block_mean(peers):
    canvas = np.arange(8 * 12, dtype=np.float32).reshape(8, 12, 1)
    heat = peers.canvas_to_heatmap(canvas, 4, rows_per_chunk=1)
    # block (0, 0): rows 0-3, columns 0-3 -> mean of 12 * r + c = 12 * 1.5 + 1.5
    assert heat.shape == (2, 3)
    np.testing.assert_allclose(heat[0, 0], 19.5)
    np.testing.assert_allclose(heat, canvas[..., 0].reshape(2, 4, 3, 4).mean(axis=(1, 3)))


def test_monai_heatmap_equals_lymphnode_heatmap(peers, setup, tmp_path):
    ours = peers.run_peer("lymphnode", setup, tmp_path)
    theirs = peers.run_peer("monai", setup, tmp_path)
    n = len(np.load(setup.corners))
    assert 0 < n < 64 and ours["tiles"] == theirs["tiles"] == n
    assert ours["threads"] == theirs["threads"] == 1
    heat = ours["heatmap"]
    assert heat.shape == (32, 32)
    # the rescaled head makes the map vary: agreement is not agreement on a constant
    assert np.ptp(heat[heat > 0]) > 0.05
    # read tiles cover exactly the cells of the tile mask (4 x 4 cells per 128-px tile)
    mask = np.load(setup.tile_mask)
    assert ((heat > 0) == np.kron(mask, np.ones((4, 4))).astype(bool)).all()
    match = peers.agreement(theirs["heatmap"], heat)
    assert match["coverage_mismatch"] == 0
    assert match["max_abs_diff"] < 1e-5


def test_agreement_sees_a_changed_cell(peers):
    ref = np.full((4, 4), 0.5, np.float32)
    other = ref.copy()
    other[1, 2] = 0.0
    match = peers.agreement(other, ref)
    assert match["max_abs_diff"] == pytest.approx(0.5)
    assert match["coverage_mismatch"] == 1


def test_geometry_off_the_heatmap_grid_is_refused(peers, tmp_path):
    with pytest.raises(
        ConfigError, match=r"stride=48 must be a positive multiple of downsample=32"
    ):
        peers.check_geometry(1024, 128, 48, 32)
    with pytest.raises(ConfigError, match=r"size=1000 must be patch_size=128"):
        peers.check_geometry(1000, 128, 128, 8)
    with pytest.raises(ConfigError, match=r"peer='qupath' is not one of"):
        peers.run_peer("qupath", None, tmp_path)


@pytest.mark.skipif(
    not os.environ.get("LYMPHNODE_TIA_PYTHON"),
    reason="tiatoolbox needs its own venv (it pins torch < 2.13): set LYMPHNODE_TIA_PYTHON",
)
def test_tiatoolbox_heatmap_equals_lymphnode_heatmap(peers, setup, tmp_path):
    python = os.environ["LYMPHNODE_TIA_PYTHON"]
    why = peers.tia_unavailable(python)
    if why:
        pytest.skip(why)
    setup_file = setup.save(tmp_path / "setup.json")
    tia = peers.run_child("tiatoolbox", setup_file, tmp_path / "tia.json", python)
    ours = peers.run_peer("lymphnode", setup, tmp_path)
    assert tia["tiles"] == ours["tiles"]
    match = peers.agreement(np.load(tmp_path / "tia.npy"), ours["heatmap"])
    assert match["coverage_mismatch"] == 0
    assert match["max_abs_diff"] < 1e-5
