"""Atomic writes: one temporary-name scheme, nothing torn or left behind on failure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from iaif.common.atomic import atomic_path, remove_stale_temps, temp_path, write_json, write_jsonl, write_text


def test_writes_land_whole_and_leave_no_temp(tmp_path: Path) -> None:
    write_text(tmp_path / "a" / "x.txt", "héllo")
    write_json(tmp_path / "y.json", {"b": 1, "a": [1, 2]}, indent=2, sort_keys=True)
    write_jsonl(tmp_path / "z.jsonl", [{"t": "é"}, {"t": 2}])
    assert (tmp_path / "a" / "x.txt").read_text(encoding="utf-8") == "héllo"
    assert (tmp_path / "y.json").read_text() == json.dumps({"a": [1, 2], "b": 1}, indent=2)
    assert (tmp_path / "z.jsonl").read_text(encoding="utf-8") == '{"t": "é"}\n{"t": 2}\n'
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "x.txt", "y.json", "z.jsonl"]


def test_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    target = write_text(tmp_path / "x.txt", "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["x.txt"]


def test_remove_stale_temps_removes_only_the_scheme(tmp_path: Path) -> None:
    assert temp_path(tmp_path / "x.json") == tmp_path / f".x.json.tmp-{os.getpid()}"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a writer that was killed: its pid belongs to no process any more
    (tmp_path / f".x.json.tmp-{dead.pid}").write_text("left by a killed writer")
    (tmp_path / f".ckpt.tmp-{dead.pid}").mkdir()
    (tmp_path / f".ckpt.tmp-{dead.pid}" / "f").write_text("")
    (tmp_path / f".y.json.tmp-{os.getppid()}").write_text("a writer that is still running")
    for keep in ("x.json", ".hidden", "x.tmp-1"):
        (tmp_path / keep).write_text("")
    assert [p.name for p in remove_stale_temps(tmp_path, "ckpt")] == [f".ckpt.tmp-{dead.pid}"]
    assert [p.name for p in remove_stale_temps(tmp_path)] == [f".x.json.tmp-{dead.pid}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden", f".y.json.tmp-{os.getppid()}", "x.json", "x.tmp-1"]
    assert remove_stale_temps(tmp_path / "missing") == []
