"""Training to the optimum and leave-group-out retraining, with an on-disk cache.

Full-batch L-BFGS (strong-Wolfe line search) in float64 on L_w(θ). Ground truth for a group S:
Δf(S) = f(θ_{-S}) − f(θ*), where θ_{-S} minimises the objective without S's terms.

* convex models: θ_{-S} is the unique optimum; retraining warm-starts from θ*.
* non-convex models: Δf is averaged over several seeds (so is the estimate; see ``benchmark``);
  per seed, retraining starts either from that seed's θ* (``warm_start``, the local optimum the
  influence expansion describes, and far cheaper) or from the same initialisation θ₀ as θ*.

The cache is one JSON file per (pair fingerprint, seed): group key → f(θ_{-S}); the trained θ* is
kept next to it. A rerun with the same settings only recomputes the estimators.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from iaif.common.atomic import write_json
from iaif.common.progress import progress_iter
from iaif.evaluation.fidelity.objective import Problem

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FitSettings:
    """L-BFGS settings."""

    max_iter: int = 1000
    """iteration cap per (re)training"""
    tol_grad: float = 1e-8
    """stop when the largest gradient entry falls below this"""
    history: int = 50
    """L-BFGS memory"""


def fit(problem: Problem, theta0: torch.Tensor, settings: FitSettings, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Minimise L_w from θ₀; returns θ (a warning is logged when the tolerance is not reached)."""
    theta = theta0.detach().clone().requires_grad_(True)
    opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=settings.max_iter, tolerance_grad=settings.tol_grad,
                            tolerance_change=1e-15, history_size=settings.history, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = problem.objective(theta, weights)
        loss.backward()
        return loss

    opt.step(closure)
    closure()
    if theta.grad is None:
        raise RuntimeError("L-BFGS left no gradient on the parameters")
    gmax = float(theta.grad.abs().max())
    if gmax > 100 * settings.tol_grad:
        logger.warning("L-BFGS stopped with max |grad| %.2e (tolerance %.1e); raise fit.max_iter", gmax, settings.tol_grad)
    return theta.detach()


def group_key(index: np.ndarray) -> str:
    """Stable key of a group: hash of its sorted training indices."""
    return hashlib.sha1(np.sort(np.asarray(index, dtype=np.int64)).tobytes()).hexdigest()[:16]


class RetrainCache:
    """JSON map group key → f(θ_{-S}) for one pair and seed, written atomically after every entry."""

    def __init__(self, folder: Path, fingerprint: str, seed: int):
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"{fingerprint}-seed{seed}.json"
        self.theta_path = folder / f"{fingerprint}-seed{seed}-theta.pt"
        self.values: dict[str, float] = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def put(self, key: str, value: float) -> None:
        self.values[key] = value
        write_json(self.path, self.values)

    def full_model(self, problem: Problem, theta0: torch.Tensor, settings: FitSettings) -> torch.Tensor:
        """θ* from the cache, else trained from θ₀ and stored."""
        if self.theta_path.is_file():
            return torch.load(self.theta_path, weights_only=True)
        theta = fit(problem, theta0, settings)
        torch.save(theta, self.theta_path)
        return theta


def leave_group_out(
    problem: Problem,
    groups: Sequence[np.ndarray],
    theta_full: Sequence[torch.Tensor],
    theta_init: Sequence[torch.Tensor],
    caches: Sequence[RetrainCache],
    warm_start: bool,
    settings: FitSettings,
    label: str = "retrain",
) -> np.ndarray:
    """[G, seeds] array of f(θ_{-S}) − f(θ*) per group and seed; missing entries are retrained."""
    todo = [(g, s) for g, idx in enumerate(groups) for s, c in enumerate(caches) if group_key(idx) not in c.values]
    if len(todo) < len(groups) * len(caches):
        logger.info("%s: %d of %d retrainings found in the cache", label, len(groups) * len(caches) - len(todo), len(groups) * len(caches))
    for g, s in progress_iter(todo, len(todo), label, "retrain"):
        weights = torch.ones(problem.n, dtype=torch.float64)
        weights[torch.as_tensor(groups[g])] = 0.0
        start = theta_full[s] if warm_start else theta_init[s]
        theta = fit(problem, start, settings, weights)
        caches[s].put(group_key(groups[g]), float(problem.target(theta)))
    out = np.empty((len(groups), len(caches)))
    for s, cache in enumerate(caches):
        f_full = float(problem.target(theta_full[s]))
        for g, idx in enumerate(groups):
            out[g, s] = cache.values[group_key(idx)] - f_full
    return out
