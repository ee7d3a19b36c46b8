"""Feature geometry of Φ (raw vs cosine, Gauss-Newton whitening) and the per-task λ budget, against
explicit computations."""

from __future__ import annotations

import math

import pytest
import torch

from iaif.selection.influence import CheckpointFeatures, FeatureGeometry, influence_matrix, parameter_features, whitening_transform
from iaif.selection.objective import TaskTerms, build_objectives, default_lambda


def _checkpoint(seed: int, n: int = 40, m: int = 5, d: int = 6, weight: float = 1.0) -> CheckpointFeatures:
    gen = torch.Generator().manual_seed(seed)
    shared = torch.randn(d, generator=gen)  # a component every example shares, as LoRA gradients do
    pool = torch.randn(n, d, generator=gen) + 3 * shared
    tgt = torch.randn(m, d, generator=gen) + 3 * shared
    return CheckpointFeatures(pool, [f"p{i}" for i in range(n)], tgt, [f"t{j}" for j in range(m)], weight, f"c{seed}")


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True)


def test_raw_geometry_is_the_weighted_dot_product():
    a, b = _checkpoint(0, weight=3.0), _checkpoint(1, weight=1.0)
    phi = influence_matrix([a, b], a.pool_ids, a.target_ids, geometry=FeatureGeometry(normalise=False))
    hand = 0.75 * a.pool @ a.targets.T + 0.25 * b.pool @ b.targets.T
    assert torch.allclose(phi, hand, atol=1e-4)


def test_whitened_phi_is_the_mahalanobis_cosine_with_the_damped_gauss_newton_inverse():
    c = _checkpoint(2)
    damping = 0.1
    g = _unit(c.pool).double()
    h = g.T @ g / g.shape[0]
    h = h + damping * torch.linalg.eigvalsh(h).mean() * torch.eye(h.shape[0], dtype=torch.float64)
    h_inv = torch.linalg.inv(h)
    t = _unit(c.targets).double()
    num = g @ h_inv @ t.T
    norm_g = torch.sqrt(torch.einsum("id,de,ie->i", g, h_inv, g))
    norm_t = torch.sqrt(torch.einsum("id,de,ie->i", t, h_inv, t))
    hand = num / norm_g[:, None] / norm_t[None, :]
    phi = influence_matrix([c], c.pool_ids, c.target_ids, chunk_rows=7, geometry=FeatureGeometry(whiten=damping))
    assert torch.allclose(phi.double(), hand, atol=1e-5)
    # the transform is H^(-1/2): W H W = I
    w = whitening_transform(c.pool, torch.arange(40).numpy(), damping, "c", c.pool_ids, chunk_rows=9).double()
    assert torch.allclose(w @ h @ w, torch.eye(6, dtype=torch.float64), atol=1e-5)


def test_whitening_takes_out_the_shared_direction():
    c = _checkpoint(3)
    plain = influence_matrix([c], c.pool_ids, c.target_ids)
    white = influence_matrix([c], c.pool_ids, c.target_ids, geometry=FeatureGeometry(whiten=0.01))
    # the shared component makes every raw cosine large and positive; whitening centres them
    assert float(plain.mean()) > 0.6
    assert abs(float(white.mean())) < 0.5 * float(plain.mean())


def test_parameter_features_follow_the_geometry():
    c = _checkpoint(4)
    u = parameter_features([c], c.pool_ids, geometry=FeatureGeometry(whiten=0.1))
    w = whitening_transform(c.pool, torch.arange(40).numpy(), 0.1, "c", c.pool_ids)
    assert torch.allclose(u, _unit(_unit(c.pool) @ w), atol=1e-5)


def test_bad_whitening_damping_is_refused():
    with pytest.raises(ValueError, match="whiten"):
        FeatureGeometry(whiten=0.0)


def test_per_task_lambda_budget_uses_k_over_tasks():
    gen = torch.Generator().manual_seed(5)
    phi = torch.randn(60, 8, generator=gen).abs()
    cols = {"a": slice(0, 3), "b": slice(3, 8)}
    tasks = [TaskTerms(t, phi[:, s].mean(dim=1), s, None) for t, s in cols.items()]
    _, lams_k = build_objectives(tasks, phi.clone(), 10, "sum", None, 1.0, "k")
    _, lams_task = build_objectives(tasks, phi.clone(), 10, "sum", None, 1.0, "per-task")
    for t, s in cols.items():
        assert lams_k[t] == pytest.approx(default_lambda(phi[:, s].mean(dim=1), phi[:, s], 10, None))
        assert lams_task[t] == pytest.approx(default_lambda(phi[:, s].mean(dim=1), phi[:, s], math.ceil(10 / 2), None))
    with pytest.raises(ValueError, match="lam_budget"):
        build_objectives(tasks, phi.clone(), 10, "sum", None, 1.0, "half")  # type: ignore[arg-type]
