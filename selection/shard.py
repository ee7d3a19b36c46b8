"""The selector's candidates split over the processes of a launch (``accelerate launch``: gloo on CPU,
NCCL on GPU); a plain run is one shard holding every candidate.

Rank r owns the contiguous candidate rows [start, stop); the boundaries fall on multiples of ``align``
(the row chunk), so a rank reads exactly the chunks one process would read and every row's Φ, ψ and
gain come out bit for bit the same. Little crosses processes: per greedy step, each rank's best
candidate (gain, interaction part, global index) with its feature rows, in one all_gather; the step's
winner is the largest gain and, among equal gains, the lowest global index, as in one process (exact
greedy exchanges blocks of candidates instead, two all_gathers for several steps: ``greedy``). Rows
needed from anywhere (λ's top-k set, the objective of the picks) are summed over ranks from blocks that
each rank fills only where it owns the row and with −0.0 elsewhere: −0.0 + x = x for every x, so the
assembled rows are exact whatever the reduction order.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Shard:
    """This process's candidate rows [start, stop) of n, as rank ``rank`` of ``world`` processes."""

    start: int
    stop: int
    n: int
    rank: int = 0
    world: int = 1

    @classmethod
    def whole(cls, n: int) -> Shard:
        """Every candidate in this process (a plain run)."""
        return cls(0, n, n)

    @classmethod
    def split(cls, n: int, rank: int, world: int, align: int) -> Shard:
        """Rank ``rank``'s share of n rows: whole ``align``-row chunks, as even as they go."""
        if world < 1 or not 0 <= rank < world or align < 1:
            raise ValueError(f"bad shard: rank {rank} of {world}, align {align}")
        chunks = math.ceil(n / align)
        lo, hi = rank * chunks // world, (rank + 1) * chunks // world
        return cls(min(lo * align, n), min(hi * align, n), n, rank, world)

    @property
    def size(self) -> int:
        return self.stop - self.start

    def local(self, index: int) -> int:
        """Row ``index``'s position in this shard, −1 when another rank owns it."""
        return index - self.start if self.start <= index < self.stop else -1

    def _sum(self, t: torch.Tensor) -> torch.Tensor:
        """Elementwise sum over ranks."""
        import torch.distributed as dist

        buf = t.to(_comm_device())
        dist.all_reduce(buf)
        return buf.to(t.device)

    def gather_rows(self, local_rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Rows ``index`` (global candidate indices) of a row-sharded tensor ([size] or [size, q]), as
        float32 on every rank, bit for bit the rows one process holds."""
        if self.world == 1:
            return local_rows[index].float()
        index = index.to(local_rows.device)
        own = (index >= self.start) & (index < self.stop)
        out = torch.full((len(index), *local_rows.shape[1:]), -0.0, dtype=torch.float32, device=local_rows.device)
        out[own] = local_rows[index[own] - self.start].float()
        return self._sum(out)

    def full(self, local_values: torch.Tensor) -> torch.Tensor:
        """A row-sharded vector ([size]) assembled over all n candidates, float32, on every rank."""
        if self.world == 1:
            return local_values.float()
        out = torch.full((self.n,), -0.0, dtype=torch.float32, device=local_values.device)
        out[self.start : self.stop] = local_values.float()
        return self._sum(out)

    def gather(self, mine: torch.Tensor) -> torch.Tensor:
        """Every rank's float64 vector ``mine`` (the same length on every rank), as rows [world, len] on
        the CPU, the same on every rank."""
        if self.world == 1:
            return mine.to("cpu", torch.float64)[None]
        import torch.distributed as dist

        buf = mine.to(_comm_device(), torch.float64)
        every = [torch.empty_like(buf) for _ in range(self.world)]
        dist.all_gather(every, buf)
        return torch.stack(every).cpu()

    def winner(self, local: int, gain: float, inter: float, rows: list[torch.Tensor] | None,
               widths: list[int], stage: int = 0, required: bool = True
               ) -> tuple[int, float, float, list[torch.Tensor], int]:
        """The step's pick over all ranks from each rank's best: ``local`` (−1: none here), its gain and
        interaction part and its rows (one per objective, of ``widths``). Only the ranks of the lowest
        ``stage`` compete (the block greedy's first failed step; 0 for every rank in a plain step).
        Returns (global index, gain, interaction part, rows as float32, that lowest stage), the same on
        every rank; when none of those ranks has a candidate, an error, or with ``required=False``
        index −1."""
        if self.world == 1:
            if local < 0 or rows is None:
                if required:
                    raise ValueError("no candidate left to pick")
                return -1, -math.inf, 0.0, [], stage
            return self.start + local, gain, inter, rows, stage
        mine = torch.zeros(4 + sum(widths), dtype=torch.float64)
        mine[3] = stage
        if local >= 0 and rows is not None:
            mine[0], mine[1], mine[2] = gain, inter, float(self.start + local)
            mine[4:] = torch.cat([r.reshape(-1).cpu().double() for r in rows])
        else:
            mine[0], mine[2] = -math.inf, float(self.n)
        table = self.gather(mine)
        low = float(table[:, 3].min())
        table[table[:, 3] != low, 0] = -math.inf
        best = float(table[:, 0].max())
        if best == -math.inf:
            if required:
                raise ValueError("no candidate with a finite gain left on any rank")
            return -1, best, 0.0, [], int(low)
        ties = (table[:, 0] == best).nonzero().squeeze(1)
        w = int(ties[torch.argmin(table[ties, 2])])
        home = rows[0].device if rows else torch.device("cpu")
        parts = torch.split(table[w, 4:].to(home, torch.float32), widths)
        return int(table[w, 2]), float(table[w, 0]), float(table[w, 1]), list(parts), int(low)


def _comm_device() -> torch.device:
    """Where collectives take their tensors: the GPU of this process under NCCL, else the CPU."""
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def launch_shard(n: int, align: int) -> Shard:
    """This process's shard of n candidates: the whole pool in a plain run, else a ``Shard.split`` over
    the launch's processes (their process group set up through ``iaif.common.dist``)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Shard.whole(n)  # no process state created: a plain run stays free to pick its device later
    from iaif.common.dist import process_state

    state = process_state(cpu=not torch.cuda.is_available())
    return Shard.split(n, state.process_index, state.num_processes, align)
