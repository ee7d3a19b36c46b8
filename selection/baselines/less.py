"""The LESS baseline (Xia et al. 2024; METHOD.md §3) on the influence matrix Φ.

Φ already holds Σ_c η̄_c cos(Γ_a^c, g_t^c). The score of a pool example is its mean over the target
examples of each subtask, then the maximum over subtasks; the top k are selected.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


def less_scores(phi: torch.Tensor, subtasks: Mapping[str, slice | list[int]]) -> torch.Tensor:
    """max over subtasks of the mean of Φ over the subtask's target columns, [N]."""
    if not subtasks:
        raise ValueError("no target subtask")
    means = [phi[:, cols].mean(dim=1) for cols in subtasks.values()]
    return torch.stack(means, dim=1).max(dim=1).values


def less_select(phi: torch.Tensor, subtasks: Mapping[str, slice | list[int]], k: int) -> tuple[list[int], torch.Tensor]:
    """Top-k rows by LESS score, best first, with their scores."""
    if not 1 <= k <= phi.shape[0]:
        raise ValueError(f"k must be between 1 and the pool size {phi.shape[0]}, got {k}")
    top = torch.topk(less_scores(phi, subtasks), k)
    return top.indices.tolist(), top.values
