"""scripts/bench_extract.py measures each method in its own process: one that dies must be reported, not waited on."""

from __future__ import annotations

import json
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


def test_a_failing_method_leaves_the_others_measured(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Out of memory in one method (as adam at a too-large token budget on the H200) must not lose the other figures."""
    def fake_child(ctx: object, job: str, dtype: str, args: object) -> dict[str, float]:
        if job == "extract-adam":
            raise RuntimeError(f"{job} ({dtype}): the measuring process exited with code 1")
        return {"examples": 2, "tokens": 128, "seconds": 0.5, "projection_seconds": 0.1, "peak_mb": 10.0}

    monkeypatch.setattr(bench_extract, "run_child", fake_child)
    out = tmp_path / "bench.json"
    monkeypatch.setattr(sys, "argv", ["bench_extract.py", "--rounds", "2", "--json", str(out)])
    with pytest.raises(SystemExit, match="extract-adam"):
        bench_extract.main()
    figures = json.loads(out.read_text())
    assert set(figures["results"]["fp32"]) == {"extract-grad", "fwd+bwd", "less"}
    assert list(figures["failed"]) == ["fp32 extract-adam"]
