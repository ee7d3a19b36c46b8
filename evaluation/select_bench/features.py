"""Selection features from the base model (METHOD.md §1-§2), with the fidelity benchmark's maths.

At the base model θ (trained on the seed set, n examples):

* pool displacements u_a = (1/n)(H + δI)⁻¹ g_a with the exact training Hessian H
  (``iaif.evaluation.fidelity.hessian.exact_curvature``);
* per target (its validation part only, m examples): the influence matrix Φ with φ_{a,t} = g_tᵀu_a,
  the scores s_a = mean_t φ_{a,t} = ∇fᵀu_a, and the exact-curvature features ψ_a = Lᵀu_a with
  H_f = L Lᵀ, so κ(a, b) = u_aᵀH_f u_b = ψ_a·ψ_b (``scale = 1`` in ``iaif.selection.objective``).
  H_f is the Hessian of the target loss when it is positive semi-definite (always for logistic
  regression), else its Gauss-Newton part (the MLP's Hessian can be indefinite).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import jacrev, vmap

from iaif.evaluation.fidelity.hessian import dense_hessian, exact_curvature
from iaif.evaluation.fidelity.models import FlatModel
from iaif.evaluation.fidelity.objective import Problem

logger = logging.getLogger(__name__)


@dataclass
class TargetFeatures:
    """Selection features of the pool for one target (float32, as the selector stores them)."""

    scores: torch.Tensor
    """s_a = ∇fᵀu_a, [N]"""
    phi: torch.Tensor
    """Φ, [N, m]: the empirical-Fisher curvature features"""
    psi: torch.Tensor
    """ψ = U L, [N, r]: the exact-H_f curvature features (κ = ψ_a·ψ_b)"""
    target_curvature: str
    """"hessian" or "gauss-newton" (when the target Hessian was indefinite)"""


def pool_displacements(problem: Problem, theta: torch.Tensor, x_pool: torch.Tensor, y_pool: torch.Tensor,
                       damping: float) -> tuple[torch.Tensor, int]:
    """U = [u_a] ([N, p], float64) with u_a = (1/n)(H + δI)⁻¹ g_a, and the number of Hessian
    eigenvalues raised to the L2 weight (non-convex models)."""
    curvature = exact_curvature(problem, theta, damping)
    grads = problem.per_example_grads(theta, x_pool, y_pool)
    return curvature.ihvp(grads.T).T / problem.n, curvature.raised_eigenvalues


def gauss_newton(model: FlatModel, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(1/m) Σ_t J_tᵀ(diag π_t − π_t π_tᵀ)J_t: the Gauss-Newton matrix of the mean cross-entropy."""
    jac = vmap(jacrev(lambda t, xi: model(t, xi[None])[0]), in_dims=(None, 0))(theta, x)  # [m, C, p]
    pi = F.softmax(model(theta, x), dim=-1)
    h_jac = pi[:, :, None] * jac - pi[:, :, None] * torch.einsum("mc,mcp->mp", pi, jac)[:, None, :]
    return torch.einsum("mcp,mcq->pq", jac, h_jac) / len(x)


def curvature_factor(h: torch.Tensor, rel_tol: float = 1e-10) -> torch.Tensor:
    """L ([p, r]) with L Lᵀ = h for a PSD matrix h, from its eigenvalues above rel_tol·max."""
    evals, evecs = torch.linalg.eigh(h)
    keep = evals > rel_tol * float(evals.max().clamp_min(0))
    return evecs[:, keep] * evals[keep].sqrt()


def target_features(problem: Problem, theta: torch.Tensor, u: torch.Tensor) -> TargetFeatures:
    """Φ, s and ψ of the pool for ``problem``'s target (its ``x_target``: the validation part)."""
    x_val, y_val = problem.data.x_target, problem.data.y_target
    g_val = problem.per_example_grads(theta, x_val, y_val)
    phi = u @ g_val.T
    h_f = dense_hessian(problem.target, theta)
    evals = torch.linalg.eigvalsh(h_f)
    kind = "hessian"
    if float(evals.min()) < -1e-8 * float(evals.abs().max()):
        logger.info("target Hessian indefinite (eigenvalues %.3g .. %.3g): Gauss-Newton H_f", float(evals.min()), float(evals.max()))
        h_f, kind = gauss_newton(problem.model, theta, x_val), "gauss-newton"
    psi = u @ curvature_factor(h_f)
    return TargetFeatures(phi.mean(dim=1).float(), phi.float(), psi.float(), kind)


def representation(model: FlatModel, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """L2-normalised representation for the similarity baseline: the last hidden layer of an MLP at θ
    (the RDS analogue), the flattened input for a model without hidden layer."""
    layers = model.module
    if isinstance(layers, torch.nn.Sequential) and sum(isinstance(m, torch.nn.Linear) for m in layers) > 1:
        body = layers[:-1]
        names = {n for n, _ in body.named_parameters()}
        params = {n: t.view(s) for n, t, s in zip(model.names, theta.split(model.sizes), model.shapes) if n in names}
        h = torch.func.functional_call(body, params, (x,))
    else:
        h = x.flatten(1)
    return F.normalize(h.float(), dim=1)
