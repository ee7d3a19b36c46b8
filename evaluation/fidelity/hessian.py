"""Inverse-Hessian-vector products of the training objective and target HVPs at θ*.

* ``exact``: the dense Hessian of L (from p Hessian-vector products, batched with ``torch.func``),
  eigendecomposed once; H⁻¹v is then a matrix product. For small models (p up to a few thousand).
* ``cg``: conjugate gradient (``scipy.sparse.linalg.cg``) on Hessian-vector products, for larger ones.

The curvature of the training objective is either the Hessian (``hessian``) or the damped
generalised Gauss-Newton matrix (``ggn``): G = (1/n) Σ_i J_iᵀ Λ_i J_i + λI, with J_i the Jacobian of
example i's outputs and Λ_i the Hessian of its loss in the outputs (PSD for every loss here), so
G + δI is positive definite even where the network's Hessian is not. The dense G is built from
per-example Jacobians (C backward passes per example, far cheaper than p Hessian-vector products);
``cg`` uses matrix-free GGN-vector products (J v by forward mode, Jᵀ(Λ J v) by reverse mode).

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
from torch.func import hessian, jacrev, jvp, vjp, vmap

from iaif.evaluation.fidelity.objective import Problem, example_losses, hvp_of
from iaif.selection.estimators import Hvp

logger = logging.getLogger(__name__)

Method = Literal["auto", "exact", "cg"]
CurvatureKind = Literal["hessian", "ggn"]


@dataclass
class Curvature:
    """Curvature operators at θ*: ``ihvp`` applies (H + δI)⁻¹, ``hvp_target`` applies H_f."""

    ihvp: Hvp
    hvp_target: Hvp
    method: str
    raised_eigenvalues: int = 0
    matrix: torch.Tensor | None = None
    """H + δI as ``ihvp`` inverts it (raised eigenvalues included), dense; None where it is not formed (cg)"""


def row_preconditioner(curvature: Curvature) -> Callable[[torch.Tensor], torch.Tensor]:
    """Rows [B, p] ↦ rows of (H + δI)⁻¹ (the initial inverse Hessian of the batched L-BFGS)."""
    return lambda rows: curvature.ihvp(rows.T).T


def retraining_curvature(problem: Problem, theta: torch.Tensor, estimators: Curvature, damping: float,
                         exact_max_params: int) -> Curvature:
    """The curvature the leave-group-out retraining starts from: the exact Hessian of L at θ* (dense,
    eigenvalues floored at λ) wherever it is affordable, even where the estimators use the GGN.

    Retraining converges like Newton's method only from the true curvature: on the CNN at L2 0.01 the
    data Hessian has eigenvalues below the GGN's floor, and from the GGN the same groups need 4-5×
    the iterations. Above ``exact_max_params`` (or when the estimators already use it) this is
    ``estimators``."""
    if estimators.method == "exact hessian" or theta.numel() > exact_max_params:
        return estimators
    return exact_curvature(problem, theta, damping, kind="hessian")


def dense_hessian(fn: Callable[[torch.Tensor], torch.Tensor], theta: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """∇²fn(θ) as a [p, p] matrix, built from batches of ``chunk`` Hessian-vector products."""
    hvp = vmap(hvp_of(fn, theta))
    eye = torch.eye(theta.numel(), dtype=theta.dtype)
    h = torch.cat([hvp(eye[i : i + chunk]) for i in range(0, theta.numel(), chunk)])
    return 0.5 * (h + h.T)


def exact_curvature(problem: Problem, theta: torch.Tensor, damping: float, chunk: int = 64,
                    kind: CurvatureKind = "hessian") -> Curvature:
    """Dense H (or G), eigendecomposed; (H + δI)⁻¹ exactly (eigenvalues floored at the L2 weight)."""
    h = dense_hessian(problem.objective, theta, chunk) if kind == "hessian" else dense_ggn(problem, theta)
    evals, evecs = torch.linalg.eigh(h)
    floor = max(problem.l2, 1e-12)
    raised = int((evals < floor * (1 - 1e-6)).sum())
    if raised:
        logger.info("raised %d of %d Hessian eigenvalues (min %.3g) to the L2 weight %.3g", raised, len(evals), float(evals.min()), floor)
    inv = 1.0 / (evals.clamp_min(floor) + damping)
    # the inverse as one matrix: each product is then one pass over p² entries, not two (the batched
    # retraining applies it to every group's rows at every iteration)
    inverse = (evecs * inv) @ evecs.T
    inverse = 0.5 * (inverse + inverse.T)
    low = evecs[:, :raised]  # the raised eigenvalues are the smallest: a low-rank correction of h
    matrix = h + damping * torch.eye(len(evals), dtype=h.dtype) + (low * (floor - evals[:raised])) @ low.T
    del h, evecs

    def ihvp(v: torch.Tensor) -> torch.Tensor:
        return inverse @ v

    return Curvature(ihvp, hvp_of(problem.target, theta), f"exact {kind}", raised, 0.5 * (matrix + matrix.T))


def _output_hessians(problem: Problem, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[N, C, C] Hessians Λ_i of each example's loss in its outputs."""
    def loss(o: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return example_losses(problem.data.task, o[None], yi[None])[0]

    return vmap(hessian(loss))(outputs, y)


def dense_ggn(problem: Problem, theta: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """G = (1/n) Σ_i J_iᵀ Λ_i J_i + λI as a [p, p] matrix, from per-example Jacobians in chunks."""
    def out(t: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
        return problem.model(t, xi[None])[0]

    jac = vmap(jacrev(out), in_dims=(None, 0))
    x, y = problem.data.x_train, problem.data.y_train
    g = torch.zeros(theta.numel(), theta.numel(), dtype=theta.dtype)
    for i in range(0, problem.n, chunk):
        j = jac(theta, x[i : i + chunk])  # [B, C, p]
        lam = _output_hessians(problem, problem.model(theta, x[i : i + chunk]), y[i : i + chunk])
        g += torch.einsum("bcp,bcd->bdp", j, lam).reshape(-1, theta.numel()).T @ j.reshape(-1, theta.numel())
    g = g / problem.n + problem.l2 * torch.eye(theta.numel(), dtype=theta.dtype)
    return 0.5 * (g + g.T)


def ggn_vp(problem: Problem, theta: torch.Tensor) -> Hvp:
    """v ↦ G v without forming G: J v (forward mode), Λ (J v), Jᵀ(Λ J v) (reverse mode), + λ v."""
    x, y = problem.data.x_train, problem.data.y_train

    def outputs(t: torch.Tensor) -> torch.Tensor:
        return problem.model(t, x)

    pulled = vjp(outputs, theta)
    out, pull = pulled[0], pulled[1]
    lam = _output_hessians(problem, out.detach(), y)

    def gv(v: torch.Tensor) -> torch.Tensor:
        jv = jvp(outputs, (theta,), (v,))[1]
        return pull(torch.einsum("bcd,bd->bc", lam, jv))[0] / problem.n + problem.l2 * v

    return gv


def cg_curvature(problem: Problem, theta: torch.Tensor, damping: float, tol: float = 1e-10, maxiter: int = 1000,
                 kind: CurvatureKind = "hessian") -> Curvature:
    """(H + δI)⁻¹ by conjugate gradient on Hessian- (or GGN-) vector products (PD after damping).

    A [p, B] argument is solved column by column."""
    hvp = hvp_of(problem.objective, theta) if kind == "hessian" else ggn_vp(problem, theta)
    p = theta.numel()

    def matvec(v: np.ndarray) -> np.ndarray:
        t = torch.as_tensor(np.asarray(v).reshape(-1), dtype=theta.dtype)
        return (hvp(t) + damping * t).numpy()

    op = LinearOperator((p, p), matvec=matvec, dtype=np.float64)

    def ihvp(v: torch.Tensor) -> torch.Tensor:
        if v.ndim == 2:
            return torch.stack([ihvp(col) for col in v.T], 1)
        sol, info = cg(op, v.detach().numpy(), rtol=tol, atol=0.0, maxiter=maxiter)
        if info != 0:
            logger.warning("conjugate gradient did not converge (info=%d); raise damping or cg_maxiter", info)
        return torch.as_tensor(sol, dtype=theta.dtype)

    return Curvature(ihvp, hvp_of(problem.target, theta), f"cg {kind}")


def build_curvature(
    problem: Problem, theta: torch.Tensor, method: Method, damping: float, exact_max_params: int, cg_tol: float, cg_maxiter: int,
    kind: CurvatureKind = "hessian",
) -> Curvature:
    """``auto`` takes ``exact`` up to ``exact_max_params`` parameters, ``cg`` above."""
    if kind not in ("hessian", "ggn"):
        raise ValueError(f"unknown curvature '{kind}'; known: hessian, ggn")
    if method == "auto":
        method = "exact" if theta.numel() <= exact_max_params else "cg"
    if method == "exact":
        return exact_curvature(problem, theta, damping, kind=kind)
    if method == "cg":
        return cg_curvature(problem, theta, damping, cg_tol, cg_maxiter, kind)
    raise ValueError(f"unknown IHVP method '{method}'; known: auto, exact, cg")
