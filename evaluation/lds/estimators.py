"""Each estimator's predicted effect of fine-tuning on a group A, for the linear datamodeling score.

Adding A to the training data changes the target loss by about (METHOD.md §2)

    Δf(A) ≈ −Σ_{a∈A} s_a + ½ Σ_{a,b∈A} κ(a, b) = −J(A) at λ = 1,

so every estimator's prediction is −J(A) for its own λ, through ``iaif.selection.estimators.selection_objective``:

* ``first-order``: λ = 0 (−Σ s_a);
* ``interaction-ef`` / ``interaction-gn``: the plain ½ Σ κ (λ = 1), κ from the empirical-Fisher Φ
  or from the sampled-label (Gauss-Newton) Φ;
* ``interaction-ef-λ`` / ``interaction-gn-λ``: the λ ``iaif select`` uses at a budget of |A|
  (``iaif.selection.objective.default_lambda``: the first-order top-|A| set sits at saturation);
* ``interaction-ef-λval`` / ``interaction-gn-λval``: λ chosen on validation subsets (the table's
  training split, never the held-out one): the λ of the grid {0} ∪ {λ_rule · 2^k, k = −8..8} whose
  prediction has the largest Spearman ρ there (the smallest such λ on ties; 0 is first-order);
* ``less``: −Σ of the LESS scores (``iaif.selection.baselines.less.less_scores``, cosine features);
* ``rds``: −Σ of each member's maximum cosine to the target examples (the ``rds`` baseline's score);
* ``airrep``: −AirRep's pooled group score.

The target f is the mean loss over all target examples (one task), the f the subset table measures.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from iaif.evaluation.lds.score import spearman
from iaif.selection.airrep.train import GroupTable
from iaif.selection.baselines.less import less_scores
from iaif.selection.estimators import ef_scores, selection_objective
from iaif.selection.objective import default_lambda

GroupScore = Callable[[torch.Tensor], torch.Tensor]
"""Pool row indices of groups of one size [G, S] -> a score per group [G] (higher: lowers the loss more)."""


@dataclass
class PoolTerms:
    """Per-pool-example pieces the estimators need (rows in pool order)."""

    phi: torch.Tensor
    """Φ with the selector's feature geometry, [N, m]: s_a = its row mean; EF κ from its rows."""
    phi_cosine: torch.Tensor
    """Φ of cosine features (the LESS recipe), [N, m]."""
    subtasks: dict[str, list[int]]
    """Target task -> its columns of Φ (LESS: mean within, max over them)."""
    sampled: torch.Tensor | None = None
    """Sampled-label Φ for the Gauss-Newton κ, [N, m·R]; None: no GN estimators."""
    similarity: torch.Tensor | None = None
    """Each pool example's maximum cosine to the targets in the base model's representation, [N]."""
    airrep: GroupScore | None = None
    """AirRep's pooled group score."""
    sampled_subtasks: dict[str, list[int]] = field(default_factory=dict)
    """Target task -> its columns of the sampled-label Φ."""

    def for_task(self, task: str, similarity: torch.Tensor | None) -> PoolTerms:
        """The pieces for f = the mean loss of one target task: Φ restricted to its columns (so s_a and κ are
        that task's), ``similarity`` to its targets; AirRep, trained on the whole target, is left out."""
        cols = self.subtasks[task]
        sampled = None
        if self.sampled is not None and task in self.sampled_subtasks:
            sampled = self.sampled[:, self.sampled_subtasks[task]]
        return PoolTerms(self.phi[:, cols], self.phi_cosine[:, cols], {task: list(range(len(cols)))}, sampled,
                         similarity)


def _objective(curv: torch.Tensor, scores: torch.Tensor, lam: float) -> GroupScore:
    return lambda members: torch.tensor([selection_objective(curv[g], lam, scores[g]) for g in members])


def _summed(per_example: torch.Tensor) -> GroupScore:
    return lambda members: per_example[members].sum(dim=1)


LAMBDA_GRID_OCTAVES = 8
"""The validated λ is searched over λ_rule · 2^k for |k| ≤ this (and 0)."""


def validated_lambda(curv: torch.Tensor, scores: torch.Tensor, rule: float, validation: GroupTable) -> float:
    """The λ of {0} ∪ {rule · 2^k} whose predicted effects −J(A) rank the validation groups' measured
    effects best (largest Spearman ρ; the smallest λ among ties)."""
    measured = validation.effects.double().numpy()
    best_lam, best_rho = 0.0, -np.inf
    for lam in [0.0, *(rule * 2.0**k for k in range(-LAMBDA_GRID_OCTAVES, LAMBDA_GRID_OCTAVES + 1))]:
        with torch.no_grad():
            rho = spearman(-_objective(curv, scores, lam)(validation.members).double().numpy(), measured)
        if rho > best_rho:
            best_lam, best_rho = lam, rho
    return best_lam


def _interaction(out: dict[str, GroupScore], lams: dict[str, float], kind: str, curv: torch.Tensor, s: torch.Tensor,
                 size: int, validation: GroupTable | None) -> None:
    lams[kind] = default_lambda(s, curv, size, None)
    out[f"interaction-{kind}"] = _objective(curv, s, 1.0)
    out[f"interaction-{kind}-λ"] = _objective(curv, s, lams[kind])
    if validation is not None:
        lams[f"{kind}-val"] = validated_lambda(curv, s, lams[kind], validation)
        out[f"interaction-{kind}-λval"] = _objective(curv, s, lams[f"{kind}-val"])


def group_scores(terms: PoolTerms, size: int, validation: GroupTable | None = None
                 ) -> tuple[dict[str, GroupScore], dict[str, float]]:
    """The estimators for groups of ``size`` (name -> group score J(A)) and their λ (the selector's rule;
    with ``validation`` groups of that size, also the λ validated on them)."""
    s = ef_scores(terms.phi)
    out: dict[str, GroupScore] = {"first-order": _objective(terms.phi, s, 0.0)}
    lams: dict[str, float] = {}
    _interaction(out, lams, "ef", terms.phi, s, size, validation)
    if terms.sampled is not None:
        _interaction(out, lams, "gn", terms.sampled, s, size, validation)
    out["less"] = _summed(less_scores(terms.phi_cosine, terms.subtasks))
    if terms.similarity is not None:
        out["rds"] = _summed(terms.similarity)
    if terms.airrep is not None:
        out["airrep"] = terms.airrep
    return out, lams


def predicted_effects(terms: PoolTerms, members: torch.Tensor, validation: GroupTable | None = None
                      ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Predicted Δ target loss (−J(A)) of every estimator for every group in ``members`` [G, S]
    (``validation``: groups of the same size with measured effects, for the validated λ)."""
    scorers, lams = group_scores(terms, members.shape[1], validation)
    with torch.no_grad():
        return {name: -score(members).double().numpy() for name, score in scorers.items()}, lams
