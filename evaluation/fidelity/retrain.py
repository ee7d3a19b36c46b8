"""Training to the optimum and batched leave-group-out retraining, with an on-disk cache.

Ground truth for a group S: Δf(S) = f(θ_{-S}) − f(θ*), where θ_{-S} minimises L_w (w = 0 on S's
terms, 1 elsewhere; the L2 term is never removed), in float64.

* Full training: full-batch L-BFGS (strong-Wolfe line search), ``fit``; for θ* then, while max |∇L|
  is above the tolerance, ``polish``: trust-region Newton steps on the exact Hessian (Steihaug's
  conjugate gradient on Hessian-vector products, preconditioned by the damped Gauss-Newton matrix
  G(θ), trust region in G's norm), which handles the indefinite Hessians of non-convex models.
* Leave-group-out retraining, ``batched_retrain``: all groups of a batch at once, one model per
  group, as one vmapped computation (``torch.func.vmap`` over per-group weight vectors and
  parameter rows). Each group runs preconditioned L-BFGS warm-started from θ*: the two-loop
  recursion starts from the full-data curvature (H(θ*) + δI)⁻¹, so a small removal converges like
  Newton's method and the L-BFGS memory corrects the directions the removal changed most.
  Backtracking (Armijo) per group; a group stops when its max |∇L_w| ≤ ``tol_grad``.
* The Newton finish, ``finish_unconverged``: a group L-BFGS leaves above the tolerance after
  ``max_iter`` gets up to ``finish_steps`` trust-region Newton steps (``polish``, one group at a
  time, in the fixed metric of the full-data curvature). Groups still above it are marked not
  converged (reported, never used in correlations).
* Non-convex models: Δf is averaged over seeds (``benchmark``); per seed, retraining starts from
  that seed's θ* (the local optimum the influence expansion describes) or from its θ₀.

The cache is one JSON file per (fingerprint, seed): group key → {f, converged, grad_max, iterations,
newton}; the trained θ* is kept next to it. The fingerprint covers everything the values depend on
(pair spec, data, seed, fit and retrain settings, curvature settings, torch version).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.func import grad_and_value, vmap

from iaif.common.atomic import write_json
from iaif.common.progress import progress
from iaif.evaluation.fidelity.hessian import Curvature, dense_ggn, row_preconditioner
from iaif.evaluation.fidelity.objective import Problem, hvp_of

logger = logging.getLogger(__name__)

RETRAIN_SOLVER = "lbfgs from the exact Hessian at theta* where dense, then trust-region Newton"
"""Part of the cache fingerprint: how a retraining is computed, beyond its settings."""

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
    polish_steps: int = 100
    """θ* only: trust-region Newton steps after L-BFGS while max |grad| > tol_grad (0 = off)"""
    polish_cg: int = 200
    """conjugate-gradient iterations (Hessian-vector products) per Newton step"""
    continuation_l2: float = 0.0
    """θ* only: train first at this L2 weight from θ₀ and start the fit at the problem's L2 from that
    solution (0 or equal to the problem's L2 = off); for a model that collapses to the trivial optimum
    when trained at a strong L2 from θ₀"""


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
    finish_steps: int = 20
    """groups still above tol_grad after max_iter get up to this many trust-region Newton steps (0 = off)"""
    finish_cg: int = 200
    """conjugate-gradient iterations (Hessian-vector products) per Newton step of the finish"""


def fit(problem: Problem, theta0: torch.Tensor, settings: FitSettings, weights: torch.Tensor | None = None,
        warn: bool = True) -> torch.Tensor:
    """Minimise L_w from θ₀; returns θ (with ``warn``, a warning is logged when the tolerance is not reached)."""
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
    if warn and gmax > 100 * settings.tol_grad:
        logger.warning("L-BFGS stopped with max |grad| %.2e (tolerance %.1e); raise fit.max_iter", gmax, settings.tol_grad)
    return theta.detach()


def train_full(problem: Problem, theta0: torch.Tensor, settings: FitSettings) -> torch.Tensor:
    """θ*: ``fit`` from θ₀, then ``polish`` while max |∇L| > tol_grad; with ``continuation_l2`` set, θ₀
    is first replaced by the θ* of the same problem at that L2 weight (a continuation in λ)."""
    if settings.continuation_l2 and settings.continuation_l2 != problem.l2:
        theta0 = train_full(replace(problem, l2=settings.continuation_l2), theta0, replace(settings, continuation_l2=0.0))
    theta = fit(problem, theta0, settings, warn=not settings.polish_steps)  # with a polish, its end state is what counts
    grad = torch.func.grad(problem.objective)
    if settings.polish_steps and float(grad(theta).abs().max()) > settings.tol_grad:
        theta = polish(problem, theta, settings.tol_grad, settings.polish_steps, settings.polish_cg)
        gmax = float(grad(theta).abs().max())
        if gmax > settings.tol_grad:
            logger.warning("polish stopped with max |grad| %.2e (tolerance %.1e); raise fit.polish_steps", gmax, settings.tol_grad)
    return theta


def polish(problem: Problem, theta: torch.Tensor, tol_grad: float, steps: int, cg_iters: int,
           weights: torch.Tensor | None = None, metric: torch.Tensor | None = None) -> torch.Tensor:
    """Continue minimising L_w from θ by up to ``steps`` trust-region Newton steps until max |∇L_w| ≤ tol_grad.

    Each step solves the Newton system of the exact Hessian (Hessian-vector products) by Steihaug's
    truncated conjugate gradient (at most ``cg_iters`` products), preconditioned by a positive
    definite metric M and with the trust region ‖s‖_M ≤ Δ in its norm: CG stops at the boundary or
    along negative curvature, so an indefinite Hessian (non-convex models) is handled; near a minimum
    the steps are Newton's. M is ``metric`` when given (fixed), else the dense damped Gauss-Newton
    matrix G(θ), rebuilt at every step."""
    def objective(t: torch.Tensor) -> torch.Tensor:
        return problem.objective(t, weights)

    value_grad = grad_and_value(objective)
    g, f = value_grad(theta)
    radius = 0.0  # set at the first step: the M-norm of the step M⁻¹g
    fixed = (metric, torch.linalg.cholesky(metric)) if metric is not None else None
    for _ in range(steps):
        if float(g.abs().max()) <= tol_grad:
            return theta
        if fixed is None:
            step_metric = dense_ggn(problem, theta)
            step_factor = torch.linalg.cholesky(step_metric)
        else:
            step_metric, step_factor = fixed
        if radius == 0.0:
            radius = float(g @ torch.cholesky_solve(g[:, None], step_factor)[:, 0]) ** 0.5
        hvp = hvp_of(objective, theta)
        while True:
            step, model_drop, on_boundary = _steihaug(g, hvp, step_metric, step_factor, radius, cg_iters)
            g_new, f_new = value_grad(theta + step)
            actual = float(f - f_new)
            slack = 1e-14 * max(abs(float(f)), 1.0)  # round-off of L: a step predicted to change L by less is kept
            ratio = (actual + slack) / (model_drop + slack)
            length = float(step @ step_metric @ step) ** 0.5
            if ratio < 0.25:
                radius = 0.25 * length
            elif ratio > 0.75 and on_boundary:
                radius = 2.0 * length
            if ratio > 0.1:
                break
            logger.debug("polish: step rejected (drop %.3g predicted %.3g, max |grad| %.2e -> %.2e), radius %.2e",
                         actual, model_drop, float(g.abs().max()), float(g_new.abs().max()), radius)
            if radius < 1e-14:
                logger.debug("polish: trust region collapsed at max |grad| %.2e", float(g.abs().max()))
                return theta
        theta, g, f = theta + step, g_new, f_new
        logger.debug("polish: L %.12g, max |grad| %.2e, ratio %.2f, radius %.2e", float(f), float(g.abs().max()), ratio, radius)
    return theta


def _steihaug(g: torch.Tensor, hvp: Callable[[torch.Tensor], torch.Tensor], metric: torch.Tensor, factor: torch.Tensor,
              radius: float, max_iter: int) -> tuple[torch.Tensor, float, bool]:
    """Approximate argmin of gᵀs + ½sᵀHs over ‖s‖_M ≤ radius (M = factor factorᵀ, also the preconditioner).

    Returns the step, the model decrease −(gᵀs + ½sᵀHs) and whether the step ends on the boundary."""
    def boundary(z: torch.Tensor, d: torch.Tensor) -> float:  # τ ≥ 0 with ‖z + τd‖_M = radius
        md = metric @ d
        a, b, c = float(d @ md), float(z @ md), float(z @ metric @ z) - radius**2
        return (-b + (b * b - a * c) ** 0.5) / a

    def drop(s: torch.Tensor, hs: torch.Tensor) -> float:
        return -float(g @ s + 0.5 * s @ hs)

    z, hz, r = torch.zeros_like(g), torch.zeros_like(g), g.clone()
    y = torch.cholesky_solve(r[:, None], factor)[:, 0]
    d, ry = -y, float(r @ y)
    tol = min(0.5, float(g.norm()) ** 0.5) * float(g.norm())  # inexact Newton: superlinear near the minimum
    for _ in range(max_iter):
        hd = hvp(d)
        curvature = float(d @ hd)
        alpha = ry / curvature if curvature > 0 else float("inf")
        z_next = z + alpha * d if curvature > 0 else z
        if curvature <= 0 or float(z_next @ metric @ z_next) >= radius**2:
            tau = boundary(z, d)
            return z + tau * d, drop(z + tau * d, hz + tau * hd), True
        z, hz, r = z_next, hz + alpha * hd, r + alpha * hd
        if float(r.norm()) <= tol:
            break
        y = torch.cholesky_solve(r[:, None], factor)[:, 0]
        ry_next = float(r @ y)
        d, ry = -y + (ry_next / ry) * d, ry_next
    return z, drop(z, hz), False


@dataclass
class RetrainOutcome:
    """Per group: the retrained parameters and how the solver ended."""

    theta: torch.Tensor
    """[B, p]"""
    converged: np.ndarray
    grad_max: np.ndarray
    iterations: np.ndarray
    """L-BFGS iterations"""
    newton: np.ndarray
    """whether the Newton finish ran (L-BFGS left the group above the tolerance)"""


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
    return RetrainOutcome(theta, (gmax <= settings.tol_grad).numpy(), gmax.numpy(), iters.numpy(), np.zeros(b, dtype=bool))


def finish_unconverged(problem: Problem, outcome: RetrainOutcome, weights: torch.Tensor, metric: torch.Tensor | None,
                       settings: RetrainSettings) -> RetrainOutcome:
    """Trust-region Newton steps (``polish``, fixed ``metric``) for every group L-BFGS left above the
    tolerance; without a dense metric (or with ``finish_steps`` 0) the outcome is returned as it is.

    L-BFGS from the θ* curvature stalls where a removal moves a non-convex model into a region of
    different (even negative) curvature; Newton steps on exact Hessian-vector products take the groups
    that are near a minimum of their own the rest of the way."""
    todo = np.flatnonzero(~outcome.converged)
    if metric is None or settings.finish_steps == 0 or not len(todo):
        return outcome
    grad = torch.func.grad(problem.objective)
    theta, converged, grad_max, newton = outcome.theta.clone(), outcome.converged.copy(), outcome.grad_max.copy(), outcome.newton.copy()
    for row in todo:
        theta[row] = polish(problem, theta[row], settings.tol_grad, settings.finish_steps, settings.finish_cg, weights[row], metric)
        grad_max[row] = float(grad(theta[row], weights[row]).abs().max())
        converged[row], newton[row] = grad_max[row] <= settings.tol_grad, True
    return RetrainOutcome(theta, converged, grad_max, outcome.iterations, newton)


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
    """JSON map group key → {f, converged, grad_max, iterations, newton} for one pair and seed, written atomically."""

    def __init__(self, folder: Path, fingerprint: str, seed: int):
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"{fingerprint}-seed{seed}.json"
        self.theta_path = folder / f"{fingerprint}-seed{seed}-theta.pt"
        self.values: dict[str, dict] = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def put_many(self, entries: dict[str, dict]) -> None:
        self.values.update(entries)
        write_json(self.path, self.values)

    def full_model(self, problem: Problem, theta0: torch.Tensor, settings: FitSettings) -> torch.Tensor:
        """θ* from the cache, else trained from θ₀ (``train_full``) and stored."""
        if self.theta_path.is_file():
            return torch.load(self.theta_path, weights_only=True)
        theta = train_full(problem, theta0, settings)
        torch.save(theta, self.theta_path)
        return theta


@dataclass
class LeaveGroupOut:
    """[G, seeds] truth Δf = f(θ_{-S}) − f(θ*) with the solver's end state per group and seed."""

    delta: np.ndarray
    converged: np.ndarray
    grad_max: np.ndarray
    iterations: np.ndarray
    newton: np.ndarray


def leave_group_out(
    problem: Problem,
    groups: Sequence[np.ndarray],
    starts: Sequence[torch.Tensor],
    theta_full: Sequence[torch.Tensor],
    curvatures: Sequence[Curvature],
    caches: Sequence[RetrainCache],
    settings: RetrainSettings,
    label: str = "retrain",
) -> LeaveGroupOut:
    """Retrain every group and seed missing from the caches (batched L-BFGS from ``curvatures[seed]``'s
    inverse, then the Newton finish in its ``matrix``); read everything back."""
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
                res = batched_retrain(problem, starts[s], weights, row_preconditioner(curvatures[s]), settings)
                res = finish_unconverged(problem, res, weights, curvatures[s].matrix, settings)
                cache.put_many({group_key(groups[g]): {"f": float(problem.target(res.theta[row])),
                                                        "converged": bool(res.converged[row]),
                                                        "grad_max": float(res.grad_max[row]),
                                                        "iterations": int(res.iterations[row]),
                                                        "newton": bool(res.newton[row])}
                                for row, g in enumerate(chunk)})
                bar.update(len(chunk))
    shape = (len(groups), len(caches))
    out = LeaveGroupOut(np.empty(shape), np.empty(shape, dtype=bool), np.empty(shape), np.empty(shape, dtype=np.int64),
                        np.empty(shape, dtype=bool))
    for s, cache in enumerate(caches):
        f_full = float(problem.target(theta_full[s]))
        for g, idx in enumerate(groups):
            entry = cache.values[group_key(idx)]
            out.delta[g, s] = entry["f"] - f_full
            out.converged[g, s], out.grad_max[g, s], out.iterations[g, s] = entry["converged"], entry["grad_max"], entry["iterations"]
            out.newton[g, s] = entry["newton"]
    n_bad = int((~out.converged).sum())
    if n_bad:
        logger.warning("%s: %d of %d retrainings did not reach max |grad| <= %.1e", label, n_bad, total, settings.tol_grad)
    return out
