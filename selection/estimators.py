"""The interaction-aware influence maths (METHOD.md §1-§2), in one place.

Two equivalent views of the same second-order expansion of the target f:

* parameter form: displacements u_a = (1/n) H⁻¹ g_a, target gradient ∇f and target curvature H_f
  (given as a Hessian-vector product). Used by the fidelity benchmark on small models.
* empirical-Fisher (EF) form: the train-by-target influence matrix Φ (N × m) with
  φ_{a,t} = g_tᵀ u_a; s_a = mean_t φ_{a,t} and κ(a, b) = ⟨φ_a, φ_b⟩ / m. Used by the selector at scale.

Removal of a group S changes the target by  Δf̂(S) = Σ_{a∈S} I(a) + ½ Σ_{a,b∈S} κ(a, b).
Adding a set A changes it by about  −Σ_{a∈A} s_a + ½ Σ_{a,b∈A} κ(a, b), so selection maximises
J(A) = Σ_{a∈A} s_a − (λ/2) Σ_{a,b∈A} κ(a, b).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Hvp = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class GroupEstimate:
    """Predicted change of the target when a group is removed, split into its two parts."""

    first_order: float
    interaction: float

    @property
    def total(self) -> float:
        return self.first_order + self.interaction


# ---------------------------------------------------------------- parameter form (removal)


def pairwise_interaction(u_a: torch.Tensor, u_b: torch.Tensor, hvp_f: Hvp) -> torch.Tensor:
    """κ(a, b) = u_aᵀ H_f u_b."""
    return u_a @ hvp_f(u_b)


def group_estimate(grad_f: torch.Tensor, u_group: torch.Tensor, hvp_f: Hvp | None) -> GroupEstimate:
    """Interaction-aware removal estimate from the summed displacement u_S = Σ_{a∈S} u_a.

    One Hessian-vector product per group: ½ Σ_{a,b} κ(a, b) = ½ u_Sᵀ H_f u_S. With ``hvp_f=None``
    only the first-order (additive) part is returned.
    """
    first = float(grad_f @ u_group)
    inter = 0.0 if hvp_f is None else 0.5 * float(u_group @ hvp_f(u_group))
    return GroupEstimate(first, inter)


def basu_group_displacement(
    grad_sum: torch.Tensor, n: int, group_size: int, ihvp: Hvp, group_hvp: Hvp
) -> torch.Tensor:
    """Basu et al. (2020) second-order group influence: parameter change when removing U.

    Δθ ≈ (1−2p)/(1−p)² (1/n) H⁻¹ Σ_U g + 1/((1−p)² n²) H⁻¹ (Σ_U H_z) H⁻¹ Σ_U g,  p = |U|/n.
    ``grad_sum`` is Σ_U g_z, ``ihvp`` applies H⁻¹, ``group_hvp`` applies Σ_U H_z.
    The target stays first order: Δf ≈ ∇fᵀ Δθ.
    """
    p = group_size / n
    h_inv_g = ihvp(grad_sum)
    first = (1 - 2 * p) / (1 - p) ** 2 / n * h_inv_g
    second = ihvp(group_hvp(h_inv_g)) / ((1 - p) ** 2 * n**2)
    return first + second


# ---------------------------------------------------------------- empirical-Fisher form


def ef_scores(phi: torch.Tensor) -> torch.Tensor:
    """s_a = mean_t φ_{a,t}: individual influence of each row of Φ ([N, m] → [N])."""
    return phi.mean(dim=-1)


def ef_group_estimate(phi_group: torch.Tensor) -> GroupEstimate:
    """Removal estimate of a group from its rows of Φ ([|S|, m]): Σ I + (1/2m) Σ_t C_t²."""
    cum = phi_group.sum(dim=0)
    m = phi_group.shape[-1]
    return GroupEstimate(float(cum.sum() / m), quadratic_part(cum, None))


def _kappa_scale(m: int, scale: float | None) -> float:
    return 1.0 / m if scale is None else scale


def quadratic_part(cum: torch.Tensor, scale: float | None = None) -> float:
    """½ Σ_{a,b∈S} κ(a, b) = ½ · scale · ‖C(S)‖² from the summed features C(S) = Σ_{a∈S} φ_a.

    κ(a, b) = scale · ⟨φ_a, φ_b⟩; ``scale=None`` is the empirical-Fisher 1/m (m = feature length).
    """
    return 0.5 * _kappa_scale(cum.shape[-1], scale) * float(cum @ cum)


def pairwise_kappa(phi_rows: torch.Tensor, phi_cols: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """κ between every row of ``phi_rows`` ([B, m] or [m]) and every row of ``phi_cols`` ([C, m] or [m]).

    κ(a, b) = scale · ⟨φ_a, φ_b⟩ (``scale=None``: 1/m, the EF form). Never call it on the whole pool
    against itself: that is the N×N matrix the selector avoids.
    """
    return _kappa_scale(phi_rows.shape[-1], scale) * (phi_rows @ phi_cols.T)


def selection_objective(
    phi_selected: torch.Tensor, lam: float, scores: torch.Tensor | None = None, scale: float | None = None
) -> float:
    """J(A) = Σ_{a∈A} s_a − (λ/2) Σ_{a,b∈A} κ(a, b), from the selected rows of the curvature features.

    ``scores`` overrides s_a (e.g. when the linear term uses true labels and Φ holds sampled-label
    influences for the curvature, the Gauss-Newton variant, or in the identity form where the rows are
    parameter-space features u_a); ``scale`` as in :func:`pairwise_kappa`.
    """
    s = ef_scores(phi_selected) if scores is None else scores
    return float(s.sum()) - lam * quadratic_part(phi_selected.sum(dim=0), scale)


def marginal_gain(
    scores: torch.Tensor,
    phi: torch.Tensor,
    cum: torch.Tensor,
    lam: float,
    scale: float | None = None,
    sq_norms: torch.Tensor | None = None,
    exact_rows: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy gains of candidates given the selected set's cumulative influence C(A).

    Δ(c | A) = s_c − λ · scale · [ φ_cᵀ C(A) + ½ ‖φ_c‖² ]  (EF: scale = 1/m, the default).
    Returns (gain, interaction part) for each row of ``phi`` ([B, m]); ``scores`` are the candidates'
    s_c ([B]); ``sq_norms`` optionally gives the precomputed ‖φ_c‖² ([B]).

    ``exact_rows`` (default): each row is reduced on its own (an elementwise product summed along the
    row), so a row's gain is the same bit for bit whichever other rows are evaluated with it, and equal
    rows tie exactly. ``exact_rows=False``: one BLAS matrix-vector product, faster on many rows, whose
    rounding depends on how many rows it is given (good for bounds, not for comparing gains).
    """
    sq = (phi * phi).sum(dim=-1) if sq_norms is None else sq_norms
    dot = (phi * cum).sum(dim=-1) if exact_rows else phi @ cum
    inter = lam * _kappa_scale(phi.shape[-1], scale) * (dot + 0.5 * sq)
    return scores - inter, inter
