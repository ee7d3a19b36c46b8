"""Individual influences and the target curvature features ψ of ``iaif select`` and ``iaif attribute``.

κ(a, b) = scale·⟨ψ_a, ψ_b⟩ (METHOD.md §1-§2); the kinds (``Curvature``):

* ``ef``: empirical Fisher over the target features: ψ = Φ itself (scale None: 1/number of columns).
* ``gn``: sampled-label Gauss-Newton: ψ = Φ against the sampled-label target rows (``<id>#<r>``,
  ``iaif.selection.features.store.sampled_row_example``), per target group.
* ``identity``: identity in feature space: ψ_a = u_a (``parameter_features``), scale 1, so
  κ = Σ_c η̄_c cos(Γ_a, Γ_b); one ψ shared by every target group.

Φ is dropped before ``gn`` or ``identity`` builds ψ, so at most one [N, ·] matrix of them is held.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from iaif.common.contracts import CheckpointStores
from iaif.selection.features.store import sampled_row_example
from iaif.selection.influence import (
    CheckpointFeatures,
    FeatureGeometry,
    group_columns,
    influence_matrix,
    open_checkpoints,
    parameter_features,
)

Curvature = Literal["ef", "gn", "identity"]


@dataclass(frozen=True)
class FeatureSource:
    """Where Φ and ψ come from: the checkpoints' pool and target features, their stores (the
    sampled-label stores of ``gn`` are opened only when needed) and how rows are read and compared."""

    checkpoints: list[CheckpointFeatures]
    stores: Sequence[CheckpointStores]
    chunk_rows: int = 16384
    device: str = "cpu"
    geometry: FeatureGeometry = FeatureGeometry()


@dataclass
class InfluenceTerms:
    """The pieces of the objective per target group (a task, or the whole target set)."""

    scores: dict[str, torch.Tensor]
    """s_c of every group: the mean influence of candidate c over the group's target examples, [N]."""
    target_columns: dict[str, slice]
    """Each group's columns of Φ (its target examples)."""
    curv: torch.Tensor
    """ψ, [N, q]."""
    curv_columns: dict[str, slice] | None
    """Each group's columns of ψ; None: one ψ shared by all groups."""
    scale: float | None
    """κ(a, b) = scale·⟨ψ_a, ψ_b⟩ on a group's columns; None: 1 / (number of columns)."""


def influence_terms(kind: Curvature, src: FeatureSource, cand_ids: list[str], target_ids: Sequence[str],
                    groups: Sequence[str], rows: range | None = None) -> InfluenceTerms:
    """Scores and curvature features of the candidates ``cand_ids``, target example i belonging to
    group ``groups[i]`` (module docstring); ``rows``: only those candidates' (one process's shard,
    starting on a multiple of ``src.chunk_rows``)."""
    if kind not in ("ef", "gn", "identity"):
        raise ValueError(f"unknown curvature '{kind}'")
    if kind == "gn" and not any(p.sampled_targets for p in src.stores):
        raise ValueError("curvature=gn needs sampled_target_stores")
    perm, cols = group_columns(groups)
    phi = influence_matrix(src.checkpoints, cand_ids, [target_ids[i] for i in perm], src.chunk_rows, src.device,
                           src.geometry, rows)
    scores = {name: phi[:, c].mean(dim=1) for name, c in cols.items()}
    if kind == "ef":
        return InfluenceTerms(scores, cols, phi, cols, None)
    del phi  # before ψ is built: one [N, ·] matrix at a time
    if kind == "identity":
        psi = parameter_features(src.checkpoints, cand_ids, src.chunk_rows, src.device, src.geometry, rows)
        return InfluenceTerms(scores, cols, psi, None, 1.0)
    group_of = {t: g for t, g in zip(target_ids, groups)}
    psi, sampled_cols = _sampled_label_features(src, cand_ids, group_of, rows)
    return InfluenceTerms(scores, cols, psi, sampled_cols, None)


def _sampled_label_features(src: FeatureSource, cand_ids: list[str], group_of: dict[str, str],
                            rows: range | None) -> tuple[torch.Tensor, dict[str, slice]]:
    """Φ against the sampled-label target rows, columns grouped like their examples; a row of a
    true-label store (its id a target id) counts as one draw of its example."""
    ckpts = open_checkpoints(src.stores, sampled=True)
    ids = ckpts[0].target_ids
    labels = []
    for row in ids:
        example = row if row in group_of else sampled_row_example(row)
        if example not in group_of:
            raise ValueError(f"sampled-label store row '{row}' matches no target example")
        labels.append(group_of[example])
    perm, cols = group_columns(labels)
    psi = influence_matrix(ckpts, cand_ids, [ids[i] for i in perm], src.chunk_rows, src.device, src.geometry, rows)
    return psi, cols
