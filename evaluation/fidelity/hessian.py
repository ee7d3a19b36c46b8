"""Inverse-Hessian-vector products of the training objective and target HVPs at θ*.

* ``exact``: the dense Hessian of L (from p Hessian-vector products, batched with ``torch.func``),
  eigendecomposed once; H⁻¹v is then a matrix product. For small models (p up to a few thousand).
* ``cg``: conjugate gradient (``scipy.sparse.linalg.cg``) on Hessian-vector products, for larger ones.

Damping δ is a setting: (H + δI)⁻¹. At a non-convex model's (approximate) minimum H can have a few
slightly negative eigenvalues; in the exact method eigenvalues below the L2 weight λ are raised to λ
(the curvature of the never-removed regulariser, a lower bound whenever the data Hessian is PSD),
and how many were raised is reported.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, cg
from torch.func import vmap

from iaif.evaluation.fidelity.objective import Problem, hvp_of
from iaif.selection.estimators import Hvp

logger = logging.getLogger(__name__)

Method = Literal["auto", "exact", "cg"]


@dataclass
class Curvature:
    """Curvature operators at θ*: ``ihvp`` applies (H + δI)⁻¹, ``hvp_target`` applies H_f."""

    ihvp: Hvp
    hvp_target: Hvp
    method: str
    raised_eigenvalues: int = 0


def dense_hessian(fn: Callable[[torch.Tensor], torch.Tensor], theta: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """∇²fn(θ) as a [p, p] matrix, built from batches of ``chunk`` Hessian-vector products."""
    hvp = vmap(hvp_of(fn, theta))
    eye = torch.eye(theta.numel(), dtype=theta.dtype)
    h = torch.cat([hvp(eye[i : i + chunk]) for i in range(0, theta.numel(), chunk)])
    return 0.5 * (h + h.T)


def exact_curvature(problem: Problem, theta: torch.Tensor, damping: float, chunk: int = 64) -> Curvature:
    """Dense H, eigendecomposed; (H + δI)⁻¹ exactly (eigenvalues floored at the L2 weight)."""
    h = dense_hessian(problem.objective, theta, chunk)
    evals, evecs = torch.linalg.eigh(h)
    floor = max(problem.l2, 1e-12)
    raised = int((evals < floor * (1 - 1e-6)).sum())
    if raised:
        logger.info("raised %d of %d Hessian eigenvalues (min %.3g) to the L2 weight %.3g", raised, len(evals), float(evals.min()), floor)
    inv = 1.0 / (evals.clamp_min(floor) + damping)

    def ihvp(v: torch.Tensor) -> torch.Tensor:
        return evecs @ (inv * (evecs.T @ v)) if v.ndim == 1 else evecs @ (inv[:, None] * (evecs.T @ v))

    return Curvature(ihvp, hvp_of(problem.target, theta), "exact", raised)


def cg_curvature(problem: Problem, theta: torch.Tensor, damping: float, tol: float = 1e-10, maxiter: int = 1000) -> Curvature:
    """(H + δI)⁻¹ by conjugate gradient on Hessian-vector products (H must be PD after damping)."""
    hvp = hvp_of(problem.objective, theta)
    p = theta.numel()

    def matvec(v: np.ndarray) -> np.ndarray:
        t = torch.as_tensor(np.asarray(v).reshape(-1), dtype=theta.dtype)
        return (hvp(t) + damping * t).numpy()

    op = LinearOperator((p, p), matvec=matvec, dtype=np.float64)

    def ihvp(v: torch.Tensor) -> torch.Tensor:
        sol, info = cg(op, v.detach().numpy(), rtol=tol, atol=0.0, maxiter=maxiter)
        if info != 0:
            logger.warning("conjugate gradient did not converge (info=%d); raise damping or cg_maxiter", info)
        return torch.as_tensor(sol, dtype=theta.dtype)

    return Curvature(ihvp, hvp_of(problem.target, theta), "cg")


def build_curvature(
    problem: Problem, theta: torch.Tensor, method: Method, damping: float, exact_max_params: int, cg_tol: float, cg_maxiter: int
) -> Curvature:
    """``auto`` takes ``exact`` up to ``exact_max_params`` parameters, ``cg`` above."""
    if method == "auto":
        method = "exact" if theta.numel() <= exact_max_params else "cg"
    if method == "exact":
        return exact_curvature(problem, theta, damping)
    if method == "cg":
        return cg_curvature(problem, theta, damping, cg_tol, cg_maxiter)
    raise ValueError(f"unknown IHVP method '{method}'; known: auto, exact, cg")
