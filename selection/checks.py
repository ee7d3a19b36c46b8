"""Checks of ``iaif select`` / ``iaif attribute`` inputs before any work starts: settings (a
one-line error naming the field), and pool examples without features, told apart by why.

Pool examples without a row in the pool store are either *excluded at extraction* (no answer
tokens within max_length, listed in the store's ``excluded.json``; never candidates) or *not in
the store at all* (the pool file holds examples the store was not made from): an error unless
``allow_missing_features`` is set.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

from iaif.common.contracts import CheckpointStores
from iaif.common.device import check_device
from iaif.selection.features.fingerprint import EXCLUDED_FILE, check_stores, excluded_ids, store_example_ids
from iaif.selection.influence import CheckpointFeatures, StoreSettings, checkpoint_stores, open_checkpoints, target_store_paths
from iaif.training.data import Example

logger = logging.getLogger(__name__)


def check_settings(cfg: Any) -> None:
    """Settings shared by select and attribute (whichever the config has): chunk_rows, device, lam,
    lam_factor, epsilon, shortlist, top_pairs."""
    if cfg.chunk_rows < 1:
        raise ValueError(f"chunk_rows (--chunk-rows): must be ≥ 1 (rows per chunk when reading features), got {cfg.chunk_rows}")
    check_device(cfg.device, "device (--device)")
    lam = getattr(cfg, "lam", None)
    if lam is not None and not (math.isfinite(lam) and lam >= 0):
        raise ValueError(f"lam (--lam): the trade-off weight λ must be finite and ≥ 0, got {lam}")
    factor = getattr(cfg, "lam_factor", 1.0)
    if not (math.isfinite(factor) and factor >= 0):
        raise ValueError(f"lam_factor (--lam-factor): the multiplier of the default λ must be finite and ≥ 0, got {factor}")
    if getattr(cfg, "greedy", None) == "stochastic" and not 0 < cfg.epsilon < 1:
        raise ValueError(f"epsilon (--epsilon): stochastic greedy's ε must be in (0, 1), got {cfg.epsilon}")
    if getattr(cfg, "greedy", None) == "exact" and cfg.shortlist < 1:
        raise ValueError(f"shortlist (--shortlist): must be ≥ 1 (candidates tracked exactly between full passes), got {cfg.shortlist}")
    if getattr(cfg, "top_pairs", 0) < 0:
        raise ValueError(f"top_pairs (--top-pairs): must be ≥ 0, got {cfg.top_pairs}")


def open_checked_stores(cfg: StoreSettings, targets: Sequence[Example]
                        ) -> tuple[list[CheckpointStores], list[CheckpointFeatures]]:
    """The feature stores of each checkpoint (``checkpoint_stores``), opened and checked against each
    other (``open_checkpoints``), then every target store against the target examples (select,
    attribute and lds)."""
    stores = checkpoint_stores(cfg)
    ckpts = open_checkpoints(stores)
    check_stores(target_store_paths(stores), targets)
    return stores, ckpts


def _renamed(ex: Example) -> bool:
    raw = ex.record.get("id")
    return raw not in (None, "") and str(raw) != ex.id


def pool_candidates(pool: Sequence[Example], pool_stores: Sequence[str], allow_missing: bool
                    ) -> tuple[list[Example], dict[str, int]]:
    """Pool examples that have features, after checking the pool file against every pool store;
    with counts of those left out, by reason, for the summary."""
    store = check_stores(pool_stores, pool)[0]
    have = set(store_example_ids(store))
    absent = [e for e in pool if e.id not in have]
    dropped = excluded_ids(store)
    at_extraction = [e for e in absent if e.id in dropped]
    not_in_store = [e for e in absent if e.id not in dropped]
    if at_extraction:
        logger.warning("%d pool example(s) were excluded at extraction (no answer tokens within max_length=%s; listed in "
                       "%s) and are not candidates", len(at_extraction), store.meta.max_length, store.path / EXCLUDED_FILE)
    if not_in_store:
        first = not_in_store[0]
        msg = (f"{len(not_in_store)} pool example(s) of {first.source} are not in the feature store {store.path} at all "
               f"(e.g. '{first.id}' at line {first.line})")
        renamed = [e for e in not_in_store if _renamed(e)]
        if renamed:
            msg += (f"; {len(renamed)} of them repeat an id used earlier in the file and were renamed "
                    f"(e.g. '{renamed[0].id}' at line {renamed[0].line})")
        if not allow_missing:
            raise ValueError(f"{msg}; re-run extract on this pool, or pass --allow-missing-features True to select among the others")
        logger.warning("%s; selecting among the others (allow_missing_features)", msg)
    counts = {"pool_without_features": len(absent), "pool_excluded_at_extraction": len(at_extraction),
              "pool_not_in_store": len(not_in_store)}
    return [e for e in pool if e.id in have], counts


__all__ = ["check_settings", "check_stores", "pool_candidates"]
