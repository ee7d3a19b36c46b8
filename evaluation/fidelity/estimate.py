"""The four removal estimators of the benchmark, evaluated per group with ``iaif.selection.estimators``.

For a group S: g_S = Σ_{a∈S} ∇ℓ_a(θ*), u_S = (1/n)(H + δI)⁻¹ g_S (one IHVP), then
* ``first_order``: Σ_{a∈S} I(a) = ∇fᵀu_S;
* ``interaction_exact``: ∇fᵀu_S + ½ u_Sᵀ H_f u_S (one target HVP);
* ``interaction_ef``: the empirical-Fisher form from the group's rows of Φ (φ_{a,t} = g_tᵀu_a). It
  depends on those rows only through their sum C(S) = Σ_{a∈S} φ_a = G_target u_S, which is what is
  passed (one row), so no per-example IHVP is needed;
* ``basu``: ∇fᵀΔθ with Basu et al.'s second-order group displacement Δθ.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.func import grad

from iaif.common.progress import progress_iter
from iaif.evaluation.fidelity.hessian import Curvature
from iaif.evaluation.fidelity.objective import Problem, hvp_of
from iaif.selection.estimators import basu_group_displacement, ef_group_estimate, group_estimate

ESTIMATORS = ("first_order", "interaction_exact", "interaction_ef", "basu")


def estimate_groups(problem: Problem, theta: torch.Tensor, curvature: Curvature, groups: Sequence[np.ndarray],
                    label: str = "estimate") -> np.ndarray:
    """[G, 4] predicted f(θ_{-S}) − f(θ*) per group, columns in ``ESTIMATORS`` order."""
    grad_f = grad(problem.target)(theta)
    g_target = problem.per_example_grads(theta, problem.data.x_target, problem.data.y_target)
    out = np.empty((len(groups), len(ESTIMATORS)))
    for i, index in enumerate(progress_iter(groups, len(groups), label, "group")):
        idx = torch.as_tensor(index)
        group_loss = lambda t, idx=idx: problem.group_loss(t, idx)  # noqa: E731
        g_sum = grad(group_loss)(theta)
        u_s = curvature.ihvp(g_sum) / problem.n
        exact = group_estimate(grad_f, u_s, curvature.hvp_target)
        ef = ef_group_estimate((g_target @ u_s)[None, :])
        disp = basu_group_displacement(g_sum, problem.n, len(index), curvature.ihvp, hvp_of(group_loss, theta))
        out[i] = (exact.first_order, exact.total, ef.total, float(grad_f @ disp))
    return out
