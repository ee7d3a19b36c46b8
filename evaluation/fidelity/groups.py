"""Groups of training examples to remove: random and coherent, sizes on a grid of fractions of n.

Coherent kinds (as in Koh et al., 2019): ``class`` (a random subset of one class; for regression,
of one target-quantile bin), ``feature_cluster`` and ``gradient_cluster`` (the examples nearest to
a k-means centroid of the inputs, or of randomly projected per-example gradients at θ*).
Sizes cycle through a geometric grid from ``min_fraction`` to ``max_fraction`` of n.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.cluster import KMeans

from iaif.evaluation.fidelity.objective import Problem
from iaif.evaluation.fidelity.retrain import group_key

COHERENT_KINDS = ("class", "feature_cluster", "gradient_cluster")


@dataclass(frozen=True)
class GroupSettings:
    """How many groups of which kinds and sizes."""

    random_groups: int = 24
    """number of random groups"""
    coherent_groups: int = 36
    """number of coherent groups, split evenly over same class, feature clusters, gradient clusters"""
    min_fraction: float = 0.0025
    """smallest group, as a fraction of n"""
    max_fraction: float = 0.25
    """largest group, as a fraction of n"""
    num_sizes: int = 8
    """points on the geometric size grid"""
    clusters: int = 10
    """k of the k-means runs (features and gradients)"""
    projection_dim: int = 64
    """random projection of per-example gradients before k-means"""


@dataclass(frozen=True)
class Group:
    kind: str
    """random | class | feature_cluster | gradient_cluster"""
    index: np.ndarray
    """training indices removed"""

    @property
    def coherent(self) -> bool:
        return self.kind != "random"


def size_grid(n: int, min_fraction: float, max_fraction: float, num: int) -> list[int]:
    """Distinct group sizes, geometric in [min_fraction·n, max_fraction·n], at least 1."""
    if not 0 < min_fraction <= max_fraction < 1:
        raise ValueError(f"need 0 < min_fraction ({min_fraction}) <= max_fraction ({max_fraction}) < 1")
    sizes = np.geomspace(min_fraction * n, max_fraction * n, num)
    return sorted({max(1, int(round(s))) for s in sizes})


def projected_gradients(problem: Problem, theta: torch.Tensor, dim: int, seed: int, chunk: int = 512) -> np.ndarray:
    """[n, dim] per-example training gradients at θ times a Gaussian random matrix (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    proj = torch.randn(theta.numel(), dim, generator=gen, dtype=theta.dtype) / dim**0.5
    x, y = problem.data.x_train, problem.data.y_train
    return torch.cat([problem.per_example_grads(theta, x[i : i + chunk], y[i : i + chunk]) @ proj
                      for i in range(0, problem.n, chunk)]).numpy()


def draw_groups(labels: np.ndarray, features: np.ndarray, gradients: np.ndarray, settings: GroupSettings, seed: int) -> list[Group]:
    """Random and coherent groups over n = len(labels) training examples, all distinct."""
    n = len(labels)
    rng = np.random.default_rng(seed)
    sizes = size_grid(n, settings.min_fraction, settings.max_fraction, settings.num_sizes)
    anchors = {
        "feature_cluster": _kmeans_order(features, settings.clusters, seed),
        "gradient_cluster": _kmeans_order(gradients, settings.clusters, seed + 1),
    }
    classes = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    groups: list[Group] = []
    seen: set[str] = set()

    def add(kind: str, index: np.ndarray) -> bool:
        key = group_key(index)
        if key in seen:
            return False
        seen.add(key)
        groups.append(Group(kind, np.sort(index)))
        return True

    for i in range(settings.random_groups):
        add("random", rng.choice(n, sizes[i % len(sizes)], replace=False))
    per_kind = np.array_split(np.arange(settings.coherent_groups), len(COHERENT_KINDS))
    for kind, slots in zip(COHERENT_KINDS, per_kind):
        for i in range(len(slots)):
            size = sizes[i % len(sizes)]
            for _ in range(100):  # redraw the anchor when it repeats a group already drawn
                if kind == "class":
                    members = classes[rng.integers(len(classes))]
                    index = rng.choice(members, min(size, len(members)), replace=False)
                else:
                    order = anchors[kind][rng.integers(len(anchors[kind]))]
                    index = order[:size]
                if add(kind, index):
                    break
    return groups


def _kmeans_order(points: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    """For each k-means centroid, all example indices sorted by distance to it."""
    flat = points.reshape(len(points), -1)
    km = KMeans(n_clusters=k, n_init=3, random_state=seed).fit(flat)
    dist = km.transform(flat)
    return [np.argsort(dist[:, c], kind="stable") for c in range(k)]
