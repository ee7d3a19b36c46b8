"""Random selection, seeded, optionally balanced over groups (source file or task)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def balanced_quotas(sizes: Sequence[int], k: int) -> list[int]:
    """Split k as evenly as possible over groups of the given sizes (water-filling: a group that
    is too small gives its share to the others)."""
    if k > sum(sizes):
        raise ValueError(f"k={k} exceeds the {sum(sizes)} examples available")
    quota = [0] * len(sizes)
    open_groups = [i for i, s in enumerate(sizes) if s > 0]
    left = k
    while left > 0:
        share, extra = divmod(left, len(open_groups))
        for rank, i in enumerate(open_groups):
            add = min(share + (1 if rank < extra else 0), sizes[i] - quota[i])
            quota[i] += add
            left -= add
        open_groups = [i for i in open_groups if quota[i] < sizes[i]]
    return quota


def random_select(n: int, k: int, seed: int, groups: Sequence[str] | None = None) -> list[int]:
    """k distinct indices of range(n) in a random order; with ``groups`` (one label per index), the
    same number from every group as far as the group sizes allow."""
    if not 1 <= k <= n:
        raise ValueError(f"k must be between 1 and the pool size {n}, got {k}")
    rng = np.random.default_rng(seed)
    if groups is None:
        return rng.permutation(n)[:k].tolist()
    if len(groups) != n:
        raise ValueError(f"{len(groups)} group labels for {n} examples")
    labels = sorted(set(groups))
    members = {g: [i for i, x in enumerate(groups) if x == g] for g in labels}
    quotas = balanced_quotas([len(members[g]) for g in labels], k)
    chosen = [i for g, q in zip(labels, quotas) for i in rng.permutation(members[g])[:q].tolist()]
    return rng.permutation(np.asarray(chosen)).tolist()
