"""Interaction-aware objectives (``Objective``, what ``iaif.selection.greedy`` maximises): one per task,
the default λ and the sum / round-robin combination.

Default λ (a derivation, METHOD.md §2 leaves λ open). Let T_k be the first-order top-k set of a task,
S_k = Σ_{a∈T_k} s_a its first-order value and Q_k = Σ_{a,b∈T_k} κ(a, b) its interaction mass. Along the
ray "t copies of T_k's total effect", J(t·T_k) = t·S_k − (λ/2)·t²·Q_k is maximal at t = S_k / (λ·Q_k).
The default puts that maximum at t = 1:

    λ = S_k / Q_k        (times ``lam_factor``)

i.e. the first-order top-k set sits exactly at saturation: scaling its effect up would no longer pay.
In the empirical-Fisher form, with C_t the top-k set's cumulative influence on target t,
S_k = mean_t C_t and Q_k = mean_t C_t², so the saturation level of every target is
1/λ = mean_t C_t² / mean_t C_t, the typical top-k cumulative influence (exactly C when all C_t = C).
On T_k itself the interaction term then costs half of the first-order value (J(T_k) = S_k / 2), and
greedy trades redundant picks on saturated targets for coverage of the others. The rule needs
S_k > 0 and Q_k > 0; otherwise λ must be given.

Multi-task: one objective per task (its own s^τ, ψ^τ, κ scale and λ_τ). ``sum`` maximises Σ_τ J_τ,
which is a single objective over the features concatenated with weights √(λ_τ·scale_τ) (done in place
on column blocks, no copy); ``round-robin`` serves the tasks in turn (``iaif.selection.greedy``).
For the λ rule, k_τ = ⌈k / T⌉ under round-robin; under ``sum`` it is a setting (``LamBudget``):
``k`` (every pick counts for every task, so each task saturates only at k picks of its own) or
``per-task`` (⌈k / T⌉: each task saturates at its share of the budget).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from iaif.selection.estimators import quadratic_part
from iaif.selection.shard import Shard

Combine = Literal["sum", "round-robin"]
LamBudget = Literal["k", "per-task"]


@dataclass(frozen=True)
class Objective:
    """One selection objective: J(A) = Σ_{a∈A} s_a − (λ/2) Σ_{a,b∈A} scale·⟨ψ_a, ψ_b⟩."""

    scores: torch.Tensor
    """s_c for every candidate, [N]."""
    curv: torch.Tensor
    """Curvature features ψ, [N, q] (a strided view is fine)."""
    lam: float
    """Trade-off weight λ ≥ 0 (0: first-order top-k)."""
    scale: float | None = None
    """κ(a, b) = scale·⟨ψ_a, ψ_b⟩; None: 1/q (empirical Fisher)."""
    name: str = "all"
    """Task name, for logs."""

    def __post_init__(self) -> None:
        if self.scores.ndim != 1 or self.curv.ndim != 2 or self.curv.shape[0] != self.scores.shape[0]:
            raise ValueError(f"objective '{self.name}': scores [N] and curv [N, q] needed, got "
                             f"{tuple(self.scores.shape)} and {tuple(self.curv.shape)}")
        if self.lam < 0 or not math.isfinite(self.lam):
            raise ValueError(f"objective '{self.name}': λ must be finite and ≥ 0, got {self.lam}")

    @property
    def coef(self) -> float:
        """λ·scale, the factor of ⟨ψ_c, C(A)⟩ in the gain."""
        return self.lam * (1.0 / self.curv.shape[1] if self.scale is None else self.scale)

    def value(self, indices: Sequence[int] | torch.Tensor, shard: Shard | None = None, chunk_rows: int = 65536) -> float:
        """J(A) of a set of row indices (global ones when the rows are a ``shard`` of the pool; every
        rank calls it), summing the rows in chunks of ``chunk_rows``."""
        shard = shard or Shard.whole(self.scores.shape[0])
        idx = torch.as_tensor(indices, dtype=torch.long, device=self.curv.device)
        return float(shard.gather_rows(self.scores, idx).sum()) - self.lam * quadratic_part(
            _row_sum(self.curv, idx, shard, chunk_rows), self.scale)


def _row_sum(curv: torch.Tensor, idx: torch.Tensor, shard: Shard, chunk_rows: int) -> torch.Tensor:
    """Σ of rows ``idx`` of a (row-sharded) ψ, float32, chunk by chunk in the order of ``idx``."""
    cum = torch.zeros(curv.shape[1], dtype=torch.float32, device=curv.device)
    for i in range(0, len(idx), chunk_rows):
        cum += shard.gather_rows(curv, idx[i : i + chunk_rows]).sum(dim=0)
    return cum


@dataclass(frozen=True)
class TaskTerms:
    """One target task's pieces of the objective."""

    name: str
    scores: torch.Tensor
    """s^τ_c = mean influence of candidate c over the task's target examples, [N]."""
    columns: slice | None
    """The task's curvature features are ``curv[:, columns]``; None: all columns (shared ψ)."""
    scale: float | None
    """κ^τ(a, b) = scale·⟨ψ_a, ψ_b⟩; None: 1 / (number of columns), the empirical Fisher."""


def default_lambda(scores: torch.Tensor, curv: torch.Tensor, k: int, scale: float | None,
                   chunk_rows: int = 8192, shard: Shard | None = None) -> float:
    """λ = S_k / Q_k of the first-order top-k set (module docstring); with ``shard``, scores and curv
    are this process's rows of the pool (every rank calls it and gets the same λ)."""
    shard = shard or Shard.whole(scores.shape[0])
    every = shard.full(scores)
    top = torch.topk(every, min(k, every.shape[0])).indices
    s_k = float(every[top].sum())
    q_k = 2.0 * quadratic_part(_row_sum(curv, top, shard, chunk_rows), scale)
    if not (s_k > 0 and q_k > 0):
        raise ValueError(
            f"default λ undefined: the first-order top-{k} set has first-order value {s_k:.4g} and "
            f"interaction mass {q_k:.4g} (both must be > 0); set lam explicitly")
    return s_k / q_k


def build_objectives(
    tasks: Sequence[TaskTerms],
    curv: torch.Tensor,
    k: int,
    combine: Combine = "sum",
    lam: float | None = None,
    lam_factor: float = 1.0,
    lam_budget: LamBudget = "k",
    shard: Shard | None = None,
) -> tuple[list[Objective], dict[str, float]]:
    """Objectives for ``greedy_select`` and the λ used per task.

    ``lam=None`` applies the default rule per task (times ``lam_factor``). Under ``sum`` with
    several tasks, ``curv`` is rescaled in place (it belongs to the caller's selection run).
    ``shard``: scores and ``curv`` are this process's rows of a pool split over processes.
    """
    if not tasks:
        raise ValueError("no target task")
    if lam_budget not in ("k", "per-task"):
        raise ValueError(f"unknown lam_budget '{lam_budget}' (k or per-task)")
    k_task = k if combine == "sum" and lam_budget == "k" else math.ceil(k / len(tasks))
    lams: dict[str, float] = {}
    parts: list[Objective] = []
    for t in tasks:
        view = curv if t.columns is None else curv[:, t.columns]
        if view.shape[1] == 0:
            raise ValueError(f"task '{t.name}' has no target features")
        lam_t = lam if lam is not None else lam_factor * default_lambda(t.scores, view, k_task, t.scale, shard=shard)
        lams[t.name] = lam_t
        parts.append(Objective(t.scores, view, lam_t, t.scale, t.name))
    if combine == "round-robin" or len(parts) == 1:
        return parts, lams
    if combine != "sum":
        raise ValueError(f"unknown combine '{combine}' (sum or round-robin)")
    total = torch.stack([p.scores for p in parts]).sum(dim=0)
    coefs = [p.coef for p in parts]
    if all(c == 0 for c in coefs):
        return [Objective(total, curv, 0.0, None, "sum")], lams
    if all(t.columns is None for t in tasks):
        curv.mul_(math.sqrt(sum(coefs)))
    else:
        if any(t.columns is None for t in tasks):
            raise ValueError("sum of tasks needs either one shared ψ or disjoint column blocks per task")
        for t, c in zip(tasks, coefs):
            curv[:, t.columns] *= math.sqrt(c)
    return [Objective(total, curv, 1.0, 1.0, "sum")], lams
