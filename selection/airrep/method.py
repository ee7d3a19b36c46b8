"""``iaif select --method airrep``: greedy on AirRep's pooled group score.

Greedy rather than top-k by per-example score: AirRep is trained to rank groups, and its group score
is not the sum of its members' scores (the attention re-weights members per target), so the set it
rates best is found by growing the set with the pick that raises the pooled score most. With uniform
attention the two coincide. Cost O(k · N · m) after one embedding pass (N pool, m target examples).
Per rank, ``score`` is the pick's gain in pooled group score, ``first_order`` its own (one-member)
score, ``interaction`` their difference.
"""

from __future__ import annotations

from typing import Any

import torch

from iaif.selection.airrep.model import greedy_pooled
from iaif.selection.airrep.stage import embed, load_airrep
from iaif.selection.select import SelectConfig, Selection, load_targets, resolve_k
from iaif.training.data import Example


def airrep_select(cfg: SelectConfig, pool: list[Example]) -> tuple[list[Example], Selection, dict[str, Any]]:
    """k pool examples by greedy on the pooled group score of the model in ``cfg.airrep_model``."""
    if not cfg.airrep_model:
        raise ValueError("method airrep: set airrep_model (the folder or airrep.pt written by iaif airrep)")
    model, meta = load_airrep(cfg.airrep_model)
    k = resolve_k(cfg.k, cfg.fraction, len(pool))
    targets = load_targets(cfg.targets)
    pool_x = embed(pool, meta["model"], meta["template"], meta["max_length"], cfg.batch_size, cfg.device)
    target_x = embed(targets, meta["model"], meta["template"], meta["max_length"], cfg.batch_size, cfg.device)
    idx, totals, single = greedy_pooled(model, pool_x, target_x, k)
    gains = [t - (totals[r - 1] if r else 0.0) for r, t in enumerate(totals)]
    return pool, Selection(idx, gains, single, [g - s for g, s in zip(gains, single)],
                           {"objective": totals[-1]}), {"airrep_model": cfg.airrep_model}


def airrep_group_score(model_path: str, pool_path: str, ids: list[str], target_paths: list[str],
                       batch_size: int = 16, device: str = "cpu") -> float:
    """AirRep's pooled score of the group ``ids`` of the pool file (``iaif attribute``): how much training
    on the group lowers the target loss, in the model's units (so, removing it raises the loss)."""
    from iaif.training.data import DataConfig, load_examples

    if not pool_path:
        raise ValueError("airrep_model needs pool (the pool file holding the group's examples)")
    model, meta = load_airrep(model_path)
    by_id = {e.id: e for e in load_examples(DataConfig(path=pool_path))}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise ValueError(f"{pool_path}: group id {missing[0]!r} is not in the pool")
    members = embed([by_id[i] for i in ids], meta["model"], meta["template"], meta["max_length"], batch_size, device)
    targets = embed(load_targets(target_paths), meta["model"], meta["template"], meta["max_length"], batch_size, device)
    with torch.no_grad():
        return float(model.group_scores(members.unsqueeze(0), targets)[0])
