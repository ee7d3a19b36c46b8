"""Fidelity maths on L2-regularised binary logistic regression, against independent computation:
retraining displacements, the closed form of κ (METHOD.md §1, Proposition 1), the EF form, and
the Spearman gain of the interaction-aware estimate on coherent groups."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from iaif.evaluation.fidelity.datasets import Split
from iaif.evaluation.fidelity.estimate import ESTIMATORS, estimate_groups
from iaif.evaluation.fidelity.hessian import cg_curvature, exact_curvature
from iaif.evaluation.fidelity.models import FlatModel, build_model
from iaif.evaluation.fidelity.objective import Problem
from iaif.evaluation.fidelity.retrain import FitSettings, fit
from iaif.selection.estimators import ef_group_estimate, group_estimate, pairwise_interaction

TIGHT = FitSettings(max_iter=5000, tol_grad=1e-10)


pytestmark = pytest.mark.usefixtures("one_thread")


def _blobs(n: int, m: int, d: int, seed: int) -> Split:
    """Two overlapping Gaussian classes, each made of three sub-clusters."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1.5, size=(6, d))

    def draw(k: int) -> tuple[torch.Tensor, torch.Tensor]:
        c = rng.integers(6, size=k)
        x = centres[c] + rng.normal(0, 0.8, size=(k, d))
        return torch.tensor(x), torch.tensor((c % 2).astype(np.float64))

    x, y = draw(n)
    xt, yt = draw(m)
    return Split("blobs", "binary", x, y, xt, yt, 1, None)


def _problem(n: int = 80, m: int = 40, d: int = 3, l2: float = 0.05, seed: int = 0) -> tuple[Problem, torch.Tensor]:
    split = _blobs(n, m, d, seed)
    model = FlatModel(build_model("logreg", (d,), 1))
    problem = Problem(model, split, l2)
    return problem, fit(problem, model.init_params(seed), TIGHT)


def _closed_form(problem: Problem, theta: torch.Tensor) -> dict[str, np.ndarray]:
    """Independent numpy computation: x̃ = [x, 1] (θ = [w, b]), σ, H, H_f, g_a, ∇f."""
    th = theta.numpy()
    aug = lambda x: np.hstack([x.numpy(), np.ones((len(x), 1))])  # noqa: E731
    xa, xt = aug(problem.data.x_train), aug(problem.data.x_target)
    sa, st = 1 / (1 + np.exp(-xa @ th)), 1 / (1 + np.exp(-xt @ th))
    ya, yt = problem.data.y_train.numpy(), problem.data.y_target.numpy()
    h = (xa * (sa * (1 - sa))[:, None]).T @ xa / len(ya) + problem.l2 * np.eye(len(th))
    hf = (xt * (st * (1 - st))[:, None]).T @ xt / len(yt)
    return {"x": xa, "r": sa - ya, "xt": xt, "rt": st - yt, "H": h, "Hf": hf,
            "G": xa * (sa - ya)[:, None], "Gt": xt * (st - yt)[:, None], "grad_f": ((st - yt)[:, None] * xt).mean(0)}


def test_displacement_matches_retraining_to_first_order():
    problem, theta = _problem()
    curv = exact_curvature(problem, theta, damping=0.0)
    g = problem.per_example_grads(theta, problem.data.x_train, problem.data.y_train)
    for a in (0, 17, 42):
        u_a = curv.ihvp(g[a]) / problem.n
        errors = []
        for eps in (0.3, 0.03):  # large enough that the fit tolerance does not dominate
            w = torch.ones(problem.n, dtype=torch.float64)
            w[a] = 1 - eps  # shrink the weight of a; removing it entirely is eps = 1
            moved = (fit(problem, theta, TIGHT, w) - theta) / eps
            errors.append(float((moved - u_a).norm() / u_a.norm()))
        assert errors[1] < 2e-3
        assert errors[1] < errors[0] / 5  # the remainder shrinks like eps: first-order agreement


def test_kappa_equals_proposition_1_closed_form():
    problem, theta = _problem()
    cf = _closed_form(problem, theta)
    curv = exact_curvature(problem, theta, damping=0.0)
    g = problem.per_example_grads(theta, problem.data.x_train, problem.data.y_train)
    assert np.allclose(g.numpy(), cf["G"], atol=1e-10)
    h_inv = np.linalg.inv(cf["H"])
    m_mat = h_inv @ cf["Hf"] @ h_inv
    n = problem.n
    for a, b in [(0, 1), (3, 3), (5, 60), (20, 79)]:
        kappa = float(pairwise_interaction(curv.ihvp(g[a]) / n, curv.ihvp(g[b]) / n, curv.hvp_target))
        closed = cf["r"][a] * cf["r"][b] * cf["x"][a] @ m_mat @ cf["x"][b] / n**2
        assert kappa == pytest.approx(closed, rel=1e-7, abs=1e-14)


def test_cg_ihvp_matches_exact():
    problem, theta = _problem()
    v = torch.randn(theta.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    exact = exact_curvature(problem, theta, damping=0.1).ihvp(v)
    assert torch.allclose(cg_curvature(problem, theta, damping=0.1).ihvp(v), exact, rtol=1e-6)
    assert torch.allclose(exact, torch.tensor(np.linalg.solve(_closed_form(problem, theta)["H"] + 0.1 * np.eye(4), v.numpy())))


def test_ef_form_equals_parameter_form_with_empirical_fisher():
    problem, theta = _problem()
    cf = _closed_form(problem, theta)
    n, m = problem.n, len(problem.data.y_target)
    phi = cf["G"] @ np.linalg.solve(cf["H"], cf["Gt"].T) / n  # Φ[a, t] = g_tᵀ u_a, independently
    gt = torch.tensor(cf["Gt"])
    curv = exact_curvature(problem, theta, damping=0.0)
    curv.hvp_target = lambda v: gt.T @ (gt @ v) / m  # H_f := empirical Fisher of the target
    group = np.array([2, 5, 11, 30, 31, 64])
    u_s = torch.tensor(np.linalg.solve(cf["H"], cf["G"][group].sum(0)) / n)
    param = group_estimate(torch.tensor(cf["grad_f"]), u_s, curv.hvp_target)
    ef = ef_group_estimate(torch.tensor(phi[group]))
    assert ef.first_order == pytest.approx(param.first_order, rel=1e-9)
    assert ef.interaction == pytest.approx(param.interaction, rel=1e-9)
    est = estimate_groups(problem, theta, curv, [group])[0]
    assert est[ESTIMATORS.index("interaction_ef")] == pytest.approx(ef.total, rel=1e-9)
    assert est[ESTIMATORS.index("interaction_exact")] == pytest.approx(param.total, rel=1e-9)


def test_interaction_aware_beats_first_order_on_coherent_groups():
    problem, theta = _problem(n=200, m=100, d=2, l2=1e-2, seed=1)
    x = problem.data.x_train.numpy()
    labels = problem.data.y_train.numpy()
    rng = np.random.default_rng(0)
    groups = []
    for i in range(24):  # the same-class examples nearest to a random anchor, 2-25% of n
        size = int(np.geomspace(4, 50, 6)[i % 6])
        anchor = rng.integers(problem.n)
        same = np.flatnonzero(labels == labels[anchor])
        groups.append(same[np.argsort(((x[same] - x[anchor]) ** 2).sum(1))[:size]])
    actual = []
    for index in groups:
        w = torch.ones(problem.n, dtype=torch.float64)
        w[torch.as_tensor(index)] = 0
        actual.append(float(problem.target(fit(problem, theta, TIGHT, w)) - problem.target(theta)))
    est = estimate_groups(problem, theta, exact_curvature(problem, theta, 0.0), groups)
    rho = {e: spearmanr(est[:, j], actual).statistic for j, e in enumerate(ESTIMATORS)}
    assert rho["interaction_exact"] > rho["first_order"]
    assert rho["interaction_exact"] > rho["basu"]
