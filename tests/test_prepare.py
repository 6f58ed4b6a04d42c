"""Tests of ``python -m lymphnode.prepare``: slides (+ XML) → unlabeled, labeled and test caches.

Every test runs the real CLI in a subprocess on tiny synthetic slides (2048², made once per
session with lymphnode.synth) and bad inputs made next to them.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

from lymphnode.core.errors import ConfigError
from lymphnode.patches.cache import PatchCache
from lymphnode.synth import make_slide
from lymphnode.wsi.annotations import write_asap
from lymphnode.wsi.pyramid import write_pyramid

PROJECT_ROOT = Path(__file__).resolve().parents[1]
TUMOR = ("tumor_001", "tumor_002", "tumor_003")
NORMAL = ("normal_001", "normal_002")
SIZE = (2048, 2048)
# Small and fast: 64 px patches at level 0, a few per slide, raw codec, one process.
FAST = [
    "patch_size=64",
    "counts.unlabeled=6",
    "counts.labeled=6",
    "counts.test=4",
    "codec=raw",
    "workers=0",
    "split.test_slides=[tumor_003,normal_002]",
]


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 tumor (with ASAP XML) + 2 normal synthetic 2048² slides: <root>/slides, <root>/annotations."""
    root = tmp_path_factory.mktemp("synthetic")
    for i, name in enumerate(TUMOR + NORMAL):
        tumor = name.startswith("tumor")
        make_slide(
            root / "slides" / f"{name}.tif",
            seed=100 + i,
            tumor=tumor,
            size=SIZE,
            annotation_path=root / "annotations" / f"{name}.xml" if tumor else None,
        )
    return root


@pytest.fixture
def data(synthetic: Path, tmp_path: Path) -> Path:
    """A fresh root whose slides/ and annotations/ link to the session's slides (add bad ones)."""
    root = tmp_path / "data"
    for sub in ("slides", "annotations"):
        (root / sub).mkdir(parents=True)
        for f in (synthetic / sub).iterdir():
            (root / sub / f.name).symlink_to(f)
    return root


def prepare(root: Path, *overrides: str, fast: bool = True, limit_file_bytes: int | None = None):
    """Run the CLI; returns the CompletedProcess (stdout and stderr together in .stdout)."""
    cmd = [sys.executable, "-m", "lymphnode.prepare", f"paths.root={root}"]
    cmd += (FAST if fast else []) + list(overrides)

    def limit() -> None:  # runs in the child: files beyond this size fail with EFBIG
        if limit_file_bytes is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_file_bytes, limit_file_bytes))

    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        cmd,
        cwd=PROJECT_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=180,
        preexec_fn=limit,
    )


def failed(result: subprocess.CompletedProcess, pattern: str) -> None:
    """The run exited non-zero and its output says ``pattern`` (a regex)."""
    import re

    assert result.returncode != 0, result.stdout
    assert re.search(pattern, result.stdout, re.S), result.stdout
    assert "Traceback" not in result.stdout, result.stdout


def no_temp_left(cache_dir: Path) -> None:
    leftovers = [p for p in cache_dir.rglob("*") if p.name.startswith((".tmp-", ".manifest"))]
    assert not leftovers


# ----------------------------------------------------------------------------------------------
# end to end


@pytest.mark.slow
def test_builds_three_readable_caches_with_a_disjoint_split(
    synthetic: Path, tmp_path: Path
) -> None:
    out = tmp_path / "caches"
    result = prepare(
        synthetic,
        f"paths.cache_dir={out}",
        "patch_size=96",
        "counts.unlabeled=12",
        "counts.labeled=20",
        "counts.test=10",
        "codec=jpeg",
        "workers=2",
        fast=False,
    )
    assert result.returncode == 0, result.stdout

    split = json.loads((out / "split.json").read_text())
    train = {e["name"] for e in split["train"]}
    test = {e["name"] for e in split["test"]}
    assert train | test == set(TUMOR + NORMAL) and not train & test
    assert {n[:5] for n in test} == {"tumor", "norma"}  # 0.2 of each group, at least one

    unlabeled, labeled, held = (PatchCache(out / k) for k in ("unlabeled", "labeled", "test"))
    assert set(unlabeled.slides) == train and len(unlabeled) == 12 * len(train)
    assert not unlabeled.has_masks and set(unlabeled.labels) == {-1}
    assert set(labeled.slides) == {n for n in train if n.startswith("tumor")}
    assert set(held.slides) == test
    for cache in (labeled, held):
        assert cache.has_masks and cache.patch_size == 96
        for i in range(len(cache)):
            image, mask = cache[i]
            assert image.shape == (96, 96, 3) and mask.shape == (96, 96)
            if cache.index["label"][i] == 1:
                assert mask[24:72, 24:72].mean() >= 0.5
            else:
                assert not mask.any()
    share = labeled.labels.mean()
    assert 0.25 < share < 0.75  # 40 patches, p = 0.5
    normal_test = held.index["label"][held.index["slide"] == next(n for n in test if "normal" in n)]
    assert len(normal_test) == 10 and not normal_test.any()
    assert "prepare: 100%" in result.stdout  # the progress bar

    # A rerun with the same config skips every slide and changes nothing.
    before = {p: p.read_bytes() for p in out.rglob("manifest.json")}
    again = prepare(
        synthetic,
        f"paths.cache_dir={out}",
        "patch_size=96",
        "counts.unlabeled=12",
        "counts.labeled=20",
        "counts.test=10",
        "codec=jpeg",
        "workers=2",
        fast=False,
    )
    assert again.returncode == 0, again.stdout
    assert "5 slides already complete in every cache: skipped" in again.stdout
    assert {p: p.read_bytes() for p in out.rglob("manifest.json")} == before


@pytest.mark.slow
def test_one_worker_and_two_workers_write_the_same_bytes(data: Path, tmp_path: Path) -> None:
    one = prepare(data, f"paths.cache_dir={tmp_path / 'one'}", "workers=1")
    two = prepare(data, f"paths.cache_dir={tmp_path / 'two'}", "workers=2")
    assert one.returncode == 0 and two.returncode == 0, one.stdout + two.stdout
    for kind in ("unlabeled", "labeled", "test"):
        a = (tmp_path / "one" / kind / "manifest.json").read_text()
        b = (tmp_path / "two" / kind / "manifest.json").read_text()
        assert a == b  # the manifest holds every shard file's SHA-256


@pytest.mark.slow
def test_a_build_killed_mid_way_resumes_to_the_same_bytes(data: Path, tmp_path: Path) -> None:
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "lymphnode.prepare", f"paths.root={data}"]
    cmd += [*FAST, f"paths.cache_dir={killed}", "workers=1", "counts.unlabeled=200"]
    proc = subprocess.Popen(
        cmd,
        cwd=PROJECT_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    manifest = killed / "unlabeled" / "manifest.json"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if manifest.is_file() and json.loads(manifest.read_text())["slides"]:
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(json.loads(manifest.read_text())["slides"]) < 3  # it was stopped part way

    resumed = prepare(data, f"paths.cache_dir={killed}", "counts.unlabeled=200")
    assert resumed.returncode == 0, resumed.stdout
    clean = tmp_path / "clean"
    redo = prepare(data, f"paths.cache_dir={clean}", "counts.unlabeled=200")
    assert redo.returncode == 0, redo.stdout
    for kind in ("unlabeled", "labeled", "test"):
        # The manifest holds every shard file's SHA-256.
        assert (killed / kind / "manifest.json").read_bytes() == (
            clean / kind / "manifest.json"
        ).read_bytes()
    no_temp_left(killed)


def test_a_rerun_after_a_config_change_refuses_naming_the_key_and_force_rebuilds(
    data: Path,
) -> None:
    assert prepare(data).returncode == 0
    changed = prepare(data, "counts.labeled=4")
    failed(changed, r"labeled was built with another configuration \(config\.count: 6 → 4\)")
    failed(changed, r"force=true")
    assert len(PatchCache(data / "caches" / "labeled")) == 2 * 6  # untouched

    rebuilt = prepare(data, "counts.labeled=4", "force=true")
    assert rebuilt.returncode == 0, rebuilt.stdout
    assert len(PatchCache(data / "caches" / "labeled")) == 2 * 4


def test_a_changed_split_refuses_without_force(data: Path) -> None:
    assert prepare(data, "caches=[unlabeled]").returncode == 0
    moved = prepare(data, "caches=[unlabeled]", "split.test_slides=[tumor_001]")
    failed(moved, r"another configuration \(config\.slides")


def test_mpp_picks_the_level_to_read(data: Path) -> None:
    # The synthetic slides are 0.243 µm/px at level 0: 0.486 µm/px is level 1 (downsample 2).
    assert prepare(data, "caches=[labeled]", "mpp=0.486").returncode == 0
    cache = PatchCache(data / "caches" / "labeled")
    assert set(cache.index["level"]) == {1}
    x = cache.index["x"]
    assert x.max() <= SIZE[0] - 2 * 64  # 64 px at level 1 span 128 level-0 px
    failed(prepare(data, "caches=[test]", "mpp=0.35"), r"no level at 0\.35 µm/px.*level 1: 0\.486")


def test_only_the_requested_caches_are_built(data: Path) -> None:
    assert prepare(data, "caches=[unlabeled]").returncode == 0
    assert sorted(p.name for p in (data / "caches").iterdir() if not p.name.startswith(".")) == [
        "split.json",
        "unlabeled",
    ]


# ----------------------------------------------------------------------------------------------
# bad input: a clear message naming the input, exit code 1, finished slides kept


def test_a_test_slide_that_does_not_exist_is_named(data: Path) -> None:
    result = prepare(data, "split.test_slides=[tumor_009]")
    failed(
        result,
        r"split\.test_slides names slides that are not in paths\.slides_dir: \['tumor_009'\]",
    )


def test_a_missing_slides_folder_is_named(tmp_path: Path) -> None:
    failed(prepare(tmp_path / "nowhere"), r"paths\.slides_dir .*nowhere/slides is not a directory")


def test_a_slide_that_vanished_is_a_slide_error(data: Path) -> None:
    (data / "slides" / "zz_gone.tif").symlink_to(data / "no-such-file.tif")
    result = prepare(data)
    failed(result, r"zz_gone\.tif")
    failed(result, r"error: .*(does not exist|not found|No such file)")


def test_an_unopenable_slide_is_named_and_finished_slides_are_kept(data: Path) -> None:
    (data / "slides" / "zz_notes.tif").write_text("not a slide\n")
    result = prepare(data)
    failed(result, r"error: cannot open slide .*zz_notes\.tif: it is not a slide format")
    kept = PatchCache(data / "caches" / "unlabeled")
    assert set(kept.slides) == {"normal_001", "tumor_001", "tumor_002"}  # the earlier slides
    no_temp_left(data / "caches")


def test_a_truncated_slide_is_named(data: Path, synthetic: Path) -> None:
    whole = (synthetic / "slides" / "normal_001.tif").read_bytes()
    (data / "slides" / "zz_cut.tif").write_bytes(whole[: len(whole) // 2])
    failed(prepare(data), r"error: .*zz_cut\.tif.*truncated")
    no_temp_left(data / "caches")


def test_a_stripped_tiff_is_named(data: Path) -> None:
    tifffile.imwrite(data / "slides" / "zz_strips.tif", np.full((512, 512, 3), 200, np.uint8))
    failed(prepare(data), r"zz_strips\.tif: it is a stripped \(non-tiled\) TIFF")


def test_malformed_xml_is_named(data: Path) -> None:
    (data / "annotations" / "tumor_001.xml").unlink()
    (data / "annotations" / "tumor_001.xml").write_text("<ASAP_Annotations><Annotations>")
    failed(prepare(data), r"error: .*annotations/tumor_001\.xml")


def test_an_xml_entity_bomb_is_refused(data: Path) -> None:
    bomb = """<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
]>
<ASAP_Annotations><Annotations><Annotation Name="&lol3;" Type="Polygon" PartOfGroup="_0">
<Coordinates/></Annotation></Annotations></ASAP_Annotations>
"""
    (data / "annotations" / "tumor_002.xml").unlink()
    (data / "annotations" / "tumor_002.xml").write_text(bomb)
    failed(prepare(data), r"tumor_002\.xml: refused unsafe XML")


def test_an_annotation_outside_the_slide_is_named(data: Path) -> None:
    (data / "annotations" / "tumor_001.xml").unlink()
    write_asap(
        data / "annotations" / "tumor_001.xml", [np.array([[100, 100], [5000, 100], [5000, 900]])]
    )
    failed(prepare(data), r"tumor_001\.xml: tumor annotation .* outside slide .*tumor_001\.tif")


def test_a_slide_without_tissue_is_named(data: Path) -> None:
    write_pyramid(
        data / "slides" / "zz_blank.tif", np.full((1024, 1024, 3), 245, np.uint8), mpp=0.243
    )
    failed(prepare(data), r"zz_blank\.tif.*no tissue")


def test_a_tumor_quota_no_slide_can_meet_is_a_sampling_error(data: Path) -> None:
    # Every annotated slide has lesions smaller than a patch's central region.
    for name in ("tumor_001", "tumor_002", "tumor_003"):
        (data / "annotations" / f"{name}.xml").unlink()
        write_asap(
            data / "annotations" / f"{name}.xml",
            [np.array([[1000, 1000], [1010, 1000], [1010, 1010]])],
        )
    result = prepare(data, "sampling.max_tries=300")
    failed(
        result,
        r"error: slide .*tumor_00\d\.tif \((labeled|test) cache\): could not sample",
    )
    failed(result, r"found tumor 0/\d+, non-tumor \d+/\d+")


def test_a_disk_that_fills_mid_write_names_the_slide_and_keeps_finished_slides(data: Path) -> None:
    # Files may not grow past 100 kB: the unlabeled shards (6 x 64² x 3 = 74 kB) fit, the labeled
    # ones (40 patches: 492 kB) do not.
    result = prepare(data, "counts.labeled=40", limit_file_bytes=100_000)
    failed(result, r"cannot write slide 'tumor_001' of patch cache .*labeled: .*File too large")
    assert "normal_001" in PatchCache(data / "caches" / "unlabeled").slides
    assert len(PatchCache(data / "caches" / "labeled")) == 0
    no_temp_left(data / "caches")
    # With room again the build resumes and completes.
    resumed = prepare(data, "counts.labeled=40")
    assert resumed.returncode == 0, resumed.stdout
    assert len(PatchCache(data / "caches" / "labeled")) == 2 * 40


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("codec=png", r"codec must be one of \['raw', 'jpeg'\], got 'png'"),
        ("caches=[unlabeled,everything]", r"caches must be a non-empty subset of"),
        ("counts.test=-1", r"counts\.test must be an integer >= 0, got -1"),
        ("level=7", r"has levels 0-4 .*level=7 was requested"),
        (
            "split.test_slides=[tumor_001,tumor_002,tumor_003]",
            r"the labeled cache would hold no slide: the split has no annotated training slide",
        ),
    ],
)
def test_bad_settings_are_named(data: Path, override: str, match: str) -> None:
    failed(prepare(data, override), match)


def test_an_unknown_sampling_key_is_refused_by_name() -> None:
    from lymphnode.patches.build import settings_from_config

    cfg = {"caches": ["test"], "codec": "raw", "counts": {"test": 1}, "patch_size": 8, "level": 0,
           "workers": 0, "sampling": {"max_triess": 3}}  # fmt: skip
    with pytest.raises(
        ConfigError, match=r"^sampling has unknown key\(s\) \['max_triess'\]; allowed"
    ):
        settings_from_config(cfg)
