"""Benchmark of the exact greedy selector against the straightforward O(k·N·m) loop.

    python scripts/bench_greedy.py                      # N=270,000, m=256, k=13,500 (LESS scale, 5%)
    python scripts/bench_greedy.py --n 20000 --k 1000   # quick

The influence matrix Φ is synthetic but shaped like a LESS one: cosines between clustered,
L2-normalised pool features (with exact duplicates) and target features drawn near a few clusters.
λ follows the default rule of ``iaif.selection.objective.default_lambda``. The straightforward loop
(full gain recomputation, one N×m matrix-vector product per step) is timed for a few steps and
extrapolated to k. Peak memory is the growth of the process's peak resident size over the feature
matrix's creation, divided by the matrix's size.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from iaif.selection.estimators import marginal_gain
from iaif.selection.greedy import greedy_select
from iaif.selection.objective import Objective, default_lambda


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def synthetic_phi(n: int, m: int, latent: int, clusters: int, seed: int, chunk: int = 65536) -> torch.Tensor:
    """Cosines between clustered pool features (5% exact duplicates) and clustered targets, [n, m]."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.nn.functional.normalize(torch.randn(clusters, latent, generator=g), dim=1)
    target_clusters = torch.randint(clusters, (max(1, m // 16),), generator=g)
    tgt = centers[target_clusters.repeat_interleave(16)[:m]] + 0.7 * torch.randn(m, latent, generator=g) / latent**0.5
    tgt = torch.nn.functional.normalize(tgt, dim=1)
    phi = torch.empty(n, m)
    for i in range(0, n, chunk):
        rows = min(chunk, n - i)
        lab = torch.randint(clusters, (rows,), generator=g)
        x = centers[lab] + 1.5 * torch.randn(rows, latent, generator=g) / latent**0.5
        phi[i : i + rows] = torch.nn.functional.normalize(x, dim=1) @ tgt.T
    perm = torch.randperm(n, generator=g)
    phi[perm[: n // 20]] = phi[perm[n // 20 : 2 * (n // 20)]]  # distinct rows, so the copy is well defined
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
    ap.add_argument("--progress", action="store_true", help="show the greedy progress bar")
    args = ap.parse_args()
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
