"""Training AirRep on subset tables (``iaif subsets``) and the split that keeps evaluation subsets out.

Each table holds groups of one size with their measured effect Δ = target loss after fine-tuning on
the group − the base model's target loss. Ranking pairs are formed within a table (groups of one
size). A subset belongs to the held-out (evaluation) split when a draw seeded by (split_seed, subset)
falls below ``holdout_fraction``: the split of a subset never changes when a table grows, and AirRep is
trained only on the other subsets.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from iaif.common.contracts import SubsetRow, read_subset_rows
from iaif.selection.airrep.model import AirRep, AirRepShape, ranking_loss

logger = logging.getLogger(__name__)


@dataclass
class AirRepTraining:
    """Optimisation of the head and the pooling."""

    dim: int = 64
    """Width of the learned representations."""
    steps: int = 400
    """Full-batch AdamW steps over all ranking pairs."""
    learning_rate: float = 3e-3
    """AdamW learning rate."""
    weight_decay: float = 1e-3
    """AdamW weight decay."""
    seed: int = 0
    """Seed of the initialisation."""


@dataclass(frozen=True)
class GroupTable:
    """The groups of one table as pool row indices [G, S] and their measured effects [G]."""

    members: torch.Tensor
    effects: torch.Tensor


def is_heldout(subset: int, holdout_fraction: float, split_seed: int) -> bool:
    """Whether subset ``subset`` of a table is in the evaluation split (module docstring)."""
    if not 0 < holdout_fraction < 1:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
    return bool(np.random.default_rng([split_seed, subset]).random() < holdout_fraction)


def split_rows(rows: Sequence[SubsetRow], holdout_fraction: float, split_seed: int
               ) -> tuple[SubsetRow, list[SubsetRow], list[SubsetRow]]:
    """(base row, training subsets, held-out subsets) of one table, subsets in index order."""
    base = [r for r in rows if r.is_base]
    if len(base) != 1:
        raise ValueError(f"a subset table needs exactly one base row (subset -1), found {len(base)}")
    subsets = sorted((r for r in rows if not r.is_base), key=lambda r: r.subset)
    held = [r for r in subsets if is_heldout(r.subset, holdout_fraction, split_seed)]
    train = [r for r in subsets if not is_heldout(r.subset, holdout_fraction, split_seed)]
    return base[0], train, held


def group_table(rows: Sequence[SubsetRow], base: SubsetRow, row_of: dict[str, int], where: str) -> GroupTable:
    """Pool row indices and effects of subsets of one size; an id absent from the pool is an error."""
    sizes = {len(r.ids) for r in rows}
    if len(sizes) > 1:
        raise ValueError(f"{where}: subsets of several sizes {sorted(sizes)} in one table")
    missing = [(r.subset, i) for r in rows for i in r.ids if i not in row_of]
    if missing:
        raise ValueError(f"{where}: subset {missing[0][0]} holds id {missing[0][1]!r}, not in the pool")
    members = torch.tensor([[row_of[i] for i in r.ids] for r in rows], dtype=torch.long)
    effects = torch.tensor([r.target_loss - base.target_loss for r in rows], dtype=torch.float32)
    return GroupTable(members, effects)


def training_tables(paths: Sequence[str], pool_ids: Sequence[str], holdout_fraction: float, split_seed: int
                    ) -> tuple[list[GroupTable], list[tuple[str, int]]]:
    """The training split of every table and the (table, subset) keys it holds."""
    row_of = {i: n for n, i in enumerate(pool_ids)}
    tables, keys = [], []
    for path in paths:
        base, train, _ = split_rows(read_subset_rows(path), holdout_fraction, split_seed)
        if len(train) < 2:
            raise ValueError(f"{path}: {len(train)} training subsets; AirRep needs at least 2 (more subsets, "
                             "or a smaller holdout_fraction)")
        tables.append(group_table(train, base, row_of, path))
        keys += [(str(path), r.subset) for r in train]
    return tables, keys


def train_airrep(pool: torch.Tensor, targets: torch.Tensor, tables: Sequence[GroupTable],
                 settings: AirRepTraining) -> tuple[AirRep, list[float]]:
    """Fit AirRep to rank every table's groups by their measured effect; returns the model and the
    ranking loss at each step. ``pool`` [N, input_dim] and ``targets`` [m, input_dim] are the frozen
    representations."""
    if not tables:
        raise ValueError("no subset table to train AirRep on")
    torch.manual_seed(settings.seed)
    model = AirRep(AirRepShape(pool.shape[1], settings.dim))
    opt = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
    scales = [float(t.effects.std()) or 1.0 for t in tables]
    curve = []
    for _ in range(settings.steps):
        opt.zero_grad()
        loss = torch.stack([ranking_loss(model.group_scores(pool[t.members], targets), t.effects, scale,
                                         t.members.shape[1]) for t, scale in zip(tables, scales)]).mean()
        loss.backward()
        opt.step()
        curve.append(float(loss.detach()))
    model.eval()
    logger.info("AirRep: ranking loss %.4f -> %.4f over %d steps", curve[0], curve[-1], settings.steps)
    return model, curve
