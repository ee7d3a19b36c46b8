"""Greedy maximisation of the interaction-aware objective (METHOD.md §2), never the N×N matrix.

Each objective is J(A) = Σ_{a∈A} s_a − (λ/2) Σ_{a,b∈A} κ(a, b) with κ(a, b) = scale·⟨ψ_a, ψ_b⟩ over
curvature features ψ ([N, q]); the gain of a candidate is ``iaif.selection.estimators.marginal_gain``.

Exact greedy ("bounded"): the straightforward loop recomputes all N gains every step (one N×q
matrix-vector product per step, O(k·N·q)). Here gains are recomputed over the whole pool only at a
*refresh*; in between, a shortlist of the best candidates is kept exact, and every other candidate c
is bounded from above with the gains of the last refresh (C_ref):

    gain_c(C) = g_ref,c − coef·ψ_cᵀ(C − C_ref),   coef = λ·scale
    ψ_cᵀΔ = z_cᵀ w + ψ⊥_cᵀ Δ⊥ ≥ z_cᵀ w − ‖ψ⊥_c‖‖Δ⊥‖      (z = Eᵀψ, w = EᵀΔ, E a rank-r basis)

so U_c = g_ref,c − coef·z_cᵀw + coef·‖ψ⊥_c‖‖Δ⊥‖ ≥ gain_c. The best shortlist gain is the exact argmax
when it beats every U_c; candidates whose bound it does not beat get their exact gain computed and join
the shortlist; when there are too many of them, the step refreshes (once: if even then too many
candidates could reach the best gain, e.g. thousands of exact duplicates, their exact gains are
computed directly for that step). The result equals the straightforward loop step for step, ties
included. Tie rule: among candidates of equal gain the lowest candidate index wins; gains are
computed row by row (``marginal_gain``), so equal rows tie exactly. E spans the leading
right singular vectors of a seeded row sample of ψ, where influence features put most of their mass;
the bound is applied with per-coordinate extremes of z over the whole pool, so only a prefix of the
outside candidates (sorted by refresh gain) is ever looked at. A refresh sorts only the head of them
that such a prefix reaches before another refresh is due (a k-th-value selection, then a sort of the
head); past the head, the refresh gains are scanned. Full passes run in blocks of about 4 MiB of
float32, which stay in the CPU's cache. On CPU the selector runs single-threaded (the per-step work is
small; one thread also makes runs bit-for-bit repeatable).

Stochastic greedy (Mirzasoleiman et al. 2015): each step evaluates the exact gain of
⌈(N/k)·ln(1/ε)⌉ random unselected candidates and takes the best. The candidates are drawn uniformly
(with replacement) among the unselected ones by rejection: uniform draws over all N, those already
selected dropped, until enough are kept (while at least half the pool is unselected; after that, from
the list of unselected rows), so a step costs O(sample), not O(N).

Sharded over processes (``iaif.selection.shard``): each rank's trackers hold its slice of the
candidates, every rank keeps the mask of selected rows of the whole pool, each step's winner is the
best of the ranks' bests (lowest global index among equal gains) and its rows reach every rank, and the
stochastic draws come from one seeded generator advanced identically on every rank: the picks are the
same for any number of processes.

Both kinds are trackers of one objective's gains (``GainTracker``: ``best`` picks a row, ``add``
accounts for a pick): ``ExactTracker`` and ``StochasticTracker``. Several objectives (one per target
task, ``iaif.selection.objective``) are served round-robin: step i takes the pick of tracker i mod T;
every tracker sees every pick. A sum of objectives is a single objective.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import torch

from iaif.common.progress import progress_iter
from iaif.selection.estimators import marginal_gain
from iaif.selection.objective import Objective
from iaif.selection.shard import Shard

logger = logging.getLogger(__name__)

GreedyKind = Literal["exact", "stochastic"]


@dataclass(frozen=True)
class GreedyStep:
    """One greedy step: the chosen row, its gain and the gain's two parts (gain = first − inter)."""

    rank: int
    index: int
    gain: float
    first_order: float
    interaction: float
    task: str


@dataclass(frozen=True)
class GreedyResult:
    steps: list[GreedyStep]
    refreshes: int
    """Full passes over the pool (over this process's candidates when sharded; exact greedy); 0 for
    stochastic greedy."""

    @property
    def indices(self) -> list[int]:
        return [s.index for s in self.steps]


def _row_chunks(n: int, chunk_rows: int) -> list[slice]:
    return [slice(i, min(i + chunk_rows, n)) for i in range(0, n, chunk_rows)]


def _pass_rows(q: int, chunk_rows: int) -> int:
    """Rows per block of a full pass over ψ: about 4 MiB of float32, so the converted block stays in the
    CPU's cache between the conversion and the product (3× faster than 64k-row blocks at q = 256)."""
    return max(1, min(chunk_rows, 2**20 // max(q, 1)))


class _Float32Rows:
    """Row chunks of ψ as float32: the rows themselves when ψ is float32, else converted into one
    reused buffer (a fresh chunk-sized allocation per chunk costs page faults on every pass)."""

    def __init__(self, curv: torch.Tensor, chunk_rows: int):
        self.curv = curv
        convert = curv.dtype != torch.float32
        self.buf = torch.empty(min(chunk_rows, curv.shape[0]) if convert else 0, curv.shape[1], dtype=torch.float32,
                               device=curv.device)

    def __call__(self, sl: slice) -> torch.Tensor:
        rows = self.curv[sl]
        return rows if rows.dtype == torch.float32 else self.buf[: rows.shape[0]].copy_(rows)


def _sq_norms(curv: torch.Tensor, chunk_rows: int, name: str) -> torch.Tensor:
    """‖ψ_c‖² of every row; NaN or inf features are an error naming the first such row."""
    out = torch.empty(curv.shape[0], dtype=torch.float32, device=curv.device)
    chunk = _Float32Rows(curv, chunk_rows)
    for sl in _row_chunks(curv.shape[0], chunk_rows):
        rows = chunk(sl)
        out[sl] = (rows * rows).sum(dim=1)  # as marginal_gain computes it, row by row
    bad = ~torch.isfinite(out)
    if bool(bad.any()):
        raise ValueError(f"objective '{name}': curvature features of row {int(bad.nonzero()[0])} are NaN or inf")
    return out


def _leading_directions(curv: torch.Tensor, rank: int, seed: int) -> torch.Tensor:
    """An orthonormal [q, rank] basis of the leading right singular vectors of a seeded row sample of
    ψ. It only tightens the bounds of the exact greedy; any orthonormal basis keeps the result exact."""
    n, q = curv.shape
    if rank == 0:
        return torch.zeros(q, 0, dtype=torch.float32, device=curv.device)
    sample_rows = min(16384, max(4 * rank, 2**22 // q))  # the SVD costs about rows · q · min(rows, q)
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randperm(n, generator=gen)[:sample_rows].sort().values.to(curv.device)
    _, _, vh = torch.linalg.svd(curv[rows].float(), full_matrices=False)
    return vh[:rank].T.contiguous()


class ExactTracker:
    """Exact greedy gains of one objective with a shortlist and refresh bounds (module docstring)."""

    def __init__(self, obj: Objective, selected: torch.Tensor, shortlist: int, basis_rank: int,
                 chunk_rows: int, seed: int):
        self.obj, self.selected, self.chunk_rows = obj, selected, chunk_rows
        self.m_short = shortlist
        n, q = obj.curv.shape
        self.pass_rows = _pass_rows(q, chunk_rows)
        self.free = n - int(selected.sum())
        dev = obj.curv.device
        self.sq = _sq_norms(obj.curv, self.pass_rows, obj.name)
        self.cum = torch.zeros(q, dtype=torch.float32, device=dev)
        self.coef = obj.coef
        rank = min(basis_rank, q, n) if self.coef > 0 else 0
        self.basis = _leading_directions(obj.curv, rank, seed)
        self.z = torch.empty(n, self.basis.shape[1], dtype=torch.float32, device=dev)
        self.rows = _Float32Rows(obj.curv, self.pass_rows)
        for sl in _row_chunks(n, self.pass_rows):
            self.z[sl] = self.rows(sl) @ self.basis
        self.perp = (self.sq - (self.z * self.z).sum(dim=1)).clamp_min(0).sqrt()
        self.psi_max = float(self.sq.max().sqrt()) if n else 0.0
        # extremes of the bound terms over the whole pool: they hold for every subset of outside candidates
        r = self.z.shape[1]
        self.zmin = self.z.amin(dim=0) if n and r else torch.zeros(r, device=dev)
        self.zmax = self.z.amax(dim=0) if n and r else torch.zeros(r, device=dev)
        self.perp_max = float(self.perp.max()) if n else 0.0
        self.short_idx = self.short_psi = self.short_scores = self.short_sq = torch.empty(0)
        self._drop_outside()
        self.refreshes = 0
        self.refresh_cost = n * (q + 32) // (self.basis.shape[1] + 1)  # a refresh's work, in bounded rows
        self.ties_persist = False  # the last step had more near-best candidates than a refresh could shortlist
        self._refresh()

    def _refresh(self) -> None:
        """Exact gains of the whole pool at the current C; the best ``shortlist`` candidates tracked
        exactly, the rest ("outside") bounded. Only the head of the candidates is sorted by gain (as a
        stable sort of all would order it): every prefix that a step bounds without refreshing lies in
        it; beyond it, the gains of the refresh are scanned (``_window``)."""
        self.refreshes += 1
        self._drop_outside()  # before the new ones are built: the peak holds one set, not two
        o, n = self.obj, self.obj.scores.shape[0]
        g = torch.empty(n, dtype=torch.float32, device=self.cum.device)
        for sl in _row_chunks(n, self.pass_rows):
            # refresh gains only order and bound the candidates (within tol), so the fast product will do
            g[sl] = marginal_gain(o.scores[sl], self.rows(sl), self.cum, o.lam, o.scale, self.sq[sl],
                                  exact_rows=False)[0]
        g.masked_fill_(self.selected, -math.inf)
        free = int((~self.selected).sum())
        m = min(self.m_short, free)
        self.n_out = free - m
        head = min(free, m + self._refresh_prefix() + 1)
        if head < free:  # the head: every candidate at least the head-th largest gain
            self.rest_max = float(torch.kthvalue(g, n - head + 1).values)  # every other one is below it
            top = (g >= self.rest_max).nonzero().squeeze(1)
        else:
            self.rest_max = -math.inf
            top = (~self.selected).nonzero().squeeze(1)
        top_g, pos = torch.sort(g[top], descending=True, stable=True)
        order = top[pos]
        self._set_shortlist(order[:m])
        # the head's outside candidates in order of their refresh gain, with their bound terms alongside
        self.out_order, self.out_g = order[m:], top_g[m:].contiguous()
        self.out_neg_g = -self.out_g
        self.out_z, self.out_perp = self.z.index_select(0, self.out_order), self.perp.index_select(0, self.out_order)
        self.ref_g = g
        self.cum_ref = self.cum.clone()
        self.bounded = 0  # rows bounded since this refresh
        self.outside = ~self.selected
        self.outside[self.short_idx] = False

    def _refresh_prefix(self) -> int:
        """The longest prefix of outside candidates a step bounds rather than refreshing."""
        return self.n_out // 4 + self.m_short

    def _drop_outside(self) -> None:
        """Release the last refresh's gains, head order and bound terms."""
        empty = torch.empty(0)
        self.out_order = self.out_g = self.out_neg_g = self.out_z = self.out_perp = self.ref_g = empty
        self.outside = empty.bool()
        self.n_out, self.rest_max = 0, -math.inf

    def _window(self, threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Outside candidates whose refresh gain is ≥ ``threshold`` (a prefix of the head, or, past its
        end, a scan of all refresh gains), with their refresh gains, z and ‖ψ⊥‖: (rows, g, z, perp)."""
        prefix = int(torch.searchsorted(self.out_neg_g, -threshold, right=True))
        if prefix < len(self.out_order) or threshold > self.rest_max:
            return self.out_order[:prefix], self.out_g[:prefix], self.out_z[:prefix], self.out_perp[:prefix]
        rows = ((self.ref_g >= threshold) & self.outside).nonzero().squeeze(1)
        return rows, self.ref_g[rows], self.z.index_select(0, rows), self.perp.index_select(0, rows)

    def _set_shortlist(self, idx: torch.Tensor, extend: bool = False) -> None:
        """The candidates tracked exactly (``extend``: these join the current ones), with their rows,
        scores and squared norms alongside."""
        o = self.obj
        new = [idx, o.curv.index_select(0, idx).float(), o.scores.index_select(0, idx), self.sq.index_select(0, idx)]
        if extend:
            old: list[torch.Tensor] = [self.short_idx, self.short_psi, self.short_scores, self.short_sq]
            new = [torch.cat([a, b]) for a, b in zip(old, new)]
        self.short_idx, self.short_psi, self.short_scores, self.short_sq = new

    def add(self, index: int, local: int, row: torch.Tensor) -> None:
        self.cum += row
        if local >= 0:
            self.outside[local] = False
            self.free -= 1

    def best(self) -> tuple[int, float, float]:
        """Exact argmax of the gain over unselected candidates, the lowest index among equal gains:
        (index, gain, interaction part).

        Terminates whatever the number of ties: a step refreshes at most once; when even then more
        candidates than the shortlist could reach the best gain (e.g. thousands of exact duplicates),
        their exact gains are computed directly, in chunks, for this step, and the following steps do
        so without refreshing first until the ties are gone. (−1, −inf, 0) when every row is selected."""
        o = self.obj
        if self.free == 0:
            return -1, -math.inf, 0.0
        refreshed = False
        while True:
            idx = self.short_idx
            g, inter = marginal_gain(self.short_scores, self.short_psi, self.cum, o.lam, o.scale, self.short_sq)
            g = g.masked_fill(self.selected.index_select(0, idx), -math.inf)
            j = _first_best(idx, g)
            b = float(g[j])
            if not math.isfinite(b):
                if refreshed:
                    raise ValueError(f"objective '{o.name}': no finite gain left (features too large for float32?)")
                self._refresh()
                refreshed = True
                continue
            delta = self.cum - self.cum_ref
            w = self.basis.T @ delta
            d_perp = math.sqrt(max(float(delta @ delta) - float(w @ w), 0.0))
            tol = 1e-5 * abs(b) + 1e-5 * self.coef * (self.psi_max ** 2 + self.psi_max * float(self.cum.norm()))
            # max over outside c of (−z_cᵀw), coordinate by coordinate, + the ⊥ part: one slack for all
            slack = self.coef * (float(torch.maximum(-w * self.zmin, -w * self.zmax).sum()) + self.perp_max * d_perp)
            # outside candidates whose refresh gain plus that slack could still beat b
            rows, g_ref, z, perp = self._window(b - tol - slack)
            if len(rows) == 0:
                self.ties_persist = False
                return int(idx[j]), b, float(inter[j])
            self.bounded += len(rows)
            # refresh when they are a large part of the pool, or when the bounding work since the
            # last refresh (r + 1 products a row) has added up to what a refresh costs (q a row, plus
            # the sort): paying for bounds never costs more than about twice the best refresh schedule
            if ((len(rows) > self._refresh_prefix() or self.bounded > self.refresh_cost)
                    and not refreshed and not self.ties_persist):
                self._refresh()
                refreshed = True
                continue
            bound = torch.addmv(g_ref, z, w, alpha=-self.coef)
            bound += (self.coef * d_perp) * perp
            hit = (bound >= b - tol).nonzero().squeeze(1)
            cand = rows[hit]
            cand = cand[self.outside[cand]]
            if cand.numel() == 0:
                self.ties_persist = False
                return int(idx[j]), b, float(inter[j])
            if cand.numel() > self.m_short or len(idx) + cand.numel() > 4 * self.m_short:
                if not refreshed and not self.ties_persist:
                    self._refresh()
                    refreshed = True
                    continue
                self.ties_persist = True  # a refresh did not help: skip it while the ties last
                return self._best_of(torch.cat([idx[j : j + 1], cand]))
            self._set_shortlist(cand, extend=True)
            self.outside[cand] = False

    def _best_of(self, rows: torch.Tensor) -> tuple[int, float, float]:
        """Exact best of the unselected ``rows`` (lowest index among equal gains), in row chunks."""
        o = self.obj
        best: tuple[int, float, float] | None = None
        for sl in _row_chunks(len(rows), self.chunk_rows):
            part = rows[sl]
            g, inter = marginal_gain(o.scores[part], o.curv[part].float(), self.cum, o.lam, o.scale, self.sq[part])
            g = g.masked_fill(self.selected[part], -math.inf)
            j = _first_best(part, g)
            here = (int(part[j]), float(g[j]), float(inter[j]))
            if best is None or here[1] > best[1] or (here[1] == best[1] and here[0] < best[0]):
                best = here
        assert best is not None
        return best


def _first_best(idx: torch.Tensor, g: torch.Tensor) -> int:
    """Position in ``g`` of the largest gain; among equal gains, the one of the lowest candidate index."""
    ties = (g == g.max()).nonzero().squeeze(1)
    return int(ties[torch.argmin(idx[ties])])


class StochasticTracker:
    """Stochastic greedy gains of one objective: each ``best`` draws ``sample`` unselected candidates
    of the whole pool from ``gen`` (shared by the objectives served round-robin, advanced alike on
    every rank) and takes the best of those this shard owns."""

    refreshes = 0

    def __init__(self, obj: Objective, selected: torch.Tensor, shard: Shard, sample: int, gen: np.random.Generator,
                 chunk_rows: int):
        self.obj, self.selected, self.shard, self.sample, self.gen = obj, selected, shard, sample, gen
        self.free = shard.n - int(selected.sum())
        self.mask = selected.cpu()  # where the draws are checked (a copy kept up to date when on a GPU)
        self.mask_np = self.mask.numpy()  # the same memory: per-step work on ~100 draws is cheapest in numpy
        self.cum = torch.zeros(obj.curv.shape[1], dtype=torch.float32, device=selected.device)
        self.sq = _sq_norms(obj.curv, chunk_rows, obj.name)

    def add(self, index: int, local: int, row: torch.Tensor) -> None:
        self.cum += row
        self.free -= 1
        self.mask[index] = True  # the shared mask itself on the CPU (set already), else the copy

    def _draw(self) -> np.ndarray:
        """This step's candidates: ``sample`` uniform draws among the unselected rows of the whole pool,
        with replacement, distinct and sorted (global indices)."""
        n, want, mask = self.shard.n, min(self.sample, self.free), self.mask_np
        if 2 * self.free >= n:  # rejection: a draw is kept with probability ≥ ½
            kept: list[np.ndarray] = []
            got = 0
            while got < want:
                draw = self.gen.integers(n, size=want)
                draw = draw[~mask[draw]]
                kept.append(draw)
                got += len(draw)
            pick = np.concatenate(kept)[:want]
        else:
            free = np.flatnonzero(~mask)
            pick = free[self.gen.integers(len(free), size=want)]
        pick.sort()
        return pick[np.concatenate(([True], pick[1:] != pick[:-1]))]  # np.unique, without its overhead

    def best(self) -> tuple[int, float, float]:
        """(index in this shard, gain, interaction part) of the best of this step's random candidates
        that this shard owns; (−1, −inf, 0) when it owns none of them."""
        o, sh = self.obj, self.shard
        pick = self._draw()
        pick = pick[(pick >= sh.start) & (pick < sh.stop)] - sh.start
        if len(pick) == 0:
            return -1, -math.inf, 0.0
        idx = torch.from_numpy(pick).to(self.selected.device)
        g, inter = marginal_gain(o.scores.index_select(0, idx), o.curv.index_select(0, idx).float(), self.cum,
                                 o.lam, o.scale, self.sq.index_select(0, idx))
        j = int(torch.argmax(g))
        return int(pick[j]), float(g[j]), float(inter[j])


class GainTracker(Protocol):
    """What the greedy loop needs of one objective's gains (``ExactTracker``, ``StochasticTracker``).

    The trackers of a run share one mask of selected rows, which the loop sets."""

    obj: Objective
    refreshes: int
    """Full passes over the pool so far."""

    def best(self) -> tuple[int, float, float]:
        """This shard's best unselected row for the objective this step: (index in the shard, gain,
        interaction part); index −1 (gain −inf) when the shard has no candidate for it."""
        ...

    def add(self, index: int, local: int, row: torch.Tensor) -> None:
        """Account for a selected row (for any objective): its index in the pool, in this shard (−1:
        another shard's) and its ψ row (float32)."""
        ...


def greedy_select(
    objectives: Sequence[Objective],
    k: int,
    kind: GreedyKind = "exact",
    epsilon: float = 0.01,
    shortlist: int = 1024,
    basis_rank: int = 16,
    chunk_rows: int = 65536,
    seed: int = 0,
    progress: bool = True,
    shard: Shard | None = None,
) -> GreedyResult:
    """Choose k rows maximising the objective (one objective, or several served round-robin).

    ``kind="exact"``: exact greedy with shortlist and refresh bounds; ``"stochastic"``: stochastic
    greedy with ⌈(N/k)·ln(1/ε)⌉ candidates per step. Every step is logged at DEBUG level.
    ``shard``: the objectives hold this process's rows of a pool split over processes (every rank
    calls this with its rows; indices in the result are global; each rank tracks ⌈shortlist / ranks⌉
    candidates exactly); None: the whole pool.
    """
    if not objectives:
        raise ValueError("no objective given")
    shard = shard or Shard.whole(objectives[0].scores.shape[0])
    n = shard.n
    if any(o.scores.shape[0] != shard.size for o in objectives):
        raise ValueError(f"all objectives must cover the same candidates ({shard.size} rows of this shard)")
    if n == 0:
        raise ValueError("empty pool: no candidates to select from")
    if not 1 <= k <= n:
        raise ValueError(f"k must be between 1 and the pool size {n}, got {k}")
    if kind == "exact" and shortlist < 1:
        raise ValueError(f"shortlist: must be ≥ 1 (candidates tracked exactly between full passes), got {shortlist}")
    for o in objectives:
        if not bool(torch.isfinite(o.scores).all()):
            raise ValueError(f"objective '{o.name}': scores contain NaN or inf")
    selected = torch.zeros(n, dtype=torch.bool, device=objectives[0].curv.device)
    mine = selected[shard.start : shard.stop]  # a view: this shard's rows of the mask
    # single-threaded from here: per-step work is small, and one thread makes the float round-off,
    # hence the order among equal gains, the same on every run
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trackers: list[GainTracker]
        if kind == "exact":
            per_rank = math.ceil(shortlist / shard.world)  # the pool's best candidates spread over the ranks
            trackers = [ExactTracker(o, mine, per_rank, basis_rank, chunk_rows, seed) for o in objectives]
        elif kind == "stochastic":
            if not 0 < epsilon < 1:
                raise ValueError(f"epsilon must be in (0, 1), got {epsilon}")
            sample = math.ceil(n / k * math.log(1 / epsilon))
            gen = np.random.default_rng(seed)
            trackers = [StochasticTracker(o, selected, shard, sample, gen, chunk_rows) for o in objectives]
        else:
            raise ValueError(f"unknown greedy kind '{kind}'")
        return _greedy_loop(trackers, selected, k, f"greedy ({kind})", progress and shard.rank == 0, shard)
    finally:
        torch.set_num_threads(threads)


def _greedy_loop(trackers: Sequence[GainTracker], selected: torch.Tensor, k: int, label: str,
                 progress: bool, shard: Shard) -> GreedyResult:
    """k steps; step i picks the best row of tracker i mod T (over all shards), which every tracker
    then accounts for."""
    steps: list[GreedyStep] = []
    widths = [tr.obj.curv.shape[1] for tr in trackers]
    for rank in progress_iter(range(k), k, label, "step", disable=not progress):
        tracker = trackers[rank % len(trackers)]
        local, gain, inter = tracker.best()
        rows = [tr.obj.curv[local].float() for tr in trackers] if local >= 0 else None
        index, gain, inter, picked = shard.winner(local, gain, inter, rows, widths)
        selected[index] = True
        here = shard.local(index)
        for tr, row in zip(trackers, picked):
            tr.add(index, here, row)
        step = GreedyStep(rank, index, gain, gain + inter, inter, tracker.obj.name)
        logger.debug("step %d: row %d (%s) gain %.6g = first-order %.6g − interaction %.6g",
                     rank, index, step.task, gain, step.first_order, inter)
        steps.append(step)
    refreshes = sum(tr.refreshes for tr in trackers)
    logger.info("%s: %d steps, %d full refreshes", label, k, refreshes)
    return GreedyResult(steps, refreshes)
