"""Which process this is under ``accelerate launch`` (or torchrun); a plain run is process 0 of 1.

The one place the package asks: accelerate's ``PartialState``, shared by every caller of a process
(and by the Hugging Face Trainer), so rank, world size, device and barriers agree everywhere."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from accelerate import PartialState


def process_state(cpu: bool = False) -> PartialState:
    """This process's ``PartialState`` (rank ``process_index``, ``num_processes``, ``device``, barriers);
    ``cpu`` forces the CPU when it is the first call of the process."""
    from accelerate import PartialState

    return PartialState(cpu=cpu)


def is_main_process() -> bool:
    """Whether this is process 0 (the one that writes shared files)."""
    return bool(process_state().is_main_process)


def wait_for_everyone() -> None:
    """Barrier across all processes (returns at once in a plain run)."""
    process_state().wait_for_everyone()
