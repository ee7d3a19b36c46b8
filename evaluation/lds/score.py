"""The linear datamodeling score (LDS): Spearman correlation between predicted and measured group
effects over subsets, with a percentile bootstrap confidence interval over subsets."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import spearmanr


@dataclass(frozen=True)
class Lds:
    """Spearman ρ over the subsets and its bootstrap interval."""

    spearman: float
    low: float
    high: float
    subsets: int


def spearman(pred: np.ndarray, measured: np.ndarray) -> float:
    """Spearman ρ (average ranks for ties); NaN when either side is constant."""
    if np.ptp(pred) == 0 or np.ptp(measured) == 0:
        return float("nan")
    return float(spearmanr(pred, measured).statistic)


def _rho_draws(pred: np.ndarray, measured: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """ρ on ``resamples`` draws of subsets with replacement (the draws depend on the seed and count only)."""
    draws = np.random.default_rng(seed).integers(0, len(pred), size=(resamples, len(pred)))
    return np.array([spearman(pred[d], measured[d]) for d in draws])


def _interval(values: np.ndarray, level: float) -> tuple[float, float]:
    values = values[np.isfinite(values)]
    if not len(values):
        return float("nan"), float("nan")
    tail = (1 - level) / 2
    low, high = np.quantile(values, [tail, 1 - tail])
    return float(low), float(high)


def _checked(*vectors: np.ndarray) -> list[np.ndarray]:
    out = [np.asarray(v, dtype=float) for v in vectors]
    if any(v.shape != out[0].shape for v in out) or out[0].ndim != 1 or len(out[0]) < 3:
        raise ValueError(f"LDS needs equal-length vectors of at least 3 subsets, got {[v.shape for v in out]}")
    return out


def lds(pred: np.ndarray, measured: np.ndarray, resamples: int = 1000, seed: int = 0, level: float = 0.95) -> Lds:
    """ρ over all subsets and the percentile interval of ρ over ``resamples`` draws of subsets with
    replacement (draws where ρ is undefined are skipped)."""
    pred, measured = _checked(pred, measured)
    low, high = _interval(_rho_draws(pred, measured, resamples, seed), level)
    return Lds(spearman(pred, measured), low, high, len(pred))


def lds_gain(pred: np.ndarray, reference: np.ndarray, measured: np.ndarray, resamples: int = 1000, seed: int = 0,
             level: float = 0.95) -> Lds:
    """Paired comparison: ρ(pred) − ρ(reference) on the same subsets, and the percentile interval of that
    difference over the bootstrap draws of :func:`lds` (the same draws for both estimators)."""
    pred, reference, measured = _checked(pred, reference, measured)
    diff = _rho_draws(pred, measured, resamples, seed) - _rho_draws(reference, measured, resamples, seed)
    low, high = _interval(diff, level)
    return Lds(spearman(pred, measured) - spearman(reference, measured), low, high, len(pred))
