"""Which process this is under ``accelerate launch`` (or torchrun); a plain run is process 0 of 1.

The one place the package asks: accelerate's ``PartialState``, shared by every caller of a process
(and by the Hugging Face Trainer), so rank, world size, device and barriers agree everywhere."""

from __future__ import annotations

import logging
import os
import sys
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


def min_across_processes(value: int) -> int:
    """The smallest of every process's ``value`` (``value`` itself in a plain run)."""
    state = process_state()
    if state.num_processes == 1:
        return value
    import torch
    import torch.distributed as dist

    tensor = torch.tensor([value], dtype=torch.int64, device=state.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor.item())


def close_process_group() -> None:
    """Tear down the launch's process group, if one was set up (a no-op otherwise)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def leave_launch() -> None:
    """End a process of a launch (``WORLD_SIZE`` > 1) whose work is done: close the process group and
    exit at once, without the interpreter's finalisation, where gloo's threads can still abort the
    process ("terminate called without an active exception"; 3 of 11 runs of the 2-process select
    test, with the group closed first). A plain run only closes the group (if any) and returns."""
    close_process_group()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                    "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def detach_processes() -> tuple[int, int]:
    """Rank and number of processes of this launch, after which each process works alone.

    For sharded jobs whose processes never communicate (e.g. one fine-tune per subset): the launch
    variables are removed, so this process's ``PartialState`` (and the Trainer's) is a single process,
    and on a multi-GPU launch the process keeps its own GPU. Call it before anything else asks for the
    process state; a plain run is process 0 of 1."""
    import os

    from accelerate.state import PartialState

    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and PartialState._shared_state:
        raise RuntimeError("detach_processes: the process state was already created; call it first")
    local = os.environ.get("LOCAL_RANK")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if world > 1 and local is not None and visible:
        devices = visible.split(",")
        os.environ["CUDA_VISIBLE_DEVICES"] = devices[int(local) % len(devices)]
    elif world > 1 and local is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = local
    for name in LAUNCH_VARIABLES:
        os.environ.pop(name, None)
    return rank, world
