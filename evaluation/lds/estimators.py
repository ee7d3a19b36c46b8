"""Each estimator's predicted effect of fine-tuning on a group A, for the linear datamodeling score.

Adding A to the training data changes the target loss by about (METHOD.md §2)

    Δf(A) ≈ −Σ_{a∈A} s_a + ½ Σ_{a,b∈A} κ(a, b) = −J(A) at λ = 1,

so every estimator's prediction is −J(A) for its own λ, through ``iaif.selection.estimators.selection_objective``:

* ``first-order``: λ = 0 (−Σ s_a);
* ``interaction-ef`` / ``interaction-gn``: the plain ½ Σ κ (λ = 1), κ from the empirical-Fisher Φ
  or from the sampled-label (Gauss-Newton) Φ;
* ``interaction-ef-λ`` / ``interaction-gn-λ``: the λ ``iaif select`` uses at a budget of |A|
  (``iaif.selection.objective.default_lambda``: the first-order top-|A| set sits at saturation);
* ``less``: −Σ of the LESS scores (``iaif.selection.baselines.less.less_scores``, cosine features);
* ``rds``: −Σ of each member's maximum cosine to the target examples (the ``rds`` baseline's score);
* ``airrep``: −AirRep's pooled group score.

The target f is the mean loss over all target examples (one task), the f the subset table measures.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

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


def _objective(curv: torch.Tensor, scores: torch.Tensor, lam: float) -> GroupScore:
    return lambda members: torch.tensor([selection_objective(curv[g], lam, scores[g]) for g in members])


def _summed(per_example: torch.Tensor) -> GroupScore:
    return lambda members: per_example[members].sum(dim=1)


def group_scores(terms: PoolTerms, size: int) -> tuple[dict[str, GroupScore], dict[str, float]]:
    """The estimators for groups of ``size`` (name -> group score J(A)) and the λ of the selector's rule."""
    s = ef_scores(terms.phi)
    lams = {"ef": default_lambda(s, terms.phi, size, None)}
    out: dict[str, GroupScore] = {
        "first-order": _objective(terms.phi, s, 0.0),
        "interaction-ef": _objective(terms.phi, s, 1.0),
        "interaction-ef-λ": _objective(terms.phi, s, lams["ef"]),
    }
    if terms.sampled is not None:
        lams["gn"] = default_lambda(s, terms.sampled, size, None)
        out["interaction-gn"] = _objective(terms.sampled, s, 1.0)
        out["interaction-gn-λ"] = _objective(terms.sampled, s, lams["gn"])
    out["less"] = _summed(less_scores(terms.phi_cosine, terms.subtasks))
    if terms.similarity is not None:
        out["rds"] = _summed(terms.similarity)
    if terms.airrep is not None:
        out["airrep"] = terms.airrep
    return out, lams


def predicted_effects(terms: PoolTerms, members: torch.Tensor) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Predicted Δ target loss (−J(A)) of every estimator for every group in ``members`` [G, S]."""
    scorers, lams = group_scores(terms, members.shape[1])
    with torch.no_grad():
        return {name: -score(members).double().numpy() for name, score in scorers.items()}, lams
