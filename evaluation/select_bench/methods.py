"""The benchmark's selection methods, all through ``iaif.selection`` (no second copy of the maths).

* ``interaction-exact``: greedy on J(A) = Σ s_a − (λ/2) Σ κ(a, b) with the exact target curvature,
  κ = ψ_a·ψ_b (``TaskTerms`` scale 1), λ from the default rule of ``iaif.selection.objective``;
* ``interaction-ef``: the same greedy with the empirical-Fisher κ = ⟨φ_a, φ_b⟩/m over the validation
  examples and the default λ rule: exactly what ``iaif select --method interaction`` does on Φ;
* ``first-order``: the same selector with λ = 0 (top-k by s_a);
* ``random``: ``iaif.selection.baselines.random_subset``;
* ``similarity``: the RDS analogue, cosine of the base model's representation (the input for
  logistic regression, the hidden layer for the MLP) to the validation examples, max over them
  (``iaif.selection.baselines.similarity``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from iaif.evaluation.select_bench.features import TargetFeatures
from iaif.selection.baselines.random_subset import random_select
from iaif.selection.baselines.similarity import similarity_select
from iaif.selection.greedy import greedy_select
from iaif.selection.objective import TaskTerms, build_objectives

METHODS = ("interaction-exact", "interaction-ef", "first-order", "random", "similarity")


@dataclass(frozen=True)
class Picks:
    indices: list[int]
    """rows of the pool, in the order chosen"""
    lam: float | None
    """λ used (greedy methods)"""


def greedy_picks(scores: torch.Tensor, curv: torch.Tensor, scale: float | None, k: int, lam: float | None,
                 lam_factor: float, seed: int) -> Picks:
    """Interaction-aware greedy (λ None: the default rule × lam_factor; 0: first-order top-k)."""
    objectives, lams = build_objectives([TaskTerms("target", scores, None, scale)], curv, k, "sum", lam, lam_factor)
    result = greedy_select(objectives, k, "exact", seed=seed, progress=False)
    return Picks(result.indices, lams["target"])


def select(method: str, k: int, feats: TargetFeatures, pool_repr: torch.Tensor, target_repr: torch.Tensor,
           seed: int, lam: float | None = None, lam_factor: float = 1.0) -> Picks:
    """k pool rows chosen by ``method`` (module docstring); ``*_repr`` are L2-normalised representations."""
    n = feats.scores.shape[0]
    if method == "interaction-exact":
        return greedy_picks(feats.scores, feats.psi, 1.0, k, lam, lam_factor, seed)
    if method == "interaction-ef":
        return greedy_picks(feats.scores, feats.phi, None, k, lam, lam_factor, seed)
    if method == "first-order":
        return greedy_picks(feats.scores, feats.phi, None, k, 0.0, 1.0, seed)
    if method == "random":
        return Picks(random_select(n, k, seed), None)
    if method == "similarity":
        return Picks(similarity_select(pool_repr, target_repr, k, "max")[0], None)
    raise ValueError(f"unknown method '{method}'; known: {', '.join(METHODS)}")
