"""The train-by-target influence matrix Φ from feature stores (METHOD.md §1-§3).

    Φ = Σ_c η̄_c · normalize(Γ_pool^c) · normalize(G_target^c)ᵀ          [N, m]

over warm-up checkpoints c with learning-rate weights η̄_c (normalised to sum 1): φ_{a,t} is the
lr-weighted cosine of pool example a's update direction and target example t's gradient, the LESS
score of one pair. Built in row chunks, never more than one chunk of pool features in memory.
The identity (parameter-space) curvature uses the pool features themselves:
u_a = concat_c √η̄_c · normalize(Γ_a^c), so ⟨u_a, u_b⟩ = Σ_c η̄_c cos(Γ_a^c, Γ_b^c).

Feature geometry (``FeatureGeometry``), both settings of ``iaif select``:

* ``normalise``: rows to unit length (cosines, the LESS recipe) or raw projected vectors (dot products).
* ``whiten``: the training-loss curvature that u_a = (1/n) H⁻¹ g_a contains and the LESS recipe drops
  (H = I). With a damped Gauss-Newton H_c = Γ̂ᵀΓ̂/N + δ_c I of the checkpoint's pool features in the
  projected space (the TRAK / TrackStar choice; δ_c = ``whiten`` × the mean eigenvalue of Γ̂ᵀΓ̂/N),
  pool and target rows are mapped by H_c^(-1/2) before the cosine, so
  φ_{a,t} = g_tᵀ H_c⁻¹ Γ_a / (‖g_t‖_{H_c⁻¹} ‖Γ_a‖_{H_c⁻¹}): directions every example shares are
  scaled down. d × d per checkpoint, one eigendecomposition (d ≤ 8192).

The core works on in-memory or memory-mapped arrays; ``open_checkpoints`` reads and checks the stores
of each checkpoint (``iaif.common.contracts.CheckpointStores``; ``pair_stores`` pairs flat store lists).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from iaif.common.contracts import CheckpointStores
from iaif.selection.features.store import FeatureStore, StoreMeta, StoreMismatchError

logger = logging.getLogger(__name__)


class FeatureError(ValueError):
    """Unusable features: NaN or inf values, zero rows, missing rows, mismatched stores."""


@dataclass
class CheckpointFeatures:
    """One checkpoint's pool features, target features and learning-rate weight.

    ``pool`` and ``targets`` are [rows, d] arrays (memory maps are fine); ``pool_ids`` and
    ``target_ids`` name their rows."""

    pool: np.ndarray | torch.Tensor
    pool_ids: list[str]
    targets: np.ndarray | torch.Tensor
    target_ids: list[str]
    weight: float
    name: str = "checkpoint"
    target_name: str = ""
    """Where the target rows come from, for messages (default: ``name``)."""


@dataclass(frozen=True)
class FeatureGeometry:
    """How projected feature rows are compared (module docstring)."""

    normalise: bool = True
    """Unit-length rows (cosine scores, LESS) or raw projected vectors."""
    whiten: float | None = None
    """Relative damping of the Gauss-Newton training curvature; None: H = I (the LESS recipe)."""

    def __post_init__(self) -> None:
        if self.whiten is not None and not (math.isfinite(self.whiten) and self.whiten > 0):
            raise ValueError(f"whiten (relative damping) must be finite and > 0, got {self.whiten}")


def checked(block: np.ndarray | torch.Tensor, where: str, ids: Sequence[str], device: str | torch.device = "cpu"
            ) -> torch.Tensor:
    """Rows as float32; NaN/inf or all-zero rows are an error naming ``where`` and the id."""
    x = torch.as_tensor(np.asarray(block, dtype=np.float32) if isinstance(block, np.ndarray) else block)
    x = x.to(device=device, dtype=torch.float32)
    bad = ~torch.isfinite(x).all(dim=1)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise FeatureError(f"{where}: row {i} (id '{ids[i]}') has NaN or inf features ({int(bad.sum())} such rows)")
    zero = x.norm(dim=1) == 0
    if bool(zero.any()):
        i = int(zero.nonzero()[0])
        raise FeatureError(f"{where}: row {i} (id '{ids[i]}') is an all-zero feature vector")
    return x


def normalized(block: np.ndarray | torch.Tensor, where: str, ids: Sequence[str], device: str | torch.device = "cpu"
               ) -> torch.Tensor:
    """Rows as float32 unit vectors; NaN/inf or all-zero rows are an error naming ``where`` and the id."""
    x = checked(block, where, ids, device)
    return x / x.norm(dim=1, keepdim=True)


def whitening_transform(pool: np.ndarray | torch.Tensor, rows: np.ndarray, damping: float, where: str,
                        ids: Sequence[str], chunk_rows: int = 16384, device: str | torch.device = "cpu") -> torch.Tensor:
    """H^(-1/2) for H = Γ̂ᵀΓ̂/N + δI over the unit-normalised pool rows ``rows`` (δ = damping × mean eigenvalue)."""
    d = pool.shape[1]
    gram = torch.zeros(d, d, dtype=torch.float64, device=device)
    for start in range(0, len(rows), chunk_rows):
        block = normalized(pool[rows[start : start + chunk_rows]], where, ids[start : start + chunk_rows], device).double()
        gram += block.T @ block
    evals, evecs = torch.linalg.eigh(gram / len(rows))
    evals = evals.clamp_min(0.0)
    delta = damping * float(evals.mean())
    return ((evecs * (evals + delta).rsqrt()) @ evecs.T).float()


class _Rows:
    """One checkpoint's rows in the chosen geometry: checked, optionally whitened, optionally unit length."""

    def __init__(self, geometry: FeatureGeometry, transform: torch.Tensor | None):
        self.geometry, self.transform = geometry, transform

    def __call__(self, block: np.ndarray | torch.Tensor, where: str, ids: Sequence[str],
                 device: str | torch.device) -> torch.Tensor:
        if self.transform is None:
            return normalized(block, where, ids, device) if self.geometry.normalise else checked(block, where, ids, device)
        x = normalized(block, where, ids, device) @ self.transform
        return x / x.norm(dim=1, keepdim=True) if self.geometry.normalise else x


def _rows(ids: Sequence[str], wanted: Sequence[str], where: str) -> np.ndarray:
    pos = {x: i for i, x in enumerate(ids)}
    missing = [x for x in wanted if x not in pos]
    if missing:
        raise FeatureError(f"{where}: no features for {len(missing)} example(s), e.g. {missing[:3]}")
    return np.fromiter((pos[x] for x in wanted), dtype=np.int64, count=len(wanted))


def _check_weights(checkpoints: Sequence[CheckpointFeatures]) -> list[float]:
    if not checkpoints:
        raise FeatureError("no checkpoint features given")
    w = [c.weight for c in checkpoints]
    if any(not math.isfinite(x) or x < 0 for x in w) or sum(w) <= 0:
        raise FeatureError(f"learning-rate weights must be finite, ≥ 0 and not all 0, got {w}")
    return [x / sum(w) for x in w]


def _geometries(checkpoints: Sequence[CheckpointFeatures], pool_rows: Sequence[np.ndarray], geometry: FeatureGeometry,
                pool_ids: Sequence[str], chunk_rows: int, device: str | torch.device) -> list[_Rows]:
    if geometry.whiten is None:
        return [_Rows(geometry, None) for _ in checkpoints]
    out = []
    for c, rows in zip(checkpoints, pool_rows):
        logger.info("%s: whitening with the damped Gauss-Newton curvature of %d pool rows (d=%d)", c.name, len(rows),
                    c.pool.shape[1])
        out.append(_Rows(geometry, whitening_transform(c.pool, rows, geometry.whiten, f"{c.name} (pool)", list(pool_ids),
                                                       chunk_rows, device)))
    return out


def _row_range(rows: range | None, n: int, chunk_rows: int) -> range:
    """The pool rows to build (all by default); a part must start on a chunk boundary, so its chunks
    are those of the whole and its rows come out bit for bit the same."""
    if rows is None:
        return range(n)
    if rows.step != 1 or not 0 <= rows.start <= rows.stop <= n or rows.start % chunk_rows:
        raise ValueError(f"pool rows {rows}: a contiguous part of 0..{n} starting at a multiple of {chunk_rows}")
    return rows


def influence_matrix(checkpoints: Sequence[CheckpointFeatures], pool_ids: Sequence[str], target_ids: Sequence[str],
                     chunk_rows: int = 16384, device: str | torch.device = "cpu",
                     geometry: FeatureGeometry = FeatureGeometry(), rows: range | None = None) -> torch.Tensor:
    """Φ [len(pool_ids), len(target_ids)] in the given row and column order (module docstring);
    ``rows``: only those pool rows (e.g. one process's shard; the whitening still covers every row)."""
    if not pool_ids:
        raise FeatureError("empty pool: no candidate has features")
    if not target_ids:
        raise FeatureError("no target examples")
    weights = _check_weights(checkpoints)
    part = _row_range(rows, len(pool_ids), chunk_rows)
    phi = torch.zeros(len(part), len(target_ids), dtype=torch.float32, device=device)
    for c in checkpoints:
        if c.pool.shape[1] != c.targets.shape[1]:
            raise FeatureError(f"{c.name}: pool features have dim {c.pool.shape[1]}, targets {c.targets.shape[1]}")
    pool_rows = [_rows(c.pool_ids, pool_ids, f"{c.name} (pool)") for c in checkpoints]
    prepare = _geometries(checkpoints, pool_rows, geometry, pool_ids, chunk_rows, device)
    plan = []
    for c, w, p_rows, prep in zip(checkpoints, weights, pool_rows, prepare):
        where = c.target_name or f"{c.name} (targets)"
        tgt = prep(c.targets[_rows(c.target_ids, target_ids, where)], where, list(target_ids), device)
        plan.append((c, w, p_rows, tgt, prep))
    for start in range(part.start, part.stop, chunk_rows):
        end = min(start + chunk_rows, part.stop)
        ids = list(pool_ids[start:end])
        for c, w, p_rows, tgt, prep in plan:
            block = prep(c.pool[p_rows[start:end]], f"{c.name} (pool)", ids, device)
            phi[start - part.start : end - part.start] += w * (block @ tgt.T)
    return phi


def parameter_features(checkpoints: Sequence[CheckpointFeatures], pool_ids: Sequence[str],
                       chunk_rows: int = 16384, device: str | torch.device = "cpu",
                       geometry: FeatureGeometry = FeatureGeometry(), rows: range | None = None) -> torch.Tensor:
    """u_a = concat_c √η̄_c · Γ̂_a^c, [len(pool_ids), Σ_c d_c] (identity curvature), Γ̂ in the given
    geometry; ``rows`` as in ``influence_matrix``."""
    weights = _check_weights(checkpoints)
    dims = [c.pool.shape[1] for c in checkpoints]
    part = _row_range(rows, len(pool_ids), chunk_rows)
    out = torch.empty(len(part), sum(dims), dtype=torch.float32, device=device)
    pool_rows = [_rows(c.pool_ids, pool_ids, f"{c.name} (pool)") for c in checkpoints]
    prepare = _geometries(checkpoints, pool_rows, geometry, pool_ids, chunk_rows, device)
    col = 0
    for c, w, d, p_rows, prep in zip(checkpoints, weights, dims, pool_rows, prepare):
        for start in range(part.start, part.stop, chunk_rows):
            end = min(start + chunk_rows, part.stop)
            out[start - part.start : end - part.start, col : col + d] = math.sqrt(w) * prep(
                c.pool[p_rows[start:end]], f"{c.name} (pool)", list(pool_ids[start:end]), device)
        col += d
    return out


def group_columns(labels: Sequence[str]) -> tuple[list[int], dict[str, slice]]:
    """A permutation that makes each label's positions contiguous (labels in first-seen order) and
    each label's slice in the permuted order."""
    groups: dict[str, list[int]] = {}
    for i, lab in enumerate(labels):
        groups.setdefault(lab, []).append(i)
    perm: list[int] = []
    slices: dict[str, slice] = {}
    for lab, idx in groups.items():
        slices[lab] = slice(len(perm), len(perm) + len(idx))
        perm += idx
    return perm, slices


# ---------------------------------------------------------------- stores


def _lr_weights(pools: Sequence[FeatureStore]) -> list[float]:
    """The checkpoints' learning-rate weights; a single store without one (no warm-up) weighs 1."""
    weights = [p.meta.lr_weight for p in pools]
    if len(pools) == 1 and weights[0] is None:
        return [1.0]
    missing = [str(p.path) for p, w in zip(pools, weights) if w is None]
    if missing:
        raise FeatureError(f"{missing[0]}: meta.json has no lr_weight (the checkpoint's learning-rate weight), "
                           "needed to combine several checkpoints")
    return [float(w) for w in weights if w is not None]  # none missing (checked above)


def _checkpoint_key(meta: StoreMeta) -> str:
    return meta.adapter_hash or meta.checkpoint or ""


class StoreSettings(Protocol):
    """The store fields of ``iaif select``, ``attribute`` and ``lds``: the paired ``checkpoints`` list
    (YAML) or the flat lists the command line takes."""

    checkpoints: list[CheckpointStores]
    pool_stores: list[str]
    target_stores: list[str]
    sampled_target_stores: list[str]


def pair_stores(pool_paths: Sequence[str], target_paths: Sequence[str], sampled_paths: Sequence[str] = ()
                ) -> list[CheckpointStores]:
    """Pair flat store lists by checkpoint: each target store joins the pool store whose ``meta.json``
    records the same adapter hash (order kept). A target store whose checkpoint has no pool store,
    or two pool stores of one checkpoint, are a ``StoreMismatchError`` naming the files."""
    pairs: dict[str, CheckpointStores] = {}
    for path in pool_paths:
        key = _checkpoint_key(FeatureStore.read_meta(path))
        if key in pairs:
            raise StoreMismatchError(f"{pairs[key].pool} and {path}: two pool stores come from the same checkpoint "
                                     f"(adapter_hash {key!r})")
        pairs[key] = CheckpointStores(pool=str(path), adapter_hash=key)
    for paths, sampled in ((target_paths, False), (sampled_paths, True)):
        for path in paths:
            key = _checkpoint_key(FeatureStore.read_meta(path))
            if key not in pairs:
                raise StoreMismatchError(f"{path}: target store from a checkpoint without a pool store "
                                         f"(adapter_hash {key!r}; pool stores {list(pool_paths)})")
            (pairs[key].sampled_targets if sampled else pairs[key].targets).append(str(path))
    return list(pairs.values())


def checkpoint_stores(cfg: StoreSettings) -> list[CheckpointStores]:
    """The stores per checkpoint: ``checkpoints`` as given, or the flat lists paired by ``pair_stores``;
    both at once is an error."""
    flat = [name for name in ("pool_stores", "target_stores", "sampled_target_stores") if getattr(cfg, name)]
    if cfg.checkpoints and flat:
        raise ValueError(f"give the stores either as `checkpoints` (one entry per checkpoint) or as "
                         f"{' / '.join(f'--{n}' for n in flat)}, not both")
    if cfg.checkpoints:
        return list(cfg.checkpoints)
    return pair_stores(cfg.pool_stores, cfg.target_stores, cfg.sampled_target_stores)


def target_store_paths(pairs: Sequence[CheckpointStores]) -> list[str]:
    """Every target store (true-label, then sampled-label) of every checkpoint."""
    return [t for p in pairs for t in p.targets] + [t for p in pairs for t in p.sampled_targets]


def open_checkpoints(pairs: Sequence[CheckpointStores], sampled: bool = False) -> list[CheckpointFeatures]:
    """Open each checkpoint's pool store and target stores (``sampled``: its sampled-label stores).

    Several target stores of one checkpoint (e.g. one per target file) are stacked. Stores of another
    model, template or projection, or made from another adapter than the checkpoint's, raise
    ``StoreMismatchError``; a checkpoint without target features raises ``FeatureError``. ``sampled``:
    the target stores are sampled-label stores (meta ``sampled_labels`` > 0, curvature=gn); a
    sampled-label store given as a true-label one is refused.
    """
    if not pairs or not all(p.pool for p in pairs):
        raise FeatureError("no pool feature store given (pool_stores, or `pool` of each checkpoint)")
    what = "sampled_target_stores" if sampled else "target_stores"
    if not any(p.sampled_targets if sampled else p.targets for p in pairs):
        raise FeatureError(f"no target feature store given ({what}): the targets have no features")
    pools = [FeatureStore.open(p.pool) for p in pairs]
    groups = [[FeatureStore.open(t) for t in (p.sampled_targets if sampled else p.targets)] for p in pairs]
    for s in pools[1:]:
        pools[0].check_compatible(s, same_dataset=True)
        if s.ids != pools[0].ids:
            raise StoreMismatchError(f"{pools[0].path} and {s.path}: pool stores list different example ids")
    for s in (s for g in groups for s in g):
        pools[0].check_compatible(s, same_dataset=False)
        draws = s.meta.sampled_labels
        if draws and not sampled:
            raise StoreMismatchError(f"{s.path}: a sampled-label store (sampled_labels={draws}) given as a true-label "
                                     "target store; pass it as sampled_target_stores (curvature=gn)")
        if sampled and not draws:
            logger.warning("%s: not a sampled-label store (no sampled_labels in meta.json); its rows are used as "
                           "sampled-label gradients", s.path)
    keys = [p.adapter_hash or _checkpoint_key(s.meta) for p, s in zip(pairs, pools)]
    if len(set(keys)) != len(keys):
        raise StoreMismatchError(f"several pool stores come from the same checkpoint: {[p.pool for p in pairs]}")
    for pair, pool, group, key in zip(pairs, pools, groups, keys):
        where = pair.checkpoint or pool.path
        for s in (pool, *group):
            if _checkpoint_key(s.meta) != key:
                raise StoreMismatchError(f"{s.path}: made from adapter {_checkpoint_key(s.meta)!r}, paired with "
                                         f"checkpoint {where} (adapter_hash {key!r})")
        if not group:
            raise FeatureError(f"{pool.path}: no target store from the same checkpoint (adapter_hash {key!r})")
    for s in pools:
        if s.meta.feature != "adam":
            logger.warning("%s: pool features are '%s', LESS uses Adam update directions ('adam')", s.path, s.meta.feature)
    for s in (s for g in groups for s in g):
        if s.meta.feature != "grad":
            logger.warning("%s: target features are '%s', expected plain gradients ('grad')", s.path, s.meta.feature)
    out = []
    for p, group, weight in zip(pools, groups, _lr_weights(pools)):
        feats = group[0].features if len(group) == 1 else np.concatenate([g.features for g in group])
        ids = [i for g in group for i in g.ids]
        out.append(CheckpointFeatures(p.features, p.ids, feats, ids, weight, str(p.path),
                                      "target stores " + ", ".join(str(g.path) for g in group)))
    logger.info("%d checkpoint(s), lr weights %s", len(out), [round(c.weight, 4) for c in out])
    return out
