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

Blocks (exact greedy over processes, where a collective costs more than a step's own work): one step,
one collective is the simple form; a block gets several steps from two. Each rank sends its certified
best for the next step and the best-looking rows of its shortlist (up to ``block`` rows, with scores,
‖ψ‖² and ψ). Every rank then runs greedy over those candidates alone, computing each gain exactly as
the owner would (row by row, from the same C), which proposes the same sequence on every rank; its
first step is the true one. Each rank then applies the proposals one by one, and before each asks its
own tracker for its exact best; the first proposal that best beats (larger gain, or equal gain and
lower index) is where this rank's agreement ends. The second collective gathers each rank's end and
its best there: the block keeps the proposals before the earliest end, that step goes to the best of
the ranks that ended there, and ranks that had gone further take their later steps back (``rewind``:
C restored, the rows candidates again through the shortlist). Every kept step is the straightforward
loop's step, gain and tie rule included. Refreshes happen together: the first collective also carries
each rank's bounding work since its last refresh, and once any rank's has reached ``REFRESH_TOGETHER``
of a refresh's cost, every rank refreshes that objective (a rank refreshing alone stalls the others at
the next collective, once for each rank's refresh: on 2 processes that waiting was a third of the
wall time).

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

from iaif.common.progress import progress, progress_iter
from iaif.selection.estimators import marginal_gain
from iaif.selection.objective import Objective
from iaif.selection.shard import Shard

logger = logging.getLogger(__name__)

GreedyKind = Literal["exact", "stochastic"]

# blocks over processes: every rank refreshes an objective once any rank's bounding work for it has
# reached this share of a refresh's cost (before ``best`` would refresh that rank alone, at 1)
REFRESH_TOGETHER = 0.75


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
    blocks: int = 0
    """Blocks of exact greedy steps (``block`` > 1; each one exchange of candidates and one of the
    verdicts between the processes); 0 when stepping one at a time."""

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
        self.refresh()

    def refresh(self) -> None:
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

    @property
    def refresh_due(self) -> float:
        """Bounding work since the last refresh as a share of a refresh's cost (``best`` refreshes at 1)."""
        return self.bounded / max(self.refresh_cost, 1)

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

    def rewind(self, cum: torch.Tensor, rows: Sequence[int]) -> None:
        """Undo ``add`` for this shard's ``rows`` (their mask bits already cleared): C goes back to
        ``cum``, and each row joins the shortlist unless it is there (a refresh since it was added
        left it out of the bounded candidates)."""
        self.cum = cum.clone()
        self.free += len(rows)
        back = torch.tensor(rows, dtype=torch.long, device=self.cum.device)
        back = back[~torch.isin(back, self.short_idx.to(back.device))]
        if back.numel():
            self._set_shortlist(back, extend=True)

    def top(self, count: int) -> torch.Tensor:
        """Up to ``count`` unselected shortlisted rows of the largest exact gain at the current C, best
        first (a guess at the next steps' picks; ``best`` certifies a pick)."""
        o = self.obj
        g, _ = marginal_gain(self.short_scores, self.short_psi, self.cum, o.lam, o.scale, self.short_sq)
        g = g.masked_fill(self.selected.index_select(0, self.short_idx), -math.inf)
        g, pos = torch.topk(g, min(count, len(g)))
        return self.short_idx[pos[torch.isfinite(g)]]

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
                self.refresh()
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
                self.refresh()
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
                    self.refresh()
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
    block: int | None = None,
) -> GreedyResult:
    """Choose k rows maximising the objective (one objective, or several served round-robin).

    ``kind="exact"``: exact greedy with shortlist and refresh bounds; ``"stochastic"``: stochastic
    greedy with ⌈(N/k)·ln(1/ε)⌉ candidates per step. Every step is logged at DEBUG level.
    ``shard``: the objectives hold this process's rows of a pool split over processes (every rank
    calls this with its rows; indices in the result are global; each rank tracks ⌈shortlist / ranks⌉
    candidates exactly); None: the whole pool. ``block`` (exact greedy): steps proposed per exchange of
    candidates between the ranks (same result, fewer collectives); None: 32 when sharded over
    processes, else 1 (one step at a time, nothing exchanged).
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
    block = (32 if shard.world > 1 else 1) if block is None else block
    if block < 1:
        raise ValueError(f"block: must be ≥ 1 (greedy steps proposed per exchange between processes), got {block}")
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
        trackers: Sequence[GainTracker]
        if kind == "exact":
            per_rank = math.ceil(shortlist / shard.world)  # the pool's best candidates spread over the ranks
            exact = [ExactTracker(o, mine, per_rank, basis_rank, chunk_rows, seed) for o in objectives]
            if block > 1:
                return _block_loop(exact, selected, k, block, "greedy (exact)", progress and shard.rank == 0, shard)
            trackers = exact
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
        index, gain, inter, picked, _ = shard.winner(local, gain, inter, rows, widths)
        _apply(trackers, selected, shard, index, picked)
        steps.append(_step(trackers, rank, index, gain, inter))
    refreshes = sum(tr.refreshes for tr in trackers)
    logger.info("%s: %d steps, %d full refreshes", label, k, refreshes)
    return GreedyResult(steps, refreshes)


@dataclass(frozen=True)
class _Exchanged:
    """The candidates the ranks sent for a block: global index ([M]), whether the record is padding,
    and, per objective, score, ‖ψ‖² and ψ row, as the owning rank holds them."""

    index: torch.Tensor
    padding: torch.Tensor
    scores: list[torch.Tensor]
    sq: list[torch.Tensor]
    psi: list[torch.Tensor]


@dataclass(frozen=True)
class _Proposed:
    """A step of a block's simulation: the row's position in the exchanged candidates, its global
    index, gain and interaction part."""

    pos: int
    index: int
    gain: float
    inter: float


def _block_loop(trackers: Sequence[ExactTracker], selected: torch.Tensor, k: int, block: int, label: str,
                show: bool, shard: Shard) -> GreedyResult:
    """Exact greedy in blocks, for ranks that pay per collective (module docstring, "blocks"): the
    picks, gains and ties of ``_greedy_loop``, in two all_gathers per block instead of one per step."""
    steps: list[GreedyStep] = []
    widths = [tr.obj.curv.shape[1] for tr in trackers]
    bar = progress(k, label, "step", disable=not show)
    blocks = 0
    try:
        while len(steps) < k:
            t0 = len(steps)
            sent = _block_candidates(trackers, t0, block)
            table = shard.gather(_pack(trackers, sent, shard, block))
            ex = _unpack(trackers, table[:, : -len(trackers)], shard.n)
            _refresh_together(trackers, table[:, -len(trackers) :])
            seq = _simulate(trackers, ex, t0, min(block, k - t0))
            stage, mine, before, applied = _verify(trackers, selected, shard, ex, seq, t0, k)
            local, gain, inter = mine
            rows = [tr.obj.curv[local].float() for tr in trackers] if local >= 0 else None
            index, gain, inter, picked, agreed = shard.winner(local, gain, inter, rows, widths, stage,
                                                              required=t0 + len(seq) < k)
            if len(applied) > agreed:  # this rank went further than every rank agrees: back to step agreed
                undone = applied[agreed:]
                for i, _ in undone:
                    selected[i] = False
                for tr, cum in zip(trackers, before[agreed]):
                    tr.rewind(cum, [here for _, here in undone if here >= 0])
            for j, prop in enumerate(seq[:agreed]):
                steps.append(_step(trackers, t0 + j, prop.index, prop.gain, prop.inter))
            if index >= 0:
                _apply(trackers, selected, shard, index, picked)
                steps.append(_step(trackers, len(steps), index, gain, inter))
            bar.update(len(steps) - t0)
            blocks += 1
    finally:
        bar.close()
    refreshes = sum(tr.refreshes for tr in trackers)
    logger.info("%s: %d steps in %d blocks, %d full refreshes", label, k, blocks, refreshes)
    return GreedyResult(steps, refreshes, blocks)


def _step(trackers: Sequence[GainTracker], rank: int, index: int, gain: float, inter: float) -> GreedyStep:
    task = trackers[rank % len(trackers)].obj.name
    logger.debug("step %d: row %d (%s) gain %.6g = first-order %.6g − interaction %.6g",
                 rank, index, task, gain, gain + inter, inter)
    return GreedyStep(rank, index, gain, gain + inter, inter, task)


def _apply(trackers: Sequence[GainTracker], selected: torch.Tensor, shard: Shard, index: int,
           rows: Sequence[torch.Tensor]) -> None:
    """Row ``index`` (global) selected, with its ψ row of every objective."""
    selected[index] = True
    here = shard.local(index)
    for tr, row in zip(trackers, rows):
        tr.add(index, here, row)


def _block_candidates(trackers: Sequence[ExactTracker], t0: int, block: int) -> list[int]:
    """This rank's candidates for a block starting at step t0 (local rows, at most ``block``): its
    certified best for step t0 first, then the best-looking shortlisted rows of every objective."""
    local, _, _ = trackers[t0 % len(trackers)].best()
    if local < 0:
        return []
    per = max(1, (block - 1) // len(trackers))
    rows = [local] + [int(r) for tr in trackers for r in tr.top(per + 1)]
    return list(dict.fromkeys(rows))[:block]


def _refresh_together(trackers: Sequence[ExactTracker], due: torch.Tensor) -> None:
    """Refresh objective t on every rank at once when any rank's ``refresh_due`` for it ([world, T])
    has reached ``REFRESH_TOGETHER``: a rank that refreshed alone would stall the others at the next
    collective, once for each rank's refresh."""
    for tr, most in zip(trackers, due.max(dim=0).values.tolist()):
        if most >= REFRESH_TOGETHER:
            tr.refresh()


def _pack(trackers: Sequence[ExactTracker], rows: list[int], shard: Shard, block: int) -> torch.Tensor:
    """``block`` records (float64): global index, then per objective score, ‖ψ‖² and ψ; padding has
    index n. Then each objective's ``refresh_due``."""
    width = 1 + sum(2 + tr.obj.curv.shape[1] for tr in trackers)
    out = torch.zeros(block, width, dtype=torch.float64)
    out[:, 0] = shard.n
    if rows:
        idx = torch.tensor(rows, dtype=torch.long, device=trackers[0].cum.device)
        out[: len(rows), 0] = (idx + shard.start).double().cpu()
        col = 1
        for tr in trackers:
            q = tr.obj.curv.shape[1]
            out[: len(rows), col] = tr.obj.scores.index_select(0, idx).double().cpu()
            out[: len(rows), col + 1] = tr.sq.index_select(0, idx).double().cpu()
            out[: len(rows), col + 2 : col + 2 + q] = tr.obj.curv.index_select(0, idx).double().cpu()
            col += 2 + q
    due = torch.tensor([tr.refresh_due for tr in trackers], dtype=torch.float64)
    return torch.cat([out.reshape(-1), due])


def _unpack(trackers: Sequence[ExactTracker], table: torch.Tensor, n: int) -> _Exchanged:
    """Every rank's records (``Shard.gather`` of ``_pack`` without the refresh dues), in the trackers' dtypes
    and device."""
    width = 1 + sum(2 + tr.obj.curv.shape[1] for tr in trackers)
    rec = table.reshape(-1, width)
    dev = trackers[0].cum.device
    scores, sq, psi = [], [], []
    col = 1
    for tr in trackers:
        q = tr.obj.curv.shape[1]
        scores.append(rec[:, col].to(dev, tr.obj.scores.dtype))
        sq.append(rec[:, col + 1].to(dev, torch.float32))
        psi.append(rec[:, col + 2 : col + 2 + q].to(dev, torch.float32))
        col += 2 + q
    index = rec[:, 0].long().to(dev)
    return _Exchanged(index, index >= n, scores, sq, psi)


def _simulate(trackers: Sequence[ExactTracker], ex: _Exchanged, t0: int, steps: int) -> list[_Proposed]:
    """Greedy over the exchanged candidates alone, from step t0 for up to ``steps`` steps: each gain
    computed as the owning rank computes it (row by row, from the same C), so where every rank's own
    best is no better, a proposed step is the true one. The first is (each rank sent its certified
    best first)."""
    cums = [tr.cum.clone() for tr in trackers]
    taken = ex.padding.clone()
    out: list[_Proposed] = []
    for j in range(steps):
        t = (t0 + j) % len(trackers)
        o = trackers[t].obj
        g, inter = marginal_gain(ex.scores[t], ex.psi[t], cums[t], o.lam, o.scale, ex.sq[t])
        g = g.masked_fill(taken, -math.inf)
        p = _first_best(ex.index, g)
        if not math.isfinite(float(g[p])):
            break
        out.append(_Proposed(p, int(ex.index[p]), float(g[p]), float(inter[p])))
        taken |= ex.index == ex.index[p]
        for cum, psi in zip(cums, ex.psi):
            cum += psi[p]
    return out


def _verify(trackers: Sequence[ExactTracker], selected: torch.Tensor, shard: Shard, ex: _Exchanged,
            seq: list[_Proposed], t0: int, k: int
            ) -> tuple[int, tuple[int, float, float], list[list[torch.Tensor]], list[tuple[int, int]]]:
    """Apply the proposed steps while this rank's own best (``best``, exact) is no better than the
    proposal. Returns the first step where it is better (``len(seq)`` when none is) with this rank's
    best for that step ((−1, −inf, 0) when none or when the budget ends there), every tracker's C before
    each applied step and the applied (global index, local row) pairs, for a rewind."""
    before: list[list[torch.Tensor]] = []
    applied: list[tuple[int, int]] = []
    for j, prop in enumerate(seq):
        if j > 0:
            local, gain, inter = trackers[(t0 + j) % len(trackers)].best()
            if local >= 0 and (gain > prop.gain or (gain == prop.gain and shard.start + local < prop.index)):
                return j, (local, gain, inter), before, applied
        before.append([tr.cum.clone() for tr in trackers])
        _apply(trackers, selected, shard, prop.index, [psi[prop.pos] for psi in ex.psi])
        applied.append((prop.index, shard.local(prop.index)))
    t = t0 + len(seq)
    mine = trackers[t % len(trackers)].best() if t < k else (-1, -math.inf, 0.0)
    return len(seq), mine, before, applied

