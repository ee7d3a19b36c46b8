"""Benchmark of the greedy selector: against the straightforward O(k·N·m) loop (in memory), and at
10M-example scale from a memory-mapped Φ store, sharded over processes.

    python scripts/bench_greedy.py                      # N=270,000, m=256, k=13,500 (LESS scale, 5%)
    python scripts/bench_greedy.py --n 20000 --k 1000   # quick

    # 10M scale: write the fp16 Φ store once, then exact / stochastic greedy in 1 or 2 processes
    python scripts/bench_greedy.py --n 10000000 --k 500000 --store /tmp/phi10m.npy --write-only
    OMP_NUM_THREADS=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \
        --dynamo_backend no scripts/bench_greedy.py --n 10000000 --k 500000 --store /tmp/phi10m.npy --kind stochastic

With ``--store`` each process memory-maps the store and reads only its shard of the rows (whole chunks
of ``--chunk-rows``), in chunks; per process it prints the greedy time and its peak resident memory
(file pages of the map included) against the size of its shard of Φ; process 0 prints a digest of the
picks, equal for any number of processes. No straightforward loop in this mode.

The influence matrix Φ is synthetic but shaped like a LESS one: cosines between clustered,
L2-normalised pool features (with exact duplicates) and target features drawn near a few clusters.
λ follows the default rule of ``iaif.selection.objective.default_lambda``. The straightforward loop
(full gain recomputation, one N×m matrix-vector product per step) is timed for a few steps and
extrapolated to k. Peak memory is the growth of the process's peak resident size over the feature
matrix's creation, divided by the matrix's size.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from iaif.common.dist import leave_launch
from iaif.common.progress import log_to_stderr
from iaif.selection.estimators import marginal_gain
from iaif.selection.greedy import greedy_select
from iaif.selection.objective import Objective, default_lambda
from iaif.selection.shard import Shard, launch_shard


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def fill_synthetic_phi(out: np.ndarray, latent: int, clusters: int, seed: int, chunk: int = 65536) -> None:
    """Cosines between clustered pool features (5% exact duplicates) and clustered targets into
    ``out`` ([n, m], in memory or memory-mapped), chunk by chunk."""
    n, m = out.shape
    g = torch.Generator().manual_seed(seed)
    centers = torch.nn.functional.normalize(torch.randn(clusters, latent, generator=g), dim=1)
    target_clusters = torch.randint(clusters, (max(1, m // 16),), generator=g)
    tgt = centers[target_clusters.repeat_interleave(16)[:m]] + 0.7 * torch.randn(m, latent, generator=g) / latent**0.5
    tgt = torch.nn.functional.normalize(tgt, dim=1)
    for i in range(0, n, chunk):
        rows = min(chunk, n - i)
        lab = torch.randint(clusters, (rows,), generator=g)
        x = centers[lab] + 1.5 * torch.randn(rows, latent, generator=g) / latent**0.5
        out[i : i + rows] = (torch.nn.functional.normalize(x, dim=1) @ tgt.T).numpy()
    perm = torch.randperm(n, generator=g).numpy()
    out[perm[: n // 20]] = out[perm[n // 20 : 2 * (n // 20)]]  # distinct rows, so the copy is well defined


def synthetic_phi(n: int, m: int, latent: int, clusters: int, seed: int) -> torch.Tensor:
    """``fill_synthetic_phi`` into a float32 tensor in memory."""
    phi = torch.empty(n, m)
    fill_synthetic_phi(phi.numpy(), latent, clusters, seed)
    return phi


def straightforward_loop(obj: Objective, steps: int) -> tuple[float, list[int]]:
    """Time the plain loop (every step recomputes all N gains from C(A) with one N×m matrix-vector
    product, ‖φ‖² cached, and takes the argmax): seconds per step and the rows it picked."""
    n, m = obj.curv.shape
    sq = obj.curv.square().sum(dim=1)
    cum = torch.zeros(m)
    chosen = torch.zeros(n, dtype=torch.bool)
    picks: list[int] = []
    start = time.perf_counter()
    for _ in range(steps):
        gain, _ = marginal_gain(obj.scores, obj.curv, cum, obj.lam, obj.scale, sq, exact_rows=False)
        gain[chosen] = -float("inf")
        j = int(torch.argmax(gain))
        chosen[j] = True
        cum += obj.curv[j]
        picks.append(j)
    return (time.perf_counter() - start) / steps, picks


def _store_shard(args: argparse.Namespace) -> tuple[torch.Tensor, Shard]:
    """This process's rows of the memory-mapped Φ store (written first when missing, one process only)."""
    path = Path(args.store)
    if not path.is_file():
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise SystemExit(f"{path}: no such store; write it first in one process (--write-only)")
        tmp = path.with_suffix(".partial.npy")
        start = time.perf_counter()
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.dtype(args.dtype), shape=(args.n, args.m))
        fill_synthetic_phi(out, args.latent, args.clusters, args.seed)
        out.flush()
        del out
        tmp.rename(path)
        print(f"wrote {path} ({args.dtype}[{args.n}, {args.m}]) in {time.perf_counter() - start:.0f} s")
    array = np.load(path, mmap_mode="r")
    if array.shape != (args.n, args.m):
        raise SystemExit(f"{path}: holds {list(array.shape)}, --n/--m say [{args.n}, {args.m}]")
    shard = launch_shard(args.n, args.chunk_rows)
    with warnings.catch_warnings():  # read-only map: the selector never writes to it
        warnings.simplefilter("ignore", UserWarning)
        rows = torch.from_numpy(array[shard.start : shard.stop])
    return rows, shard


def _gather_figures(shard: Shard, figures: list[float]) -> list[list[float]]:
    """Every process's figures (on process 0's screen)."""
    if shard.world == 1:
        return [figures]
    import torch.distributed as dist

    every = [torch.zeros(len(figures), dtype=torch.float64) for _ in range(shard.world)]
    dist.all_gather(every, torch.tensor(figures, dtype=torch.float64))
    return [t.tolist() for t in every]


def _ratio(a: float, b: float) -> float:
    """a / b; NaN for a rank that owns no rows (N below two chunks)."""
    return a / b if b else float("nan")


def store_main(args: argparse.Namespace) -> None:
    """Greedy from the memory-mapped store, sharded over the launch's processes (module docstring)."""
    rss0 = _peak_rss_bytes()
    curv, shard = _store_shard(args)
    if args.write_only:
        return
    device = torch.device(args.device if args.device != "cuda" else f"cuda:{torch.cuda.current_device()}")
    start = time.perf_counter()
    if device.type != "cpu":
        curv = curv.to(device)
    scores = torch.empty(shard.size, dtype=torch.float32, device=device)
    for i in range(0, shard.size, args.chunk_rows):
        scores[i : i + args.chunk_rows] = curv[i : i + args.chunk_rows].float().mean(dim=1)
    lam = default_lambda(scores, curv, args.k, None, shard=shard)
    obj = Objective(scores, curv, lam)
    setup = time.perf_counter() - start
    start, cpu_start = time.perf_counter(), time.process_time()
    result = greedy_select([obj], args.k, args.kind, args.epsilon, args.shortlist, chunk_rows=args.chunk_rows,
                           seed=args.seed, progress=args.progress and shard.rank == 0, shard=shard,
                           block=args.block)
    took, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    value = obj.value(result.indices, shard)
    phi_bytes = curv.numel() * curv.element_size()
    figures = [took, setup, _peak_rss_bytes(), rss0, phi_bytes, result.refreshes, cpu, result.blocks]
    every = _gather_figures(shard, figures)
    if shard.rank != 0:
        return
    digest = hashlib.sha256(json.dumps(result.indices).encode()).hexdigest()[:16]
    print(f"N={args.n} m={args.m} k={args.k} {args.kind} greedy, {shard.world} process(es), "
          f"threads {torch.get_num_threads()}, {args.dtype} store, device {device}, λ={lam:.6g}")
    for r, (t, su, peak, base, phib, refr, c, blocks) in enumerate(every):
        print(f"  rank {r}: greedy {t:.1f} s ({c:.1f} s of CPU) (+ scores and λ {su:.1f} s), full passes {int(refr)}, "
              f"blocks {int(blocks)}, "
              f"peak RSS {peak / 2**30:.2f} GiB = {_ratio(peak, phib):.2f}× its Φ shard ({phib / 2**30:.2f} GiB; "
              f"{_ratio(peak - base, phib):.2f}× without the {base / 2**30:.2f} GiB at start)")
    print(f"J = {value:.6g}, picks digest {digest} (first {result.indices[:5]})")
    if args.picks:
        Path(args.picks).write_text(json.dumps(result.indices))
    if args.json:
        ranks = [{"greedy_seconds": round(t, 2), "greedy_cpu_seconds": round(c, 2), "setup_seconds": round(su, 2),
                  "full_passes": int(refr), "peak_rss_gib": round(peak / 2**30, 3), "phi_shard_gib": round(phib / 2**30, 3),
                  "peak_over_phi": round(_ratio(peak, phib), 3), "blocks": int(blocks)}
                 for t, su, peak, base, phib, refr, c, blocks in every]
        Path(args.json).write_text(json.dumps({
            "n": args.n, "m": args.m, "k": args.k, "kind": args.kind, "processes": shard.world, "dtype": args.dtype,
            "device": str(device), "lambda": lam, "objective": value, "picks_digest": digest, "ranks": ranks}, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=270_000)
    ap.add_argument("--m", type=int, default=256)
    ap.add_argument("--k", type=int, default=13_500)
    ap.add_argument("--latent", type=int, default=128)
    ap.add_argument("--clusters", type=int, default=2000)
    ap.add_argument("--shortlist", type=int, default=1024)
    ap.add_argument("--naive-steps", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--progress", action="store_true", help="show the greedy progress (a bar, or a log line every 30 s)")
    ap.add_argument("--store", help="memory-mapped Φ (.npy): sharded run from it (written when missing)")
    ap.add_argument("--dtype", default="float16", choices=["float16", "float32"], help="dtype of a new store")
    ap.add_argument("--write-only", action="store_true", help="only write the store")
    ap.add_argument("--kind", default="exact", choices=["exact", "stochastic"])
    ap.add_argument("--block", type=int, default=None,
                    help="exact greedy: steps proposed per exchange between processes (default: 32 when "
                         "sharded, else 1)")
    ap.add_argument("--epsilon", type=float, default=0.01, help="stochastic greedy's ε")
    ap.add_argument("--chunk-rows", type=int, default=65536)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (store mode)")
    ap.add_argument("--picks", help="store mode: write the picked indices (JSON) here")
    ap.add_argument("--json", help="store mode: write the figures (JSON) here")
    args = ap.parse_args()
    if args.progress:  # a redirected run reports progress through logging
        log_to_stderr()
    if args.store:
        store_main(args)
        leave_launch()  # a launched rank exits here, past gloo's teardown at interpreter exit
        return
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    rss0 = _peak_rss_bytes()
    phi = synthetic_phi(args.n, args.m, args.latent, args.clusters, args.seed)
    matrix_bytes = phi.numel() * phi.element_size()
    scores = phi.mean(dim=1)
    lam = default_lambda(scores, phi, args.k, None)
    obj = Objective(scores, phi, lam)
    print(f"N={args.n} m={args.m} k={args.k}  Φ {matrix_bytes / 2**20:.0f} MiB fp32  λ={lam:.4g}")
    base_peak = max(_peak_rss_bytes(), rss0 + matrix_bytes)

    start = time.perf_counter()
    result = greedy_select([obj], args.k, shortlist=args.shortlist, progress=args.progress)
    fast = time.perf_counter() - start
    extra = max(0, _peak_rss_bytes() - base_peak)
    print(f"exact greedy (shortlist + bounds): {fast:.1f} s, {result.refreshes} full refreshes, "
          f"J = {obj.value(result.indices):.6g}")

    threads = torch.get_num_threads()
    per_step = {}
    for t in sorted({1, threads}):
        torch.set_num_threads(t)
        per_step[t], picks = straightforward_loop(obj, args.naive_steps)
    torch.set_num_threads(threads)
    best_t = min(per_step, key=per_step.get)
    naive = per_step[best_t] * args.k
    print(f"straightforward loop (best of {sorted(per_step)} threads: {best_t}): "
          f"{per_step[best_t] * 1e3:.1f} ms/step × {args.k} = {naive:.0f} s (extrapolated)")
    print(f"speed-up: {naive / fast:.1f}×; same first {len(picks)} picks as the plain loop: "
          f"{picks == result.indices[: len(picks)]}")
    print(f"peak memory: (Φ + selector overhead) / Φ = {(matrix_bytes + extra) / matrix_bytes:.2f}×  "
          f"(overhead {extra / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()
