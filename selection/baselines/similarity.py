"""Selection by embedding similarity to the target examples (RDS+ and the sentence embedder).

Cosine of L2-normalised embeddings; a pool example's score is its maximum over target examples
(``max``), or target examples take turns picking their most similar unselected example
(``round-robin``, as in Ivison et al. 2025).
"""

from __future__ import annotations

from typing import Literal

import torch

Aggregate = Literal["max", "round-robin"]


def similarity_select(pool: torch.Tensor, targets: torch.Tensor, k: int, aggregate: Aggregate = "max",
                      chunk_rows: int = 16384) -> tuple[list[int], list[float]]:
    """k pool rows by cosine similarity to the target rows (both already L2-normalised), best first."""
    n = pool.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be between 1 and the pool size {n}, got {k}")
    if targets.shape[0] == 0:
        raise ValueError("no target embeddings")
    sim = torch.cat([pool[i : i + chunk_rows] @ targets.T for i in range(0, n, chunk_rows)])
    if aggregate == "max":
        top = torch.topk(sim.max(dim=1).values, k)
        return top.indices.tolist(), top.values.tolist()
    if aggregate != "round-robin":
        raise ValueError(f"unknown aggregate '{aggregate}' (max or round-robin)")
    # each target's ranking; a target never looks deeper than the number already selected plus one
    order = torch.topk(sim, min(n, k), dim=0).indices.T.tolist()
    pointer = [0] * targets.shape[0]
    taken: set[int] = set()
    chosen: list[int] = []
    scores: list[float] = []
    t = 0
    while len(chosen) < k:
        ranking = order[t]
        while ranking[pointer[t]] in taken:
            pointer[t] += 1
        row = ranking[pointer[t]]
        taken.add(row)
        chosen.append(row)
        scores.append(float(sim[row, t]))
        t = (t + 1) % len(order)
    return chosen, scores
