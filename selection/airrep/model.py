"""The AirRep model: a trainable projection head over frozen base-model representations, target-aware
attention pooling over a group's members, and a weighted pairwise ranking loss (own implementation
after the description of Sun et al. 2025; the paper fine-tunes a whole text encoder, here the encoder
is the base model's RDS+ hidden-state embedding, frozen, and only the head and the pooling train).

Group score of a set S for the targets t = 1..m (higher: training on S lowers the target loss more):

    h_i = W₂ σ(W₁ x_i),  q_t = the same head on target t,  l_{i,t} = ⟨h_i, q_t⟩
    a_{i,t} = softmax over i ∈ S of (l_{i,t} / τ + b(h_i))           (τ and b learned)
    score(S) = mean_t |S| Σ_{i∈S} a_{i,t} l_{i,t}

Uniform attention (τ → ∞, b = 0) gives Σ_{i∈S} mean_t l_{i,t}, the representation-similarity sum; the
attention lets a group's score depend on which members dominate each target, not only on their sum.
The score is invariant to the order of the members (softmax and sums over i).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class AirRepShape:
    """Sizes of the model."""

    input_dim: int
    """Width of the frozen representations x (the base model's hidden size)."""
    dim: int = 64
    """Width of the learned representations h."""


class AirRep(nn.Module):
    """Projection head + attention pooling (module docstring)."""

    def __init__(self, shape: AirRepShape):
        super().__init__()
        self.shape = shape
        self.head = nn.Sequential(nn.Linear(shape.input_dim, shape.dim), nn.GELU(), nn.Linear(shape.dim, shape.dim))
        self.member_bias = nn.Linear(shape.dim, 1)
        self.log_temperature = nn.Parameter(torch.zeros(()))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """h = head(x), [..., input_dim] -> [..., dim]."""
        return self.head(x)

    def example_scores(self, pool: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """mean_t l_{i,t} of each pool row, [N]: the score of a one-member group."""
        return (self.encode(pool) @ self.encode(targets).mean(dim=0))

    def attention_logits(self, h: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(l [..., S, m], attention logits l/τ + b [..., S, m]) of members h [..., S, dim] for targets q [m, dim]."""
        sim = h @ q.T
        return sim, sim / self.log_temperature.exp() + self.member_bias(h)

    def group_scores(self, members: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """score(S) of each group, members [G, S, input_dim] (groups of one size), targets [m, input_dim] -> [G]."""
        h = self.encode(members)
        sim, logits = self.attention_logits(h, self.encode(targets))
        weights = torch.softmax(logits, dim=-2)
        return members.shape[-2] * (weights * sim).sum(dim=-2).mean(dim=-1)


def ranking_loss(scores: torch.Tensor, effects: torch.Tensor, margin_scale: float, size: int) -> torch.Tensor:
    """Weighted pairwise ranking loss of groups of one ``size``: for every pair with effects Δ_i < Δ_j
    (i lowers the target loss more), softplus(−(score_i − score_j) / size), weighted by
    min(|Δ_i − Δ_j| / margin_scale, 1) so that pairs whose measured effects differ by noise count less.
    ``scores`` and ``effects`` are [G]; the mean over pairs is returned."""
    diff_effect = effects.unsqueeze(1) - effects.unsqueeze(0)  # Δ_i − Δ_j
    better = diff_effect < 0
    if not bool(better.any()):
        return scores.sum() * 0.0
    weight = (diff_effect.abs() / margin_scale).clamp(max=1.0)
    diff_score = (scores.unsqueeze(1) - scores.unsqueeze(0)) / size
    loss = nn.functional.softplus(-diff_score) * weight
    return loss[better].sum() / weight[better].sum()


def greedy_pooled(model: AirRep, pool: torch.Tensor, targets: torch.Tensor, k: int
                  ) -> tuple[list[int], list[float], list[float]]:
    """k picks, each the candidate that maximises the pooled group score of the picks so far plus itself
    (lowest index among equal gains). Returns (indices, group score after each pick, per-example scores of
    the picks). Incremental: per target t, Σ exp(attention logit) and Σ exp(·)·l over the picks."""
    n = pool.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be between 1 and the pool size {n}, got {k}")
    with torch.no_grad():
        h, q = model.encode(pool), model.encode(targets)
        sim, logits = model.attention_logits(h, q)
        weights = (logits - logits.max()).exp()  # one shared shift: the ratios of the softmax are unchanged
        single = sim.mean(dim=1)
        z = torch.zeros(q.shape[0], dtype=sim.dtype)
        num = torch.zeros_like(z)
        taken = torch.zeros(n, dtype=torch.bool)
        picks: list[int] = []
        totals: list[float] = []
        for step in range(1, k + 1):
            score = step * ((num + weights * sim) / (z + weights).clamp_min(torch.finfo(sim.dtype).tiny)).mean(dim=1)
            score[taken] = -math.inf
            best = int(torch.nonzero(score == score.max())[0])
            picks.append(best)
            totals.append(float(score[best]))
            taken[best] = True
            z += weights[best]
            num += weights[best] * sim[best]
    return picks, totals, [float(single[i]) for i in picks]
