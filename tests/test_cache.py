"""Tests of the patch cache (lymphnode.patches.format / writer / reader / importer) and its CLI
(``python -m lymphnode.cache``)."""

from __future__ import annotations

import errno
import hashlib
import json
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import textwrap
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from lymphnode.cache import main
from lymphnode.core import atomic
from lymphnode.core.errors import CacheError, ConfigError
from lymphnode.patches.cache import (
    CACHE_FORMAT_VERSION,
    CacheWriter,
    PatchCache,
    import_patch_folder,
    import_patches,
)

P = 32  # patch side in the tests (px)


def smooth_patch(seed: int, size: int = P) -> np.ndarray:
    """A smooth RGB patch (like tissue at low frequency), so that JPEG errors stay small."""
    rng = np.random.default_rng(seed)
    small = rng.integers(40, 230, (4, 4, 3), dtype=np.uint8)
    return cv2.resize(small, (size, size), interpolation=cv2.INTER_LINEAR)


def blob_mask(seed: int, size: int = P) -> np.ndarray:
    """A (size, size) uint8 {0, 1} disk at a seeded position (all zero for odd seeds)."""
    mask = np.zeros((size, size), np.uint8)
    if seed % 2 == 0:
        rng = np.random.default_rng(seed)
        cx, cy = (int(v) for v in rng.integers(size // 4, 3 * size // 4, 2))
        cv2.circle(mask, (cx, cy), size // 5, 1, -1)
    return mask


def write_slide(writer: CacheWriter, slide_id: str, n: int, seed: int) -> dict:
    """Write ``n`` deterministic patches of one slide and return the shard info."""
    with writer.slide(slide_id, n=n) as shard:
        for j in range(n):
            mask = blob_mask(seed * 100 + j) if writer.has_masks else None
            label = int(mask.any()) if mask is not None else 0
            shard.add(smooth_patch(seed * 100 + j), mask, x=j * P, y=seed, level=0, label=label)
    return shard.info


def build(path: Path, slides: dict[str, int], *, codec: str = "raw", masks: bool = True, **kw):
    writer = CacheWriter(
        path, {"slides": list(slides)}, codec=codec, patch_size=P, has_masks=masks, **kw
    )
    for seed, (slide_id, n) in enumerate(slides.items()):
        writer.commit(slide_id, write_slide(writer, slide_id, n, seed))
    writer.finalize(list(slides))
    return writer


def tree(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` by relative name, with its bytes."""
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


# ---------------------------------------------------------------------------------------------
# round trip


def test_raw_round_trip_is_exact_with_masks_and_index(tmp_path: Path) -> None:
    build(tmp_path / "c", {"tumor_001": 3, "normal_002": 2})
    cache = PatchCache(tmp_path / "c")
    assert len(cache) == 5
    assert cache.slides == ("tumor_001", "normal_002")
    assert cache.patch_size == P and cache.has_masks and cache.codec == "raw"
    for i, (seed, j) in enumerate([(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]):
        image, mask = cache[i]
        assert image.dtype == np.uint8 and image.shape == (P, P, 3)
        np.testing.assert_array_equal(image, smooth_patch(seed * 100 + j))
        assert mask is not None and mask.dtype == np.uint8 and mask.shape == (P, P)
        np.testing.assert_array_equal(mask, blob_mask(seed * 100 + j))
    index = cache.index
    assert index.dtype.names == ("slide", "x", "y", "level", "label")
    assert index["slide"].tolist() == ["tumor_001"] * 3 + ["normal_002"] * 2
    assert index["x"].tolist() == [0, P, 2 * P, 0, P]
    assert index["y"].tolist() == [0, 0, 0, 1, 1]
    assert index["level"].tolist() == [0] * 5
    assert cache.labels.tolist() == [1, 0, 1, 1, 0]
    assert cache.labels.dtype == np.int64


def test_jpeg_round_trip_is_close_and_masks_exact(tmp_path: Path) -> None:
    build(tmp_path / "c", {"a": 4}, codec="jpeg", quality=90)
    cache = PatchCache(tmp_path / "c")
    assert cache.manifest["codec"] == "jpeg" and cache.manifest["quality"] == 90
    for j in range(4):
        image, mask = cache[j]
        assert image.shape == (P, P, 3) and image.dtype == np.uint8
        error = np.abs(image.astype(int) - smooth_patch(j)).mean()
        assert error < 3.0, error
        np.testing.assert_array_equal(mask, blob_mask(j))


def test_jpeg_is_much_smaller_than_raw_for_larger_patches(tmp_path: Path) -> None:
    for codec in ("raw", "jpeg"):
        writer = CacheWriter(tmp_path / codec, {}, codec=codec, patch_size=256, has_masks=False)
        with writer.slide("s") as shard:
            for j in range(3):
                shard.add(smooth_patch(j, 256), x=0, y=0, level=0, label=0)
        writer.commit("s", shard.info)
    raw = (tmp_path / "raw/shards/s/images.npy").stat().st_size
    jpeg = (tmp_path / "jpeg/shards/s/images.jpegs").stat().st_size
    assert jpeg * 5 < raw


def test_cache_without_masks_returns_none_and_rejects_masks(tmp_path: Path) -> None:
    writer = build(tmp_path / "c", {"a": 2}, masks=False)
    image, mask = PatchCache(tmp_path / "c")[1]
    assert mask is None and image.shape == (P, P, 3)
    assert not (tmp_path / "c/shards/a/masks.npy").exists()
    with pytest.raises(CacheError, match=r"has_masks=False"), writer.slide("b") as shard:
        shard.add(smooth_patch(0), blob_mask(0), x=0, y=0, level=0, label=1)


def test_manifest_records_format_config_and_checksums(tmp_path: Path) -> None:
    build(tmp_path / "c", {"a": 2, "b": 1})
    manifest = json.loads((tmp_path / "c/manifest.json").read_text())
    assert manifest["format_version"] == CACHE_FORMAT_VERSION
    assert manifest["config"] == {"slides": ["a", "b"]}
    assert manifest["patch_size"] == P and manifest["has_masks"] is True
    assert [s["id"] for s in manifest["slides"]] == ["a", "b"]
    record = manifest["slides"][0]
    assert record["status"] == "complete" and record["n"] == 2
    assert set(record["checksums"]) == {"images.npy", "index.npy", "masks.npy"}
    digest = hashlib.sha256((tmp_path / "c/shards/a/images.npy").read_bytes()).hexdigest()
    assert record["checksums"]["images.npy"] == digest
    assert np.load(tmp_path / "c/shards/a/images.npy", mmap_mode="r").shape == (2, P, P, 3)


def test_index_error_for_negative_and_out_of_range(tmp_path: Path) -> None:
    build(tmp_path / "c", {"a": 2})
    cache = PatchCache(tmp_path / "c")
    with pytest.raises(IndexError, match=r"patch index -1 out of range"):
        cache[-1]
    with pytest.raises(IndexError, match=r"patch index 2 out of range.*2 patches"):
        cache[2]
    with pytest.raises(TypeError, match=r"integer"):
        cache["0"]  # type: ignore[index]
    assert cache[np.int64(1)][0].shape == (P, P, 3)


# ---------------------------------------------------------------------------------------------
# atomicity, resume, determinism


def test_only_committed_slides_are_visible(tmp_path: Path) -> None:
    writer = CacheWriter(tmp_path / "c", {}, patch_size=P, has_masks=True)
    writer.commit("a", write_slide(writer, "a", 2, 0))
    with writer.slide("b", n=2) as shard:
        shard.add(smooth_patch(1), blob_mask(1), x=0, y=0, level=0, label=0)
        cache = PatchCache(tmp_path / "c")
        assert cache.slides == ("a",) and len(cache) == 2
        shard.add(smooth_patch(2), blob_mask(2), x=0, y=0, level=0, label=1)
    # renamed into place but not committed yet: still invisible
    assert (tmp_path / "c/shards/b").is_dir()
    assert PatchCache(tmp_path / "c").slides == ("a",)
    assert not writer.is_complete("b")
    writer.commit("b", shard.info)
    assert writer.is_complete("b")
    assert PatchCache(tmp_path / "c").slides == ("a", "b")


def test_shard_whose_block_raises_leaves_nothing(tmp_path: Path) -> None:
    writer = CacheWriter(tmp_path / "c", {}, patch_size=P, has_masks=True)
    writer.commit("a", write_slide(writer, "a", 1, 0))
    before = tree(tmp_path / "c")
    with pytest.raises(RuntimeError, match=r"slide read failed"), writer.slide("b") as shard:
        shard.add(smooth_patch(1), blob_mask(1), x=0, y=0, level=0, label=0)
        raise RuntimeError("slide read failed")
    assert tree(tmp_path / "c") == before
    assert sorted(p.name for p in (tmp_path / "c/shards").iterdir()) == ["a"]


def test_shard_with_fewer_patches_than_expected_n_is_refused(tmp_path: Path) -> None:
    writer = CacheWriter(tmp_path / "c", {}, patch_size=P, has_masks=False)
    too_few = pytest.raises(CacheError, match=r"1 patches were added, expected n=2")
    with too_few, writer.slide("a", n=2) as shard:
        shard.add(smooth_patch(0), x=0, y=0, level=0, label=0)
    too_many = pytest.raises(CacheError, match=r"more patches than the expected n=1")
    with too_many, writer.slide("a", n=1) as shard:
        for _ in range(2):
            shard.add(smooth_patch(0), x=0, y=0, level=0, label=0)
    assert list((tmp_path / "c/shards").iterdir()) == []


def test_finalize_fixes_slide_order_so_completion_order_does_not_matter(tmp_path: Path) -> None:
    slides = {"a": 2, "b": 1, "c": 3}
    for name, order in (("forward", ["a", "b", "c"]), ("shuffled", ["c", "a", "b"])):
        writer = CacheWriter(
            tmp_path / name, {"slides": list(slides)}, patch_size=P, has_masks=True
        )
        for slide_id in order:
            seed = list(slides).index(slide_id)
            writer.commit(slide_id, write_slide(writer, slide_id, slides[slide_id], seed))
        writer.finalize(list(slides))
    assert tree(tmp_path / "forward") == tree(tmp_path / "shuffled")
    assert PatchCache(tmp_path / "shuffled").slides == ("a", "b", "c")


def test_finalize_refuses_incomplete_or_unknown_slides(tmp_path: Path) -> None:
    writer = CacheWriter(tmp_path / "c", {}, patch_size=P, has_masks=True)
    writer.commit("a", write_slide(writer, "a", 1, 0))
    with pytest.raises(CacheError, match=r"slides not complete: \['b'\]"):
        writer.finalize(["a", "b"])
    with pytest.raises(CacheError, match=r"complete slides not in slide_order: \['a'\]"):
        writer.finalize([])
    with pytest.raises(CacheError, match=r"repeated"):
        writer.finalize(["a", "a"])


BUILDER = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from lymphnode.patches.cache import CacheWriter

    path, codec, delay = sys.argv[1], sys.argv[2], float(sys.argv[3])
    slides = ["s0", "s1", "s2", "s3"]
    writer = CacheWriter(path, {"slides": slides, "seed": 7}, codec=codec, patch_size=24,
                         has_masks=True)
    for k, slide_id in enumerate(slides):
        if writer.is_complete(slide_id):
            continue
        rng = np.random.default_rng(k)
        with writer.slide(slide_id, n=5) as shard:
            for j in range(5):
                image = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
                mask = rng.integers(0, 2, (24, 24), dtype=np.uint8)
                shard.add(image, mask, x=24 * j, y=k, level=1, label=j % 2)
                print("added", slide_id, j, flush=True)
                time.sleep(delay)
        writer.commit(slide_id, shard.info)
        print("committed", slide_id, flush=True)
    writer.finalize(slides)
    print("done", flush=True)
    """
)


def run_builder(script: Path, path: Path, codec: str, kill_after: str | None = None) -> None:
    """Run the builder; with ``kill_after``, SIGKILL it once it prints that line."""
    delay = "0.02" if kill_after else "0"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(path), codec, delay],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if kill_after and line.strip() == kill_after:
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.stdout.close()
    proc.wait(timeout=60)
    if kill_after:
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode == 0


@pytest.mark.parametrize("codec", ["raw", "jpeg"])
def test_killed_build_resumes_byte_identical(tmp_path: Path, codec: str) -> None:
    script = tmp_path / "builder.py"
    script.write_text(BUILDER)
    run_builder(script, tmp_path / "reference", codec)

    killed = tmp_path / "killed"
    run_builder(script, killed, codec, kill_after="added s1 2")  # mid-shard of the 2nd slide
    temps = [p.name for p in (killed / "shards").iterdir() if p.name.startswith(".tmp-")]
    assert len(temps) == 1 and temps[0].startswith(".tmp-s1-")
    assert PatchCache(killed).slides == ("s0",)  # the half-written slide is invisible
    run_builder(script, killed, codec, kill_after="committed s2")  # killed again, later
    assert PatchCache(killed).slides == ("s0", "s1", "s2")
    run_builder(script, killed, codec)

    assert tree(killed) == tree(tmp_path / "reference")
    assert len(PatchCache(killed, verify=True)) == 20


def test_stale_temp_dirs_of_dead_processes_are_removed_on_open(tmp_path: Path) -> None:
    build(tmp_path / "c", {"a": 1})
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = atomic.owner_tag().rpartition("-")[0]
    stale = tmp_path / "c/shards" / f".tmp-b-{host}-{dead.pid}"
    stale.mkdir()
    (stale / "images.npy").write_bytes(b"partial")
    stale_manifest = tmp_path / "c" / f".manifest.json.tmp-{host}-{dead.pid}"
    stale_manifest.write_text("{")
    elsewhere = tmp_path / "c/shards" / f".tmp-b-othernode7-{os.getpid()}"
    elsewhere.mkdir()  # another machine's build on a shared file system may still be writing
    writer = CacheWriter(tmp_path / "c", {"slides": ["a"]}, patch_size=P, has_masks=True)
    assert not stale.exists() and not stale_manifest.exists()
    assert elsewhere.is_dir()
    writer.finalize(["a"])  # every slide complete: leftovers of any machine go
    assert not elsewhere.exists()


# ---------------------------------------------------------------------------------------------
# configuration changes


def test_other_config_is_refused_naming_the_keys_and_force_rebuilds(tmp_path: Path) -> None:
    path = tmp_path / "c"
    config = {"seed": 1, "sampling": {"n": 10, "level": 0}}
    writer = CacheWriter(path, config, patch_size=P, has_masks=True)
    writer.commit("a", write_slide(writer, "a", 2, 0))
    same = CacheWriter(
        path, {"sampling": {"level": 0, "n": 10}, "seed": 1}, patch_size=P, has_masks=True
    )
    assert same.is_complete("a")  # equal config (key order aside) continues the cache

    changed = {"seed": 2, "sampling": {"n": 10, "level": 0}}
    with pytest.raises(CacheError, match=r"config\.seed: 1 → 2.*force=true"):
        CacheWriter(path, changed, patch_size=P, has_masks=True)
    with pytest.raises(CacheError, match=r"config\.sampling\.n: 10 → 20"):
        CacheWriter(
            path, {"seed": 1, "sampling": {"n": 20, "level": 0}}, patch_size=P, has_masks=True
        )
    with pytest.raises(CacheError, match=r'codec: "raw" → "jpeg"'):
        CacheWriter(path, config, codec="jpeg", patch_size=P, has_masks=True)
    with pytest.raises(CacheError, match=r"patch_size: 32 → 64"):
        CacheWriter(path, config, patch_size=64, has_masks=True)
    assert PatchCache(path).slides == ("a",)  # refusals change nothing

    rebuilt = CacheWriter(path, changed, patch_size=P, has_masks=True, force=True)
    assert not rebuilt.is_complete("a")
    assert PatchCache(path).slides == () and len(PatchCache(path)) == 0
    assert PatchCache(path).manifest["config"]["seed"] == 2
    assert not any(path.glob("shards/*"))


def test_writer_refuses_a_non_empty_folder_that_is_not_a_cache(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(CacheError, match=r"not empty.*notes.txt.*no manifest.json"):
        CacheWriter(tmp_path, {}, patch_size=P, has_masks=False)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_writer_with_unreadable_manifest_needs_force(tmp_path: Path) -> None:
    build(tmp_path / "c", {"a": 1})
    (tmp_path / "c/manifest.json").write_text("{not json")
    with pytest.raises(CacheError, match=r"cannot read patch-cache manifest.*force=true"):
        CacheWriter(tmp_path / "c", {}, patch_size=P, has_masks=True)
    CacheWriter(tmp_path / "c", {}, patch_size=P, has_masks=True, force=True)
    assert len(PatchCache(tmp_path / "c")) == 0


# ---------------------------------------------------------------------------------------------
# a disk that fills up


def test_disk_full_mid_shard_raises_cache_error_and_keeps_earlier_slides(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "c"
    writer = CacheWriter(path, {}, patch_size=P, has_masks=True)
    writer.commit("a", write_slide(writer, "a", 2, 0))
    real_write = atomic.write_all
    calls = {"n": 0}

    def filling_write(fh, data):
        calls["n"] += 1
        if calls["n"] > 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(fh, data)

    monkeypatch.setattr(atomic, "write_all", filling_write)
    with pytest.raises(
        CacheError, match=r"slide 'b' of patch cache .*c: .*No space left on device"
    ):
        write_slide(writer, "b", 3, 1)
    assert sorted(p.name for p in (path / "shards").iterdir()) == ["a"]
    assert PatchCache(path, verify=True).slides == ("a",)

    monkeypatch.setattr(atomic, "write_all", real_write)
    writer.commit("b", write_slide(writer, "b", 3, 1))  # free space again: the build goes on
    assert PatchCache(path).slides == ("a", "b")


def test_disk_full_while_writing_the_manifest_keeps_the_old_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "c"
    writer = CacheWriter(path, {}, patch_size=P, has_masks=True)
    writer.commit("a", write_slide(writer, "a", 1, 0))
    info = write_slide(writer, "b", 1, 1)
    before = (path / "manifest.json").read_bytes()

    def full(fh, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic, "write_all", full)
    with pytest.raises(CacheError, match=r"manifest of patch cache .*c: .*No space left"):
        writer.commit("b", info)
    assert (path / "manifest.json").read_bytes() == before
    assert [p.name for p in path.iterdir() if p.name.startswith(".manifest")] == []


# ---------------------------------------------------------------------------------------------
# bad input to the writer


def test_writer_rejects_bad_settings(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"cache codec must be one of \['raw', 'jpeg'\], got 'png'"
    ):
        CacheWriter(tmp_path / "c", {}, codec="png", patch_size=P, has_masks=False)
    with pytest.raises(ConfigError, match=r"quality must be an integer in 1..100, got 0"):
        CacheWriter(tmp_path / "c", {}, codec="jpeg", quality=0, patch_size=P, has_masks=False)
    with pytest.raises(ConfigError, match=r"patch_size must be an integer >= 1 px, got 0"):
        CacheWriter(tmp_path / "c", {}, patch_size=0, has_masks=False)
    with pytest.raises(ConfigError, match=r"not JSON-serialisable"):
        CacheWriter(tmp_path / "c", {"f": object()}, patch_size=P, has_masks=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(CacheError, match=r"exists and is not a directory"):
        CacheWriter(tmp_path / "file", {}, patch_size=P, has_masks=False)


def test_writer_rejects_bad_patches(tmp_path: Path) -> None:
    writer = CacheWriter(tmp_path / "c", {}, patch_size=P, has_masks=True)
    image, mask = smooth_patch(0), blob_mask(0)
    bad_calls = [
        (
            (np.zeros((P, P, 4), np.uint8), mask),
            {},
            r"image has shape \(32, 32, 4\).*expected \(32, 32, 3\) uint8",
        ),
        ((image.astype(np.float32), mask), {}, "dtype float32"),
        ((image, None), {}, "the cache has masks, but mask is None"),
        ((image, mask[:10]), {}, r"mask has shape \(10, 32\)"),
        ((image, mask * 255), {}, r"values \{0, 1\}.*max 255"),
        ((image, mask), {"label": 2}, "label=2"),
        ((image, mask), {"x": -5}, "x=-5"),
        ((image, mask), {"level": 1.0}, "level=1.0 is not an integer"),
    ]
    for args, override, message in bad_calls:
        where = {"x": 0, "y": 0, "level": 0, "label": 0, **override}
        with pytest.raises(CacheError, match=message), writer.slide("a") as shard:
            shard.add(*args, **where)
    assert list((tmp_path / "c/shards").iterdir()) == []


def test_writer_rejects_bad_slide_ids_reuse_and_bad_commits(tmp_path: Path) -> None:
    writer = CacheWriter(tmp_path / "c", {}, patch_size=P, has_masks=True)
    for bad in ("../x", "", ".hidden", "a/b"):
        with pytest.raises(CacheError, match=r"invalid slide id"):
            writer.slide(bad)
    info = write_slide(writer, "a", 1, 0)
    with pytest.raises(CacheError, match=r"needs the info of that slide"):
        writer.commit("b", info)
    writer.commit("a", info)
    with pytest.raises(CacheError, match=r"'a' is already complete"):
        writer.slide("a")
    shard = writer.slide("c")
    with pytest.raises(CacheError, match=r"outside its `with writer.slide"):
        shard.add(smooth_patch(0), blob_mask(0), x=0, y=0, level=0, label=0)
    with pytest.raises(CacheError, match=r"not finished"):
        shard.info  # noqa: B018


# ---------------------------------------------------------------------------------------------
# the reader's bad input


def test_reader_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(CacheError, match=f"patch cache not found: {tmp_path / 'missing'}"):
        PatchCache(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CacheError, match=r"empty is not a patch cache: manifest.json is missing"):
        PatchCache(tmp_path / "empty")

    build(tmp_path / "c", {"a": 2})
    manifest_path = tmp_path / "c/manifest.json"
    good = manifest_path.read_text()
    manifest_path.write_text(good[:40])
    with pytest.raises(CacheError, match=r"cannot read patch-cache manifest .*manifest.json"):
        PatchCache(tmp_path / "c")
    manifest_path.write_text(json.dumps({**json.loads(good), "format_version": 99}))
    with pytest.raises(
        CacheError, match=r"manifest.json has format_version 99.*reads format_version 1"
    ):
        PatchCache(tmp_path / "c")
    manifest_path.write_text(json.dumps({**json.loads(good), "codec": "webp"}))
    with pytest.raises(CacheError, match=r"malformed: codec 'webp'"):
        PatchCache(tmp_path / "c")
    manifest_path.write_text(good)

    images = tmp_path / "c/shards/a/images.npy"
    data = bytearray(images.read_bytes())
    data[-1] ^= 0xFF
    images.write_bytes(bytes(data))
    assert len(PatchCache(tmp_path / "c")) == 2  # verification is off by default
    with pytest.raises(CacheError, match=r"checksum mismatch for .*shards/a/images.npy"):
        PatchCache(tmp_path / "c", verify=True)
    images.write_bytes(bytes(data[:200]))  # truncated
    with pytest.raises(CacheError, match=r"cannot read patch-cache file .*images.npy"):
        PatchCache(tmp_path / "c")[0]
    images.unlink()
    with pytest.raises(CacheError, match=r"images.npy is missing"):
        PatchCache(tmp_path / "c")


def test_reader_reports_a_corrupt_jpeg(tmp_path: Path) -> None:
    build(tmp_path / "c", {"a": 2}, codec="jpeg")
    pack = tmp_path / "c/shards/a/images.jpegs"
    data = bytearray(pack.read_bytes())
    data[:64] = bytes(64)
    pack.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=r"cannot decode JPEG patch 0 of .*images.jpegs"):
        PatchCache(tmp_path / "c")[0]


# ---------------------------------------------------------------------------------------------
# many processes


def digest_patch(cache: PatchCache, i: int) -> str:
    image, mask = cache[i]
    return hashlib.sha256(
        image.tobytes() + (mask.tobytes() if mask is not None else b"")
    ).hexdigest()


def digest_all(cache: PatchCache) -> list[str]:
    return [digest_patch(cache, i) for i in range(len(cache))]


def write_slide_in_worker(writer: CacheWriter, slide_id: str, seed: int) -> dict:
    return write_slide(writer, slide_id, 3, seed)


def test_pickled_cache_reads_in_subprocesses_and_concurrently(tmp_path: Path) -> None:
    build(tmp_path / "c", {"a": 3, "b": 2}, codec="jpeg")
    cache = PatchCache(tmp_path / "c")
    expected = digest_all(cache)  # opens memory maps in this process ...
    clone = pickle.loads(pickle.dumps(cache))  # ... which pickling drops
    assert clone._handles == {} and digest_all(clone) == expected
    context = multiprocessing.get_context("spawn")
    with context.Pool(2) as pool:
        # several processes read the same cache at once, each from its own pickled copy
        results = pool.starmap(digest_all, [(cache,)] * 4)
        single = pool.starmap(digest_patch, [(cache, i) for i in range(len(cache))])
    assert results == [expected] * 4
    assert single == expected


def test_shards_written_in_worker_processes_commit_in_the_parent(tmp_path: Path) -> None:
    slides = ["a", "b", "c"]
    writer = CacheWriter(tmp_path / "pool", {"slides": slides}, patch_size=P, has_masks=True)
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {
            s: pool.submit(write_slide_in_worker, writer, s, k) for k, s in enumerate(slides)
        }
        for slide_id in reversed(slides):
            writer.commit(slide_id, futures[slide_id].result())
    writer.finalize(slides)

    serial = CacheWriter(tmp_path / "serial", {"slides": slides}, patch_size=P, has_masks=True)
    for k, slide_id in enumerate(slides):
        serial.commit(slide_id, write_slide(serial, slide_id, 3, k))
    serial.finalize(slides)
    assert tree(tmp_path / "pool") == tree(tmp_path / "serial")


# ---------------------------------------------------------------------------------------------
# importing a folder of patches


def make_folder(root: Path, names: list[str], size: int = 40, masks: bool = True) -> None:
    (root / "images").mkdir(parents=True)
    if masks:
        (root / "masks").mkdir()
    for k, name in enumerate(names):
        Image.fromarray(smooth_patch(k, size)).save(root / "images" / name)
        if masks:
            mask = blob_mask(k, size) * 255
            Image.fromarray(mask).save(root / "masks" / (Path(name).stem + ".png"))


def test_import_folder_with_masks(tmp_path: Path) -> None:
    names = ["slideA_0.png", "slideA_1.png", "slideB_0.png", "slideB_1.tif"]
    make_folder(tmp_path, names)
    cache = import_patch_folder(tmp_path / "images", tmp_path / "out", masks_dir=tmp_path / "masks")
    assert cache.slides == ("slideA", "slideB") and len(cache) == 4
    assert cache.patch_size == 40 and cache.has_masks
    assert cache.labels.tolist() == [int(blob_mask(k, 40).any()) for k in range(4)] == [1, 0, 1, 0]
    assert cache.index["x"].tolist() == [-1] * 4 and cache.index["level"].tolist() == [0] * 4
    image, mask = cache[2]
    np.testing.assert_array_equal(image, smooth_patch(2, 40))  # PNG and TIFF are lossless
    np.testing.assert_array_equal(mask, blob_mask(2, 40))
    again = import_patch_folder(tmp_path / "images", tmp_path / "out", masks_dir=tmp_path / "masks")
    assert len(again) == 4  # rerun: nothing to do


def test_import_folder_without_masks_jpeg_codec_and_custom_pattern(tmp_path: Path) -> None:
    make_folder(
        tmp_path, ["p_tumor-001_1.jpg", "p_tumor-001_2.jpg", "p_normal-9_1.png"], masks=False
    )
    cache = import_patch_folder(
        tmp_path / "images", tmp_path / "out", slide_pattern=r"^p_(?P<slide>[^_]+)_", codec="jpeg"
    )
    assert cache.slides == ("normal-9", "tumor-001")  # sorted file names
    assert not cache.has_masks and cache[0][1] is None
    assert cache.labels.tolist() == [-1, -1, -1]  # unknown without masks


def test_import_refuses_bad_patterns_names_and_sizes(tmp_path: Path) -> None:
    make_folder(tmp_path, ["a_0.png", "a_1.png", "_odd.png"], masks=False)
    images = tmp_path / "images"
    with pytest.raises(ConfigError, match=r"has no named group 'slide'"):
        import_patch_folder(images, tmp_path / "o1", slide_pattern=r"^([^_]+)")
    with pytest.raises(ConfigError, match=r"not a valid regular expression"):
        import_patch_folder(images, tmp_path / "o2", slide_pattern=r"^(?P<slide>[")
    with pytest.raises(CacheError, match=r"file name '_odd.png': slide id '_odd' .* is not usable"):
        import_patch_folder(images, tmp_path / "o3")
    (images / "_odd.png").unlink()
    Image.fromarray(smooth_patch(9, 48)).save(images / "a_2.png")
    with pytest.raises(CacheError, match=r"a_2.png is 48x48 px but a_0.png is 40x40"):
        import_patch_folder(images, tmp_path / "o4")
    with pytest.raises(CacheError, match=r"images input not found"):
        import_patch_folder(tmp_path / "nope", tmp_path / "o5")
    for name in ("o1", "o2", "o3", "o4", "o5"):
        assert not (tmp_path / name).exists()  # nothing written


def test_import_refuses_missing_and_non_binary_masks(tmp_path: Path) -> None:
    make_folder(tmp_path, ["a_0.png", "a_1.png"])
    (tmp_path / "masks/a_1.png").unlink()
    with pytest.raises(CacheError, match=r"no mask for .*a_1.png"):
        import_patch_folder(tmp_path / "images", tmp_path / "o", masks_dir=tmp_path / "masks")
    Image.fromarray(np.full((40, 40), 128, np.uint8)).save(tmp_path / "masks/a_1.png")
    with pytest.raises(CacheError, match=r"mask .*a_1.png has values \[128\]; expected 0/255"):
        import_patch_folder(tmp_path / "images", tmp_path / "o", masks_dir=tmp_path / "masks")


def test_cli_import_and_info(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_folder(tmp_path, ["s1_0.png", "s1_1.png", "s2_0.png"])
    out = tmp_path / "out"
    argv = ["import", str(tmp_path / "images"), str(out), "--masks", str(tmp_path / "masks")]
    assert main([*argv, "--codec", "jpeg"]) == 0
    assert "3 patches from 2 slides, codec jpeg, 40x40 px" in capsys.readouterr().out
    assert main(["info", str(out), "--verify"]) == 0
    assert "tumor 2 / non-tumor 1" in capsys.readouterr().out
    assert main([*argv, "--codec", "raw"]) == 1  # another config: refused
    assert 'codec: "jpeg" → "raw"' in capsys.readouterr().err
    assert main([*argv, "--codec", "raw", "--force"]) == 0


def test_cli_import_mpp_is_recorded_for_the_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lymphnode.data.datamodules import PretrainDataModule

    make_folder(tmp_path, ["s1_0.png", "s1_1.png", "s2_0.png"])
    out = tmp_path / "out"
    argv = ["import", str(tmp_path / "images"), str(out)]
    for bad in ("0", "-0.5", "nan"):
        assert main([*argv, "--mpp", bad]) == 1
        assert "--mpp must be a" in capsys.readouterr().err
        assert not out.exists()  # refused before anything is written
    assert main([*argv, "--mpp", "0.243"]) == 0
    assert PatchCache(out).config["mpp"] == 0.243
    # what a network trained on the cache records as its resolution (checkpoint preprocess)
    assert PretrainDataModule(out, val_fraction=0.34).preprocess.mpp == 0.243
    assert main([*argv, "--mpp", "0.486"]) == 1  # another resolution: refused, names the key
    assert "mpp: 0.243 → 0.486" in capsys.readouterr().err
    unknown = tmp_path / "unknown"
    assert main(["import", str(tmp_path / "images"), str(unknown)]) == 0
    assert "mpp" not in PatchCache(unknown).config  # not given: unknown, as before


def test_cli_module_exits_non_zero_with_a_clear_error(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lymphnode.cache",
            "import",
            str(tmp_path / "none"),
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert f"error: images input not found: {tmp_path / 'none'}" in result.stderr


def write_and_commit_in_worker(writer: CacheWriter, slide_id: str, seed: int) -> str:
    writer.commit(slide_id, write_slide(writer, slide_id, 2, seed))
    return slide_id


def test_workers_that_commit_themselves_do_not_lose_each_others_slides(tmp_path: Path) -> None:
    slides = [f"s{k}" for k in range(6)]
    writer = CacheWriter(tmp_path / "c", {"slides": slides}, patch_size=P, has_masks=True)
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        done = list(pool.map(write_and_commit_in_worker, [writer] * 6, slides, range(6)))
    assert sorted(done) == slides
    writer.finalize(slides)  # the manifest lock kept every worker's commit
    assert PatchCache(tmp_path / "c", verify=True).slides == tuple(slides)


# ---------------------------------------------------------------------------------------------
# import: names, several inputs, filters (issue 9)


def write_pngs(folder: Path, names: list[str], size: int = 16, masks: Path | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(names):
        Image.fromarray(smooth_patch(k, size)).save(folder / name)
        if masks is not None:
            masks.mkdir(parents=True, exist_ok=True)
            Image.fromarray(blob_mask(k, size) * 255).save(masks / name)


def test_default_names_give_slide_before_the_last_two_integers_and_level0_xy(
    tmp_path: Path,
) -> None:
    names = ["tumor_001_69916_134313.png", "tumor_001_70094_124883.png", "tumor_004_5_6.png"]
    write_pngs(tmp_path / "im", names)
    cache = import_patch_folder(tmp_path / "im", tmp_path / "out")
    assert cache.slides == ("tumor_001", "tumor_004")
    assert cache.slide_counts == {"tumor_001": 2, "tumor_004": 1}
    assert cache.index["x"].tolist() == [69916, 70094, 5]
    assert cache.index["y"].tolist() == [134313, 124883, 6]


def test_names_without_coordinates_fall_back_and_no_coordinates_keeps_the_slide(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_pngs(tmp_path / "im", ["a_7.png", "b.png", "centre_0_patient_6_node_1_0_256.png"])
    cache = import_patch_folder(tmp_path / "im", tmp_path / "o1")
    assert cache.slides == ("a", "b", "centre_0_patient_6_node_1")
    assert cache.index["x"].tolist() == [-1, -1, 0] and cache.index["y"].tolist() == [-1, -1, 256]
    assert "2 of 3 file names do not end in _<x>_<y> (e.g. a_7.png)" in caplog.text
    flat = import_patch_folder(tmp_path / "im", tmp_path / "o2", coordinates=False)
    assert flat.slides == cache.slides and flat.index["x"].tolist() == [-1, -1, -1]


def test_a_custom_pattern_may_name_x_and_y(tmp_path: Path) -> None:
    write_pngs(tmp_path / "im", ["s-A.x12.y34.png", "s-B.x5.y6.png"])
    cache = import_patch_folder(
        tmp_path / "im",
        tmp_path / "o",
        slide_pattern=r"^s-(?P<slide>\w+)\.x(?P<x>\d+)\.y(?P<y>\d+)",
    )
    assert cache.slides == ("A", "B") and cache.index["x"].tolist() == [12, 5]
    with pytest.raises(ConfigError, match=r"has only one of the groups 'x' and 'y'"):
        import_patch_folder(
            tmp_path / "im", tmp_path / "o2", slide_pattern=r"(?P<slide>\w)(?P<x>\d)"
        )


def test_several_inputs_globs_lists_and_filters(tmp_path: Path) -> None:
    write_pngs(tmp_path / "pool", ["t1_0_0.png", "t1_1_1.png", "t4_0_0.png", "t9_0_0.png"])
    write_pngs(tmp_path / "extra", ["u_3_3.png", "notes.txt.png"])
    (tmp_path / "paths.txt").write_text("# unlabeled extras\n\nextra/u_3_3.png\n")
    cache = import_patches(
        [tmp_path / "pool", str(tmp_path / "pool" / "t1_*.png"), tmp_path / "pool" / "t4_0_0.png"],
        tmp_path / "o",
        list_file=tmp_path / "paths.txt",
        exclude=["t9_*"],
    )
    assert cache.slide_counts == {"t1": 2, "t4": 1, "u": 1}  # named twice counts once
    kept = import_patches(
        [tmp_path / "pool"], tmp_path / "o2", include=["t[14]_*"], exclude=["t1_1*"]
    )
    assert kept.slide_counts == {"t1": 1, "t4": 1}
    assert kept.manifest["config"]["files"] == 2
    assert kept.manifest["config"]["include"] == ["t[14]_*"]


def test_bad_inputs_are_refused_by_name(tmp_path: Path) -> None:
    write_pngs(tmp_path / "a", ["x_0_0.png"])
    write_pngs(tmp_path / "b", ["x_0_0.png"])
    (tmp_path / "a" / "readme.md").write_text("hi")
    with pytest.raises(
        CacheError, match=r"two images are named 'x_0_0.png': .*a/x_0_0.png and .*b"
    ):
        import_patches([tmp_path / "a", tmp_path / "b"], tmp_path / "o")
    with pytest.raises(CacheError, match=r"glob '.*/a/y\*' matches no PNG/JPEG/TIFF file"):
        import_patches([str(tmp_path / "a" / "y*")], tmp_path / "o")
    with pytest.raises(CacheError, match=r"readme.md is not a PNG/JPEG/TIFF image"):
        import_patches([tmp_path / "a" / "readme.md"], tmp_path / "o")
    with pytest.raises(CacheError, match=r"no image is left after the filters \(include \['z\*'\]"):
        import_patches([tmp_path / "a"], tmp_path / "o", include=["z*"])
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(CacheError, match=r"the list of images .*empty.txt names no path"):
        import_patches([], tmp_path / "o", list_file=tmp_path / "empty.txt")
    (tmp_path / "missing.txt").write_text("gone/q_0_0.png\n")
    with pytest.raises(CacheError, match=r"missing.txt: images input not found: .*gone/q_0_0.png"):
        import_patches([], tmp_path / "o", list_file=tmp_path / "missing.txt")
    with pytest.raises(CacheError, match=r"no images input"):
        import_patches([], tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_cli_import_several_inputs_with_include_and_masks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    names = ["tumor_001_10_20.png", "tumor_004_30_40.png", "tumor_064_50_60.png"]
    write_pngs(tmp_path / "images", names, masks=tmp_path / "masks")
    write_pngs(tmp_path / "more", ["tumor_002_1_2.png"], masks=tmp_path / "masks")
    argv = [
        "import",
        str(tmp_path / "images"),
        str(tmp_path / "more" / "*.png"),
        str(tmp_path / "o"),
    ]
    assert main([*argv, "--masks", str(tmp_path / "masks"), "--exclude", "tumor_064_*"]) == 0
    out = capsys.readouterr().out
    assert "3 patches from 3 slides" in out and "level-0 x/y known for 3" in out
    assert "patches per slide: tumor_001 1, tumor_002 1, tumor_004 1" in out
    assert PatchCache(tmp_path / "o").index["y"].tolist() == [20, 2, 40]


def test_cli_import_options_between_the_inputs_and_the_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    names = ["tumor_001_10_20.png", "tumor_004_30_40.png", "tumor_064_50_60.png"]
    write_pngs(tmp_path / "images", names, masks=tmp_path / "masks")
    argv = ["import", str(tmp_path / "images"), "--include", "tumor_00[14]_*",
            "--masks", str(tmp_path / "masks"), str(tmp_path / "o")]  # fmt: skip
    assert main(argv) == 0
    assert "patches per slide: tumor_001 1, tumor_004 1" in capsys.readouterr().out


REAL_DEV = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "real_dev"


@pytest.mark.skipif(not REAL_DEV.is_dir(), reason=f"real_dev data not found at {REAL_DEV}")
def test_real_dev_pool_test_and_unlabeled_caches(tmp_path: Path) -> None:
    pool = import_patches(
        [REAL_DEV / "images"],
        tmp_path / "labeled",
        masks_dir=REAL_DEV / "masks",
        include=["tumor_001_*", "tumor_004_*"],
    )
    assert pool.slide_counts == {"tumor_001": 24, "tumor_004": 7}  # the README's counts
    assert int((pool.labels == 1).sum()) == 24 and (pool.index["x"] > 0).all()
    test = import_patches(
        [str(REAL_DEV / "images" / "tumor_064_*.png")],
        tmp_path / "test",
        masks_dir=REAL_DEV / "masks",
    )
    assert test.slide_counts == {"tumor_064": 26} and int((test.labels == 1).sum()) == 4
    unlabeled = import_patches(
        [REAL_DEV / "unlabeled", REAL_DEV / "images"],
        tmp_path / "unlabeled",
        exclude=["tumor_064_*"],
        coordinates=False,  # CAMELYON17 crops end in tile offsets, not level-0 px
        codec="jpeg",
    )
    assert len(unlabeled) == 256 + 31
    centres = {s: n for s, n in unlabeled.slide_counts.items() if s.startswith("centre_")}
    assert len(centres) == 4 and set(centres.values()) == {64}  # one tile per centre (README)
    assert {s for s in unlabeled.slides if not s.startswith("centre_")} == {
        "tumor_001",
        "tumor_004",
    }
    assert (unlabeled.labels == -1).all() and (unlabeled.index["x"] == -1).all()
