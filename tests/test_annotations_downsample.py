"""``annotations_downsample``: level-0 outlines on a slide file that holds a lower level.

The real fixture is CAMELYON16 tumor_001's level-5 page (3072 x 7168 px, downsample 32) with the
official level-0 XML. Every stage that reads outlines (prepare, to-mask, evaluate, infer) accepts
it with ``annotations_downsample=32`` and gives the same patches / masks / lesions as the XML
rescaled by hand; without the key each refuses with one message naming the file, the bounding
box, the slide size and the key (evaluate used to score "0/0 lesions" and exit 0).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from lymphnode.core.errors import AnnotationError, ConfigError
from lymphnode.evaluation.camelyon16 import EvaluationSettings, evaluate
from lymphnode.inference.heatmap import Heatmap, heatmap_path, write_heatmap
from lymphnode.wsi.annotations import Annotations, read_asap, write_asap

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PAGE = "slides/camelyon16_tumor_001_level5.tif"
XML = "annotations/tumor_001.xml"
PAGE_SIZE = (3072, 7168)  # the level-5 page, px
PAGE_MPP = 0.243 * 32  # µm/px of the page
REFUSAL = r"tumor_001\.xml: tumor annotation .* has bounding box x .*3072 x 7168 px.*annotations_downsample=32"


@pytest.fixture()
def roots(real_fixtures: Path, tmp_path: Path) -> dict[str, Path]:
    """``level0``: the page + the official XML; ``rescaled``: the page + the XML divided by 32."""
    out = {}
    for name in ("level0", "rescaled"):
        root = tmp_path / name
        (root / "slides").mkdir(parents=True)
        (root / "annotations").mkdir()
        (root / "slides" / "tumor_001.tif").symlink_to(real_fixtures / PAGE)
        out[name] = root
    (out["level0"] / "annotations" / "tumor_001.xml").symlink_to(real_fixtures / XML)
    official = read_asap(real_fixtures / XML)
    write_asap(
        out["rescaled"] / "annotations" / "tumor_001.xml",
        [p / 32 for p in official.tumor],
        [p / 32 for p in official.exclusion],
    )
    return out


def _run(*cmd: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", *cmd], cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, timeout=300,
    )  # fmt: skip


def _refused(result: subprocess.CompletedProcess, pattern: str = REFUSAL) -> None:
    import re

    assert result.returncode == 1, result.stdout
    errors = [line for line in result.stdout.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stdout
    assert re.search(pattern, errors[0]), errors[0]
    assert "Traceback" not in result.stdout


def test_scaled_divides_every_vertex_and_refuses_a_bad_factor() -> None:
    a = Annotations(
        [np.array([[0, 0], [64, 0], [64, 32]])], [np.array([[8, 8], [16, 8], [16, 16]])]
    )
    s = a.scaled(32)
    assert s.bounds() == (0.0, 0.0, 2.0, 1.0)
    assert np.array_equal(s.exclusion[0], [[0.25, 0.25], [0.5, 0.25], [0.5, 0.5]])
    assert a.scaled(1) is a
    for bad in (0, -2, float("nan"), "32"):
        with pytest.raises(ConfigError, match="annotations_downsample"):
            a.scaled(bad)  # type: ignore[arg-type]


PREPARE = [
    "patch_size=16", "counts.labeled=4", "codec=raw", "workers=0", "caches=[labeled]",
    "split.test_slides=[]",
]  # fmt: skip


def test_prepare_reads_level0_xml_on_the_level5_page_as_the_rescaled_xml(
    roots: dict[str, Path],
) -> None:
    refused = _run("lymphnode.prepare", f"paths.root={roots['level0']}", *PREPARE)
    _refused(refused)
    keyed = _run(
        "lymphnode.prepare", f"paths.root={roots['level0']}", *PREPARE, "force=true",
        "annotations_downsample=32",
    )  # fmt: skip
    assert keyed.returncode == 0, keyed.stdout
    by_hand = _run("lymphnode.prepare", f"paths.root={roots['rescaled']}", *PREPARE)
    assert by_hand.returncode == 0, by_hand.stdout
    shard = Path("caches/labeled/shards/tumor_001")
    for part in ("images", "masks", "index"):
        a = np.load(roots["level0"] / shard / f"{part}.npy")
        b = np.load(roots["rescaled"] / shard / f"{part}.npy")
        assert np.array_equal(a, b), part
    assert np.load(roots["level0"] / shard / "masks.npy").any()  # tumour patches were labelled


def test_to_mask_cli_with_the_key_equals_the_rescaled_xml(
    roots: dict[str, Path], tmp_path: Path
) -> None:
    from lymphnode.annotations import main

    slide = roots["level0"] / "slides" / "tumor_001.tif"
    keyed, by_hand = tmp_path / "keyed.tif", tmp_path / "by_hand.tif"
    argv = ["to-mask", str(slide), str(roots["level0"] / "annotations" / "tumor_001.xml")]
    assert main([*argv, str(keyed), "--level", "0", "--annotations-downsample", "32"]) == 0
    rescaled = roots["rescaled"] / "annotations" / "tumor_001.xml"
    assert main(["to-mask", str(slide), str(rescaled), str(by_hand)]) == 0
    a, b = tifffile.imread(keyed), tifffile.imread(by_hand)
    assert a.shape == (PAGE_SIZE[1], PAGE_SIZE[0])
    assert np.array_equal(a, b)
    assert 1000 < int((a == 255).sum()) < a.size // 10  # the two metastases, not the slide
    bad = _run("lymphnode.annotations", *argv, str(tmp_path / "refused.tif"))
    _refused(bad, REFUSAL.replace("annotations_downsample", "--annotations-downsample"))
    assert not (tmp_path / "refused.tif").exists()


def _heatmap_dir(roots: dict[str, Path], tmp_path: Path) -> Path:
    """A heatmap of the page at downsample 8 that is hot exactly on the rescaled outlines."""
    truth = read_asap(roots["rescaled"] / "annotations" / "tumor_001.xml")
    probs = truth.mask(0, 0, *PAGE_SIZE, downsample=8).astype(np.float32) * 0.9
    heat = tmp_path / "heatmaps"
    heat.mkdir()
    write_heatmap(
        heatmap_path(heat, "tumor_001"), Heatmap("tumor_001", probs, 8.0, PAGE_SIZE, PAGE_MPP)
    )
    return heat


def test_evaluate_scores_the_level0_xml_with_the_key_and_refuses_it_without(
    roots: dict[str, Path], tmp_path: Path
) -> None:
    heat = _heatmap_dir(roots, tmp_path)
    keyed = evaluate(
        heat, roots["level0"] / "annotations", tmp_path / "keyed",
        settings=EvaluationSettings(annotations_downsample=32),
    )  # fmt: skip
    by_hand = evaluate(heat, roots["rescaled"] / "annotations", tmp_path / "by_hand")
    row_keyed, row_by_hand = keyed["slides"][0], by_hand["slides"][0]
    assert row_keyed["lesions"] == row_by_hand["lesions"] >= 1
    assert row_keyed["lesions_hit"] == row_by_hand["lesions_hit"] == row_keyed["lesions"]
    assert row_keyed["pixel_tp"] == row_by_hand["pixel_tp"] > 0
    assert keyed["pixel_f1"] == by_hand["pixel_f1"]
    with pytest.raises(AnnotationError, match=r"3072 x 7168 px.*annotations_downsample=32"):
        evaluate(heat, roots["level0"] / "annotations", tmp_path / "refused")
    cli = _run(
        "lymphnode.evaluate", f"heatmaps={heat}", f"annotations={roots['level0'] / 'annotations'}",
        f"out_dir={tmp_path / 'cli'}",
    )  # fmt: skip
    _refused(cli)  # it used to print "0/0 lesions", pixel F1 0.000, and exit 0
    assert not (tmp_path / "cli" / "evaluation.json").exists()


def test_infer_outlines_take_the_key_and_refuse_outlines_outside_the_slide(
    roots: dict[str, Path],
) -> None:
    from lymphnode.infer import _outlines

    slide = roots["level0"] / "slides" / "tumor_001.tif"
    keyed = _outlines([slide], roots["level0"] / "annotations", 32)[slide]
    by_hand = _outlines([slide], roots["rescaled"] / "annotations", 1)[slide]
    assert len(keyed.tumor) == len(by_hand.tumor) == 2
    for a, b in zip(keyed.tumor, by_hand.tumor):
        assert np.allclose(a, b)
    with pytest.raises(AnnotationError, match=r"3072 x 7168 px.*annotations_downsample=32"):
        _outlines([slide], roots["level0"] / "annotations", 1)
