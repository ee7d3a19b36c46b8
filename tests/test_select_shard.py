"""The greedy selector sharded over processes: 1 and 2 processes (gloo on CPU, ``accelerate launch``)
pick the same sequence with the same gains, λ and objective, equal to the one-array selector and, for
exact greedy, to the straightforward loop (`iaif select` under 2 processes: tests/test_select_cli.py)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from iaif.selection.estimators import marginal_gain, selection_objective
from iaif.selection.greedy import greedy_select
from iaif.selection.objective import Objective, default_lambda
from iaif.selection.shard import Shard

REPO = Path(__file__).resolve().parents[1]
LAUNCH_TWO = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]

# Each case: pool (seeded; few distinct rows repeated, so many exact ties), rows per chunk (the shard
# boundaries), k, greedy kind, one objective or two served round-robin, exact greedy's block (None: the
# default, blocks of 32 steps over 2 processes; 1: one collective a step).
CASES = {
    "exact-one": dict(n=1000, align=64, k=60, kind="exact", tasks=1),
    "exact-round-robin": dict(n=1000, align=64, k=60, kind="exact", tasks=2),
    "stochastic-one": dict(n=1000, align=64, k=60, kind="stochastic", tasks=1),
    "stochastic-round-robin": dict(n=1000, align=64, k=60, kind="stochastic", tasks=2),
    # rank 1 owns 6 rows and runs out of them; stochastic draws past half the pool use the free list
    "exact-small-shard": dict(n=70, align=64, k=50, kind="exact", tasks=1),
    "stochastic-most-of-pool": dict(n=70, align=64, k=50, kind="stochastic", tasks=2),
    "exact-one-step-at-a-time": dict(n=1000, align=64, k=60, kind="exact", tasks=2, block=1),
    "exact-blocks-of-3": dict(n=1000, align=64, k=60, kind="exact", tasks=1, block=3),
}

WORKER = '''
import json, sys
import torch
from iaif.common.dist import leave_launch
from iaif.selection.greedy import greedy_select
from iaif.selection.objective import Objective, default_lambda
from iaif.selection.shard import launch_shard

torch.set_num_threads(1)
cases = json.loads(sys.argv[2])
out = {}
for name, c in cases.items():
    g = torch.Generator().manual_seed(c["n"])
    distinct = torch.randn(25, 6, generator=g) * 0.5 + 0.2
    phi = distinct[torch.randint(25, (c["n"],), generator=g)].half()  # fp16, like a store
    shard = launch_shard(c["n"], c["align"])
    local = phi[shard.start : shard.stop]
    cols = [slice(0, 6)] if c["tasks"] == 1 else [slice(0, 2), slice(2, 6)]
    objs = []
    for t, cs in enumerate(cols):
        s = local[:, cs].float().mean(dim=1)
        lam = default_lambda(s, local[:, cs], c["k"], None, chunk_rows=16, shard=shard)
        objs.append(Objective(s, local[:, cs], lam, name=f"t{t}"))
    r = greedy_select(objs, c["k"], c["kind"], epsilon=0.2, shortlist=4, basis_rank=2, chunk_rows=16, seed=3,
                      progress=False, shard=shard, block=c.get("block"))
    out[name] = {"world": shard.world, "lam": [o.lam for o in objs], "indices": r.indices,
                 "gains": [s.gain for s in r.steps], "inter": [s.interaction for s in r.steps],
                 "value": [o.value(r.indices, shard, chunk_rows=7) for o in objs], "blocks": r.blocks}
    if shard.rank == 0:
        with open(sys.argv[1], "w") as fh:
            json.dump(out, fh)
leave_launch()
'''


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict]:
    tmp = tmp_path_factory.mktemp("shard")
    worker = tmp / "worker.py"
    worker.write_text(WORKER)
    out = {}
    for world, prefix in ((1, [sys.executable]), (2, LAUNCH_TWO)):
        dest = tmp / f"world{world}.json"
        run = subprocess.run([*prefix, str(worker), str(dest), json.dumps(CASES)], cwd=REPO, env=_env(),
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        out[world] = json.loads(dest.read_text())
    return out


def _phi(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(n)
    distinct = torch.randn(25, 6, generator=g) * 0.5 + 0.2
    return distinct[torch.randint(25, (n,), generator=g)].half()


def _straightforward(objectives: list[Objective], k: int) -> list[tuple[int, float]]:
    """Every step recomputes every gain; the largest wins, among equal gains the lowest index."""
    n = objectives[0].scores.shape[0]
    cums = [torch.zeros(o.curv.shape[1]) for o in objectives]
    selected = torch.zeros(n, dtype=torch.bool)
    out = []
    for step in range(k):
        o = objectives[step % len(objectives)]
        gain, _ = marginal_gain(o.scores, o.curv.float(), cums[step % len(objectives)], o.lam, o.scale)
        gain = gain.masked_fill(selected, -math.inf)
        best = int(torch.argmax(gain))
        selected[best] = True
        for obj, cum in zip(objectives, cums):
            cum += obj.curv[best].float()
        out.append((best, float(gain[best])))
    return out


def _objectives(name: str, lams: list[float]) -> list[Objective]:
    c = CASES[name]
    phi = _phi(c["n"])
    cols = [slice(0, 6)] if c["tasks"] == 1 else [slice(0, 2), slice(2, 6)]
    return [Objective(phi[:, cs].float().mean(dim=1), phi[:, cs], lam, name=f"t{t}")
            for t, (cs, lam) in enumerate(zip(cols, lams))]


def test_split_is_whole_chunks_covering_the_pool():
    for n, world, align in ((1000, 2, 64), (70, 2, 64), (10, 3, 4), (0, 2, 8), (5, 4, 1)):
        shards = [Shard.split(n, r, world, align) for r in range(world)]
        assert shards[0].start == 0 and shards[-1].stop == n
        assert all(a.stop == b.start for a, b in zip(shards, shards[1:]))
        assert all(s.start % align == 0 and s.size >= 0 for s in shards)
        sizes = [math.ceil(s.size / align) for s in shards]
        assert max(sizes) - min(sizes) <= 1 or n < world * align  # chunks as even as they go


@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", list(CASES))
def test_two_processes_pick_what_one_picks(runs, name):
    one, two = runs[1][name], runs[2][name]
    assert one["world"] == 1 and two["world"] == 2
    assert two == {**one, "world": 2, "blocks": two["blocks"]}  # picks, gains, λ and objective: bit for bit
    c = CASES[name]
    blocked = c["kind"] == "exact" and c.get("block") != 1
    # blocks: fewer exchanges than steps over 2 processes; one process steps one at a time unless told
    assert (0 < two["blocks"] < c["k"]) if blocked else two["blocks"] == 0
    assert (one["blocks"] > 0) == (c["kind"] == "exact" and (c.get("block") or 1) > 1)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", list(CASES))
def test_sharded_run_equals_the_one_array_selector(runs, name):
    c, got = CASES[name], runs[2][name]
    objs = _objectives(name, [0.0] * c["tasks"])
    lams = [default_lambda(o.scores, o.curv, c["k"], None, chunk_rows=16) for o in objs]
    assert lams == got["lam"]
    objs = _objectives(name, lams)
    ref = greedy_select(objs, c["k"], c["kind"], epsilon=0.2, shortlist=4, basis_rank=2, chunk_rows=16, seed=3,
                        progress=False)
    assert ref.indices == got["indices"] and [s.gain for s in ref.steps] == got["gains"]
    if c["kind"] == "exact":
        assert [(i, g) for i, g in zip(got["indices"], got["gains"])] == _straightforward(objs, c["k"])
    for o, v in zip(objs, got["value"]):
        assert v == pytest.approx(selection_objective(o.curv[got["indices"]].float(), o.lam, o.scores[got["indices"]]),
                                  abs=1e-4)
    assert len(set(got["indices"])) == c["k"]
