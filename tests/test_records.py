"""Tests of lymphnode.core.records: resume with the same config, refuse another naming the keys."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lymphnode.core.errors import CacheError, ConfigError
from lymphnode.core.records import (
    config_differences,
    fingerprint,
    flatten,
    is_ignored,
    read_record,
    resume_or_refuse,
)


def test_flatten_and_differences_ignore_key_order_and_name_nested_keys() -> None:
    assert flatten({"a": {"b": 1, "c": {}}, "d": [1]}) == {"a.b": 1, "a.c": {}, "d": [1]}
    old = {"seed": 0, "sampling": {"n": 10, "level": 0}, "gone": 1}
    assert config_differences(old, {"sampling": {"level": 0, "n": 10}, "seed": 0, "gone": 1}) == []
    assert config_differences(old, {"seed": 1, "sampling": {"n": 20, "level": 0}, "new": "x"}) == [
        "gone: 1 → <absent>",
        'new: <absent> → "x"',
        "sampling.n: 10 → 20",
        "seed: 0 → 1",
    ]


def write(path: Path, config: dict) -> Path:
    path.write_text(json.dumps({"config": config, "slides": {}}))
    return path


def test_resume_with_the_same_config_and_start_without_a_record(tmp_path: Path) -> None:
    assert resume_or_refuse(tmp_path / "none.json", {"a": 1}, what="w", remedy="r").record is None
    path = write(tmp_path / "m.json", {"a": 1})
    found = resume_or_refuse(path, {"a": 1}, what="w", remedy="r")
    assert found.resumes and found.record["slides"] == {} and found.changes == []


def test_another_config_is_refused_naming_the_keys_unless_forced(tmp_path: Path) -> None:
    path = write(tmp_path / "m.json", {"seed": 0, "width": 768})
    with pytest.raises(
        ConfigError,
        match=r"m\.json was made with another config \(differing keys: seed: 0 → 1; "
        r"width: 768 → 1024\); use another out_dir",
    ):
        resume_or_refuse(path, {"seed": 1, "width": 1024}, what="w", remedy="use another out_dir")
    forced = resume_or_refuse(path, {"seed": 1, "width": 768}, what="w", remedy="r", force=True)
    assert not forced.resumes and forced.changes == ["seed: 0 → 1"]


def test_unreadable_or_malformed_records_are_refused_naming_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match=r"bad\.json is not a readable synth manifest.*; fix it"):
        resume_or_refuse(bad, {}, what="synth manifest", remedy="fix it")
    assert resume_or_refuse(bad, {}, what="synth manifest", remedy="r", force=True).record is None
    (tmp_path / "list.json").write_text("[1]")
    with pytest.raises(
        CacheError, match=r"list\.json is not a m: expected a JSON object, got list"
    ):
        read_record(tmp_path / "list.json", what="m", error=CacheError)
    (tmp_path / "noconf.json").write_text('{"config": 3}')
    with pytest.raises(ConfigError, match=r"its 'config' is 3, expected a dict"):
        read_record(tmp_path / "noconf.json", what="m", required_keys={"config": dict})


def test_ignored_keys_and_keys_added_with_a_null_default_are_no_difference() -> None:
    old = {"seed": 0, "logger": {"csv": {"save_dir": "/a"}}, "trainer": {"max_steps": 40}}
    new = {"seed": 0, "logger": {}, "trainer": {"max_steps": 60}, "method": None}
    assert config_differences(old, new, ignore=["logger"], absent_is_null=True) == [
        "trainer.max_steps: 40 → 60"
    ]
    assert "method: <absent> → null" in config_differences(old, new, ignore=["logger"])
    assert config_differences(old, {**new, "method": "semi"}, ["logger", "trainer"], True) == [
        'method: <absent> → "semi"'
    ]
    assert is_ignored("logger.csv", ["logger"]) and not is_ignored("loggers", ["logger"])
    same = fingerprint({"a": 1, "b": {"c": 2}, "log": 3}, ["log"])
    assert same == fingerprint({"b": {"c": 2}, "a": 1, "log": 4}, ["log"])
    assert same != fingerprint({"a": 2, "b": {"c": 2}}, ["log"]) and len(same) == 16
