"""Shared plumbing: temporary files, device checks, progress reporting."""

from __future__ import annotations

import io
import logging
import sys

import pytest
import torch
from tqdm import tqdm

from iaif.common.atomic import remove_stale_temps, temp_path, write_text
from iaif.common.device import check_device
from iaif.common.progress import LineProgress, progress


def test_atomic_write_leaves_only_the_final_file(tmp_path):
    write_text(tmp_path / "a.json", "{}")
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
    assert temp_path(tmp_path / "a.json").name.startswith(".a.json.tmp-")


def test_remove_stale_temps_keeps_other_names_and_plain_files(tmp_path):
    (tmp_path / ".a.json.tmp-999999999").write_text("x")  # no such pid
    (tmp_path / ".b.json.tmp-999999999").write_text("x")
    (tmp_path / "a.json").write_text("x")
    removed = remove_stale_temps(tmp_path, ["a.json"])
    assert [p.name for p in removed] == [".a.json.tmp-999999999"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".b.json.tmp-999999999", "a.json"]


def test_check_device_accepts_cpu_and_names_the_field_for_bad_ones():
    assert check_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="^model.device: 'tpu9' is not a torch device"):
        check_device("tpu9", "model.device")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="^device: 'cuda:0' asked for, but"):
            check_device("cuda:0")


def test_progress_is_a_bar_on_a_terminal_and_log_lines_otherwise(monkeypatch, caplog):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    bar = progress(10, "extract", "ex")
    assert isinstance(bar, tqdm)
    bar.close()
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert isinstance(progress(10, "extract", "ex"), LineProgress)
    with caplog.at_level(logging.INFO, logger="iaif.progress"):
        lines = LineProgress(10, "extract", "ex", every_s=0.0)
        lines.update(5)
        lines.set_postfix(tok_s=120)
        lines.close()
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and messages[0].startswith("extract: 5/10 ex (50%), ")
    assert messages[1].endswith("ex/s, tok_s=120")
