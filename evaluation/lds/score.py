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


def lds(pred: np.ndarray, measured: np.ndarray, resamples: int = 1000, seed: int = 0, level: float = 0.95) -> Lds:
    """ρ over all subsets and the percentile interval of ρ over ``resamples`` draws of subsets with
    replacement (draws where ρ is undefined are skipped)."""
    pred, measured = np.asarray(pred, dtype=float), np.asarray(measured, dtype=float)
    if pred.shape != measured.shape or pred.ndim != 1 or len(pred) < 3:
        raise ValueError(f"LDS needs two equal-length vectors of at least 3 subsets, got {pred.shape} and {measured.shape}")
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(pred), size=(resamples, len(pred)))
    rhos = np.array([spearman(pred[d], measured[d]) for d in draws])
    rhos = rhos[np.isfinite(rhos)]
    tail = (1 - level) / 2
    low, high = (np.quantile(rhos, [tail, 1 - tail]) if len(rhos) else (np.nan, np.nan))
    return Lds(spearman(pred, measured), float(low), float(high), len(pred))
