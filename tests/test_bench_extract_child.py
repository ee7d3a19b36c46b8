"""scripts/bench_extract.py measures each method in its own process: one that dies must be reported, not waited on."""

from __future__ import annotations

import multiprocessing as mp
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bench_extract  # noqa: E402


def test_a_measuring_process_that_dies_raises_instead_of_hanging() -> None:
    args = bench_extract.parse_args(["--preset", "tiny", "--device", "cpu", "--examples", "2"])
    with pytest.raises(RuntimeError, match=r"no-such-method \(fp32\): the measuring process exited with code 1"):
        bench_extract.run_child(mp.get_context("spawn"), "no-such-method", "fp32", args)
