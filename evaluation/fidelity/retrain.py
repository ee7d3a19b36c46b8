"""Training to the optimum and batched leave-group-out retraining, with an on-disk cache.

Ground truth for a group S: Δf(S) = f(θ_{-S}) − f(θ*), where θ_{-S} minimises L_w (w = 0 on S's
terms, 1 elsewhere; the L2 term is never removed), in float64.

* Full training: full-batch L-BFGS (strong-Wolfe line search), ``fit``; for θ* then, while max |∇L|
  is above the tolerance, ``polish``: rounds of the batched solver below (one row, all weights 1)
  preconditioned by the damped Gauss-Newton matrix G(θ) rebuilt at the start of every round — a
  Gauss-Newton-type method whose L-BFGS memory supplies the curvature G misses.
* Leave-group-out retraining, ``batched_retrain``: all groups of a batch at once, one model per
  group, as one vmapped computation (``torch.func.vmap`` over per-group weight vectors and
  parameter rows). Each group runs preconditioned L-BFGS warm-started from θ*: the two-loop
  recursion starts from the full-data curvature (H(θ*) + δI)⁻¹, so a small removal converges like
  Newton's method and the L-BFGS memory corrects the directions the removal changed most.
  Backtracking (Armijo) per group; a group stops when its max |∇L_w| ≤ ``tol_grad``. Groups that do
  not reach it within ``max_iter`` are marked not converged (reported, never used in correlations).
* Non-convex models: Δf is averaged over seeds (``benchmark``); per seed, retraining starts from
  that seed's θ* (the local optimum the influence expansion describes) or from its θ₀.

The cache is one JSON file per (fingerprint, seed): group key → {f, converged, grad_max, iterations};
the trained θ* is kept next to it. The fingerprint covers everything the values depend on (pair
spec, data, seed, fit and retrain settings, curvature settings, torch version).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.func import grad_and_value, vmap

from iaif.common.atomic import write_json
from iaif.common.progress import progress
from iaif.evaluation.fidelity.hessian import exact_curvature, row_preconditioner
from iaif.evaluation.fidelity.objective import Problem

logger = logging.getLogger(__name__)

Precondition = Callable[[torch.Tensor], torch.Tensor]
"""Applies an approximate inverse Hessian to the rows of a [B, p] matrix."""


@dataclass(frozen=True)
class FitSettings:
    """L-BFGS settings of the full training."""

    max_iter: int = 1000
    """iteration cap per (re)training"""
    tol_grad: float = 1e-8
    """stop when the largest gradient entry falls below this"""
    history: int = 50
    """L-BFGS memory"""
    polish_rounds: int = 20
    """θ* only: Gauss-Newton-preconditioned rounds after L-BFGS while max |grad| > tol_grad (0 = off)"""
    polish_iter: int = 30
    """iterations per polish round (G is rebuilt at θ between rounds)"""


@dataclass(frozen=True)
class RetrainSettings:
    """Batched leave-group-out retraining."""

    tol_grad: float = 1e-8
    """a group has converged when max |∇L_w(θ)| ≤ this"""
    max_iter: int = 300
    """iterations per group before it is declared not converged"""
    history: int = 30
    """L-BFGS memory per group"""
    batch: int = 16
    """groups retrained together in one vmapped computation"""


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


def polish(problem: Problem, theta: torch.Tensor, settings: FitSettings, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Continue minimising L_w from θ by GGN-preconditioned L-BFGS rounds until max |∇L_w| ≤ tol_grad."""
    rows = (torch.ones(problem.n, dtype=theta.dtype) if weights is None else weights)[None]
    solver = RetrainSettings(tol_grad=settings.tol_grad, max_iter=settings.polish_iter, history=settings.history)
    gmax = float("inf")
    for _ in range(settings.polish_rounds):
        curvature = exact_curvature(problem, theta, 0.0, kind="ggn")
        out = batched_retrain(problem, theta, rows, row_preconditioner(curvature), solver)
        theta, gmax = out.theta[0], float(out.grad_max[0])
        if out.converged[0]:
            return theta
    logger.warning("polish stopped with max |grad| %.2e (tolerance %.1e); raise fit.polish_rounds", gmax, settings.tol_grad)
    return theta


@dataclass
class RetrainOutcome:
    """Per group: the retrained parameters and how the solver ended."""

    theta: torch.Tensor
    """[B, p]"""
    converged: np.ndarray
    grad_max: np.ndarray
    iterations: np.ndarray


def batched_retrain(problem: Problem, start: torch.Tensor, weights: torch.Tensor, precondition: Precondition,
                    settings: RetrainSettings) -> RetrainOutcome:
    """Minimise L_{w_b} for every row w_b of ``weights`` [B, n] at once, each from ``start`` [p]."""
    value_grad = vmap(grad_and_value(problem.objective))
    b, p, m = len(weights), start.numel(), settings.history
    theta = start.detach().expand(b, p).clone()
    g, f = value_grad(theta, weights)
    s_hist, y_hist = torch.zeros(b, m, p, dtype=theta.dtype), torch.zeros(b, m, p, dtype=theta.dtype)
    rho = torch.zeros(b, m, dtype=theta.dtype)  # 0 marks an empty or skipped memory slot
    step = torch.ones(b, dtype=theta.dtype)
    direction = torch.zeros(b, p, dtype=theta.dtype)
    fresh = torch.ones(b, dtype=torch.bool)  # needs a new direction
    iters = torch.zeros(b, dtype=torch.long)
    stalled = torch.zeros(b, dtype=torch.bool)
    for _ in range(settings.max_iter):
        active = (g.abs().amax(1) > settings.tol_grad) & ~stalled
        if not active.any():
            break
        idx = active.nonzero().squeeze(1)
        new = idx[fresh[idx]]
        if len(new):
            direction[new] = -_two_loop(g[new], s_hist[new], y_hist[new], rho[new], precondition)
            step[new] = 1.0
        d, a = direction[idx], step[idx]
        cand = theta[idx] + a[:, None] * d
        g_new, f_new = value_grad(cand, weights[idx])
        slope = (g[idx] * d).sum(1)
        tiny = 1e-13 * f[idx].abs()  # round-off allowance near the optimum
        ok = torch.isfinite(f_new) & (f_new <= f[idx] + 1e-4 * a * slope + tiny) & (slope < 0)
        s, y = cand - theta[idx], g_new - g[idx]
        sy = (s * y).sum(1)
        keep = ok & (sy > 1e-12 * (s * s).sum(1).sqrt() * (y * y).sum(1).sqrt())
        acc = idx[ok]
        if ok.any():  # shift every accepted group's memory; skipped pairs get rho = 0 (no-ops)
            s_hist[acc] = torch.cat([s_hist[acc, 1:], s[ok][:, None]], 1)
            y_hist[acc] = torch.cat([y_hist[acc, 1:], y[ok][:, None]], 1)
            rho[acc] = torch.cat([rho[acc, 1:], torch.where(keep[ok], 1.0 / sy[ok], 0.0)[:, None]], 1)
            theta[acc], g[acc], f[acc] = cand[ok], g_new[ok], f_new[ok]
        fresh[idx] = ok
        step[idx[~ok]] *= 0.5
        stalled[idx[~ok]] = step[idx[~ok]] < 1e-10
        iters[idx] += 1
    gmax = g.abs().amax(1)
    return RetrainOutcome(theta, (gmax <= settings.tol_grad).numpy(), gmax.numpy(), iters.numpy())


def _two_loop(g: torch.Tensor, s: torch.Tensor, y: torch.Tensor, rho: torch.Tensor, precondition: Precondition) -> torch.Tensor:
    """Batched L-BFGS two-loop recursion: ≈ H_b⁻¹ g_b, with ``precondition`` as the initial inverse."""
    q = g.clone()
    alphas = []
    for i in reversed(range(s.shape[1])):
        a = rho[:, i] * (s[:, i] * q).sum(1)
        q -= a[:, None] * y[:, i]
        alphas.append(a)
    r = precondition(q)
    for i, a in zip(range(s.shape[1]), reversed(alphas)):
        b = rho[:, i] * (y[:, i] * r).sum(1)
        r += (a - b)[:, None] * s[:, i]
    return r


def group_key(index: np.ndarray) -> str:
    """Stable key of a group: hash of its sorted training indices."""
    return hashlib.sha1(np.sort(np.asarray(index, dtype=np.int64)).tobytes()).hexdigest()[:16]


class RetrainCache:
    """JSON map group key → {f, converged, grad_max, iterations} for one pair and seed, written atomically."""

    def __init__(self, folder: Path, fingerprint: str, seed: int):
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"{fingerprint}-seed{seed}.json"
        self.theta_path = folder / f"{fingerprint}-seed{seed}-theta.pt"
        self.values: dict[str, dict] = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def put_many(self, entries: dict[str, dict]) -> None:
        self.values.update(entries)
        write_json(self.path, self.values)

    def full_model(self, problem: Problem, theta0: torch.Tensor, settings: FitSettings) -> torch.Tensor:
        """θ* from the cache, else trained from θ₀ and stored."""
        if self.theta_path.is_file():
            return torch.load(self.theta_path, weights_only=True)
        theta = fit(problem, theta0, settings)
        if settings.polish_rounds and float(torch.func.grad(problem.objective)(theta).abs().max()) > settings.tol_grad:
            theta = polish(problem, theta, settings)
        torch.save(theta, self.theta_path)
        return theta


@dataclass
class LeaveGroupOut:
    """[G, seeds] truth Δf = f(θ_{-S}) − f(θ*) with the solver's end state per group and seed."""

    delta: np.ndarray
    converged: np.ndarray
    grad_max: np.ndarray
    iterations: np.ndarray


def leave_group_out(
    problem: Problem,
    groups: Sequence[np.ndarray],
    starts: Sequence[torch.Tensor],
    theta_full: Sequence[torch.Tensor],
    preconditioners: Sequence[Precondition],
    caches: Sequence[RetrainCache],
    settings: RetrainSettings,
    label: str = "retrain",
) -> LeaveGroupOut:
    """Retrain (batched) every group and seed missing from the caches; read everything back."""
    total = len(groups) * len(caches)
    with progress(total=total, desc=label) as bar:
        for s, cache in enumerate(caches):
            todo = [g for g, idx in enumerate(groups) if group_key(idx) not in cache.values]
            bar.update(len(groups) - len(todo))
            for lo in range(0, len(todo), settings.batch):
                chunk = todo[lo : lo + settings.batch]
                weights = torch.ones(len(chunk), problem.n, dtype=torch.float64)
                for row, g in enumerate(chunk):
                    weights[row, torch.as_tensor(groups[g])] = 0.0
                res = batched_retrain(problem, starts[s], weights, preconditioners[s], settings)
                cache.put_many({group_key(groups[g]): {"f": float(problem.target(res.theta[row])),
                                                        "converged": bool(res.converged[row]),
                                                        "grad_max": float(res.grad_max[row]),
                                                        "iterations": int(res.iterations[row])}
                                for row, g in enumerate(chunk)})
                bar.update(len(chunk))
    shape = (len(groups), len(caches))
    out = LeaveGroupOut(np.empty(shape), np.empty(shape, dtype=bool), np.empty(shape), np.empty(shape, dtype=np.int64))
    for s, cache in enumerate(caches):
        f_full = float(problem.target(theta_full[s]))
        for g, idx in enumerate(groups):
            entry = cache.values[group_key(idx)]
            out.delta[g, s] = entry["f"] - f_full
            out.converged[g, s], out.grad_max[g, s], out.iterations[g, s] = entry["converged"], entry["grad_max"], entry["iterations"]
    n_bad = int((~out.converged).sum())
    if n_bad:
        logger.warning("%s: %d of %d retrainings did not reach max |grad| <= %.1e", label, n_bad, total, settings.tol_grad)
    return out
