"""Tests of lymphnode.patches.split: slides found by name, a seeded split by slide, split.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lymphnode.core.errors import ConfigError
from lymphnode.patches.split import (
    SlideSource,
    find_slides,
    split_record,
    split_slides,
    write_split,
)


def sources(n_tumor: int, n_normal: int) -> list[SlideSource]:
    tumor = [
        SlideSource(f"tumor_{i:03d}", Path(f"tumor_{i:03d}.tif"), Path("x.xml"))
        for i in range(n_tumor)
    ]
    normal = [
        SlideSource(f"normal_{i:03d}", Path(f"normal_{i:03d}.tif"), None) for i in range(n_normal)
    ]
    return sorted(tumor + normal, key=lambda s: s.name)


def test_seeded_fraction_holds_out_tumor_and_normal_slides_and_is_reproducible() -> None:
    slides = sources(10, 5)
    train, test = split_slides(slides, test_slides=None, test_fraction=0.2, seed=3)
    assert sum(s.annotated for s in test) == 2 and sum(not s.annotated for s in test) == 1
    assert not {s.name for s in train} & {s.name for s in test}
    assert len(train) + len(test) == 15
    again = split_slides(slides, test_slides=None, test_fraction=0.2, seed=3)
    assert [s.name for s in again[1]] == [s.name for s in test]
    draws = {
        tuple(s.name for s in split_slides(slides, test_slides=None, test_fraction=0.2, seed=k)[1])
        for k in range(10)
    }
    assert len(draws) > 1  # the seed decides which slides are held out


def test_named_test_slides_and_bad_splits_are_refused_by_name() -> None:
    slides = sources(2, 1)
    train, test = split_slides(slides, test_slides=["normal_000"], test_fraction=0.5, seed=0)
    assert [s.name for s in test] == ["normal_000"] and len(train) == 2
    with pytest.raises(ConfigError, match=r"not in paths\.slides_dir: \['tumor_009'\]"):
        split_slides(slides, test_slides=["tumor_009"], test_fraction=0.2, seed=0)
    with pytest.raises(ConfigError, match=r"test_fraction must be in \[0, 1\), got 1\.0"):
        split_slides(slides, test_slides=None, test_fraction=1.0, seed=0)
    with pytest.raises(ConfigError, match=r"leaves no training slide"):
        split_slides(slides, test_slides=[s.name for s in slides], test_fraction=0.2, seed=0)


def test_find_slides_pairs_xml_by_stem_and_refuses_an_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "slides").mkdir()
    (tmp_path / "xml").mkdir()
    for name in ("b.tif", "a.svs", "notes.txt", ".hidden.tif"):
        (tmp_path / "slides" / name).write_bytes(b"")
    (tmp_path / "xml" / "b.xml").write_text("<x/>")
    found = find_slides(tmp_path / "slides", tmp_path / "xml")
    assert [(s.name, s.annotated) for s in found] == [("a", False), ("b", True)]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"empty holds no slide \(expected files ending in"):
        find_slides(tmp_path / "empty", None)


def test_write_split_refuses_another_split_unless_forced(tmp_path: Path) -> None:
    slides = sources(3, 2)
    settings = {"test_slides": None, "test_fraction": 0.2, "split_seed": 0}
    path = tmp_path / "split.json"
    first = split_record(
        *split_slides(slides, test_slides=None, test_fraction=0.2, seed=0), tmp_path, None, settings
    )
    write_split(path, first, force=False)
    assert json.loads(path.read_text())["test"] == first["test"]
    write_split(path, first, force=False)  # the same split: fine
    other = split_record(slides[1:], slides[:1], tmp_path, None, settings)
    with pytest.raises(ConfigError, match=r"holds another train/test split .*force=true"):
        write_split(path, other, force=False)
    write_split(path, other, force=True)
    assert [e["name"] for e in json.loads(path.read_text())["test"]] == [slides[0].name]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["split.json"]  # no temp left
