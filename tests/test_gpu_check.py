"""scripts/gpu_check.sh in its CPU dry run (``--tiny``): every step runs and the results file holds the
figures of each, and the checks inside them pass (batched features equal the per-example autograd
reference, bf16 features point where fp32 ones do, the 4-bit path's stores are finite)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_gpu_check_dry_run_writes_every_step(tmp_path: Path):
    results = tmp_path / "out" / "gpu_check.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    run = subprocess.run(["bash", "scripts/gpu_check.sh", "--tiny", str(results)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=1750)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(results.read_text())
    steps = out["steps"]
    assert out["environment"]["tiny"] is True
    assert set(steps) == {"extract", "cosine", "greedy_store", "greedy_exact", "greedy_stochastic", "qlora", "vllm"}
    for name, entry in steps.items():
        if name == "vllm" and entry.get("skipped"):
            continue
        assert entry["rc"] == 0, (name, entry.get("log_tail"))
    extract = steps["extract"]["figures"]["results"]["bf16"]
    assert set(extract) == {"extract-grad", "extract-adam", "fwd+bwd", "less"}
    assert all(r["tokens"] > 0 and r["seconds"] > 0 for r in extract.values())
    check = steps["cosine"]["figures"]["check"]
    assert check["grad_max_rel_err_fp32"] < 1e-3 and check["adam_max_rel_err_fp32"] < 1e-3
    assert check["grad_cos_bf16_min"] > 0.9
    # in bf16 the batched featurizer equals the one-at-a-time autograd reference run in bf16
    assert check["grad_cos_bf16_vs_autograd_bf16_min"] > 0.99 and check["adam_cos_bf16_vs_autograd_bf16_min"] > 0.99
    for kind in ("exact", "stochastic"):
        g = steps[f"greedy_{kind}"]["figures"]
        assert g["kind"] == kind and g["processes"] == 1 and g["n"] == 20000 and len(g["picks_digest"]) == 16
    q = steps["qlora"]["figures"]
    assert q["warmup_steps"] >= 1
    for feature in ("adam", "grad"):
        assert q[f"extract_{feature}"]["finite"] and q[f"extract_{feature}"]["nonzero_rows"] == 4
    assert not list(tmp_path.glob("gpu_check.*"))  # the work folder is removed
