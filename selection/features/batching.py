"""Length-grouped batches that fill a token budget, and their grouping into resumable shards.

Everything is a deterministic function of the example lengths and the settings, so every process
computes the same plan and a resumed run the same shards."""

from __future__ import annotations

from collections.abc import Sequence


def token_budget_batches(lengths: Sequence[int], token_budget: int, max_batch_size: int | None = None) -> list[list[int]]:
    """Indices grouped longest first (ties by index) into batches whose padded size
    ``len(batch) · max length`` stays within ``token_budget`` (a longer example gets a batch of its own)."""
    if token_budget < 1:
        raise ValueError(f"token_budget must be positive, got {token_budget}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        if batches:
            current = batches[-1]
            width = lengths[current[0]]  # longest first: the first member is the widest
            fits = (len(current) + 1) * width <= token_budget
            if fits and (max_batch_size is None or len(current) < max_batch_size):
                current.append(i)
                continue
        batches.append([i])
    return batches


def group_shards(batches: Sequence[list[int]], shard_examples: int) -> list[list[list[int]]]:
    """Consecutive batches grouped into shards of at least ``shard_examples`` examples (the last may be smaller)."""
    if shard_examples < 1:
        raise ValueError(f"shard_examples must be positive, got {shard_examples}")
    shards: list[list[list[int]]] = []
    count = shard_examples
    for batch in batches:
        if count >= shard_examples:
            shards.append([])
            count = 0
        shards[-1].append(batch)
        count += len(batch)
    return shards
