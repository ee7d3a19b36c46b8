"""The largest setting (token budget, batch size) that fits in memory, found by trying one probe and
halving on out-of-memory (accelerate's ``find_executable_batch_size``).

The probe runs the heaviest unit of work a job would run at a given size (its largest batch), so the
job itself never retries: it runs once with the size found."""

from __future__ import annotations

import logging
from collections.abc import Callable

logger = logging.getLogger(__name__)


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an out-of-memory error of torch (CUDA, MPS, XPU, or the CPU allocator)."""
    import torch
    from accelerate.utils.memory import should_reduce_batch_size

    return isinstance(error, torch.OutOfMemoryError) or (isinstance(error, Exception) and should_reduce_batch_size(error))


def largest_fitting(probe: Callable[[int], object], start: int, floor: int = 1,
                    allowed: Callable[[int], bool] | None = None, what: str = "size") -> int:
    """The first of ``start``, ``start/2``, ``start/4``, ... (each rounded down to the next size that
    ``allowed`` accepts, never below ``floor``) at which ``probe(size)`` runs without running out of
    memory. Other errors propagate; MemoryError (naming ``what``) if even ``floor`` does not fit."""
    from accelerate.utils import find_executable_batch_size
    from accelerate.utils.memory import should_reduce_batch_size

    if start < floor or floor < 1:
        raise ValueError(f"{what}: cannot search sizes from {start} down to {floor}")
    size = start

    def halve() -> int:
        nonlocal size
        if size <= floor:
            raise MemoryError(f"{what}: out of memory even at {size}")
        smaller = max(size // 2, floor)
        while allowed is not None and smaller > floor and not allowed(smaller):
            smaller -= 1
        logger.warning("%s %d: out of memory; trying %d", what, size, smaller)
        size = smaller
        return size

    @find_executable_batch_size(starting_batch_size=start, reduce_batch_size_fn=halve)
    def attempt(value: int) -> int:
        try:
            probe(value)
        except Exception as err:
            if is_out_of_memory(err) and not should_reduce_batch_size(err):  # accelerate retries on its messages only
                raise RuntimeError(f"{what} {value}: out of memory.") from err
            raise
        return value

    found = attempt()
    logger.info("%s: %d fits (tried from %d)", what, found, start)
    return found
