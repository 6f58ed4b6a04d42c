"""Tests of lymphnode.core.atomic: atomic writes keep the old file or hold the whole new one."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lymphnode.core import atomic


def test_write_json_text_and_bytes_replace_the_target(tmp_path: Path) -> None:
    target = tmp_path / "a.json"
    target.write_text("old")
    atomic.write_json(target, {"b": 1, "a": [1, 2]}, sort_keys=True)
    assert target.read_text() == json.dumps({"a": [1, 2], "b": 1}, indent=2, sort_keys=True) + "\n"
    atomic.write_text(tmp_path / "t.txt", "µm\n")
    assert (tmp_path / "t.txt").read_bytes() == "µm\n".encode()
    atomic.write_bytes(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.bin", "t.txt"]


def test_save_npy_is_byte_identical_to_numpy(tmp_path: Path) -> None:
    array = np.arange(24, dtype="<i8").reshape(2, 3, 4)[:, ::2]  # not contiguous
    np.save(tmp_path / "ref.npy", array)
    atomic.save_npy(tmp_path / "ours.npy", array)
    atomic.save_npy(tmp_path / "plain.npy", array, atomic=False)
    ref = (tmp_path / "ref.npy").read_bytes()
    assert (tmp_path / "ours.npy").read_bytes() == ref == (tmp_path / "plain.npy").read_bytes()


def test_a_full_disk_keeps_the_old_file_and_leaves_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "m.json"
    target.write_text('{"old": true}\n')

    def full(fh, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic, "write_all", full)
    with pytest.raises(OSError, match="No space left"):
        atomic.write_json(target, {"new": True})
    assert target.read_text() == '{"old": true}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_atomic_path_removes_a_failed_temp_file_or_folder(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="bad"), atomic.atomic_path(tmp_path / "f.tif") as tmp:
        tmp.write_bytes(b"half")
        raise ValueError("bad")
    with pytest.raises(KeyboardInterrupt), atomic.atomic_path(tmp_path / "d") as tmp:
        tmp.mkdir()
        (tmp / "x").write_text("1")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    with atomic.atomic_path(tmp_path / "d") as tmp:
        tmp.mkdir()
        (tmp / "x").write_text("1")
    assert (tmp_path / "d/x").read_text() == "1"


def test_temp_names_are_hidden_unique_and_end_in_host_and_pid(tmp_path: Path) -> None:
    a, b = atomic.temp_name("m.json"), atomic.temp_name("m.json")
    assert a != b and a.startswith(".m.json.tmp-")
    assert a.endswith(f"-{atomic.owner_tag()}") and atomic.owner_tag().endswith(f"-{os.getpid()}")


def test_stale_temps_are_those_of_dead_processes_of_this_host() -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = atomic.owner_tag().rpartition("-")[0]
    prefix = ".m.json.tmp-"
    assert atomic.is_stale_temp(f"{prefix}ab12-{host}-{dead.pid}", prefix)
    assert not atomic.is_stale_temp(f"{prefix}ab12-{host}-{os.getpid()}", prefix)  # ours
    assert not atomic.is_stale_temp(f"{prefix}ab12-othernode7-{dead.pid}", prefix)
    assert atomic.is_stale_temp(f"{prefix}ab12-othernode7-{dead.pid}", prefix, other_hosts=True)
    assert atomic.is_stale_temp(f"{prefix}garbage", prefix)
