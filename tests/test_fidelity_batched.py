"""Batched leave-group-out retraining against one-at-a-time L-BFGS and exact Newton retraining, and
the CNN's curvature products against autograd on a tiny instance."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from iaif.evaluation.fidelity.datasets import Split
from iaif.evaluation.fidelity.hessian import dense_ggn, dense_hessian, exact_curvature, ggn_vp, retraining_curvature, row_preconditioner
from iaif.evaluation.fidelity.models import FlatModel, build_model
from iaif.evaluation.fidelity.objective import Problem, hvp_of
from iaif.evaluation.fidelity.retrain import FitSettings, RetrainSettings, batched_retrain, finish_unconverged, fit, polish, train_full

pytestmark = pytest.mark.usefixtures("one_thread")
TIGHT = FitSettings(max_iter=5000, tol_grad=1e-10)
ROUGH = FitSettings(max_iter=100)
NEWTON = dict(tol_grad=1e-10, steps=100, cg_iters=200)  # polish to the tight tolerance


def _split(n: int, m: int, d: int, classes: int, seed: int, image: tuple[int, int, int] | None = None) -> Split:
    rng = np.random.default_rng(seed)
    shape = image or (d,)
    centres = rng.normal(0, 1.0, size=(classes, *shape))
    y, yt = rng.integers(classes, size=n), rng.integers(classes, size=m)
    x = centres[y] + rng.normal(0, 1.0, size=(n, *shape))
    xt = centres[yt] + rng.normal(0, 1.0, size=(m, *shape))
    t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    task = "binary" if classes == 2 else "multiclass"
    return Split("toy", task, t(x), t(y), t(xt), t(yt), 1 if classes == 2 else classes, image)


def _weights(n: int, groups: list[np.ndarray]) -> torch.Tensor:
    w = torch.ones(len(groups), n, dtype=torch.float64)
    for row, index in enumerate(groups):
        w[row, torch.as_tensor(index)] = 0.0
    return w


def _groups(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.choice(n, size, replace=False) for size in (1, 3, 6, 12, 20)]


def _precondition(problem: Problem, theta: torch.Tensor):
    """Rows ↦ rows of H⁻¹ at a minimum (H positive definite there: checked, no eigenvalue floor)."""
    evals, evecs = torch.linalg.eigh(dense_hessian(problem.objective, theta))
    assert float(evals.min()) > 0
    inverse = evecs @ torch.diag(1.0 / evals) @ evecs.T
    return lambda rows: rows @ inverse


def _toy_problem(model: str) -> Problem:
    if model == "resnet":
        return Problem(FlatModel(build_model("resnet", (1, 5, 5), 3, (2, 2, 2, 2), "gelu")), _split(120, 10, 0, 3, 4, (1, 5, 5)), 1e-2)
    return Problem(FlatModel(build_model(model, (4,), 3, (6,), "tanh")), _split(120, 30, 4, 3, seed=0), 5e-2)


@pytest.mark.parametrize("model", ["logreg", "mlp", "resnet"])
def test_batched_retraining_equals_one_at_a_time(model):
    problem = _toy_problem(model)
    start = fit(problem, problem.model.init_params(0), ROUGH if model == "resnet" else TIGHT)
    theta = polish(problem, start, **NEWTON)
    groups = _groups(problem.n, 1)
    settings = RetrainSettings(tol_grad=1e-10, max_iter=1000)
    out = batched_retrain(problem, theta, _weights(problem.n, groups), _precondition(problem, theta), settings)
    assert out.converged.all() and (out.grad_max <= 1e-10).all()
    for row, w in enumerate(_weights(problem.n, groups)):
        single = batched_retrain(problem, theta, w[None], _precondition(problem, theta), settings)
        assert torch.allclose(out.theta[row], single.theta[0], atol=1e-9), row  # batching changes nothing
        alone = fit(problem, theta, TIGHT, w)  # one group at a time, torch's L-BFGS (stalls near 1e-8) ...
        alone = polish(problem, alone, **NEWTON, weights=w)  # ... then polished from there with the curvature there
        assert torch.allclose(out.theta[row], alone, atol=1e-8), row
        assert float(problem.target(out.theta[row])) == pytest.approx(float(problem.target(alone)), abs=1e-8)


def test_batched_retraining_equals_exact_newton_on_logistic_regression():
    split = _split(150, 40, 3, 2, seed=2)
    net = FlatModel(build_model("logreg", (3,), 1))
    problem = Problem(net, split, 1e-2)
    theta = fit(problem, net.init_params(0), TIGHT)
    groups = _groups(problem.n, 3)
    out = batched_retrain(problem, theta, _weights(problem.n, groups), _precondition(problem, theta),
                          RetrainSettings(tol_grad=1e-11, max_iter=200))
    x = np.hstack([split.x_train.numpy(), np.ones((problem.n, 1))])  # θ = [w, b]
    y = split.y_train.numpy()
    for row, index in enumerate(groups):
        keep = np.setdiff1d(np.arange(problem.n), index)
        th = theta.numpy().copy()
        for _ in range(30):  # Newton's method on the closed-form gradient and Hessian (numpy)
            s = 1 / (1 + np.exp(-x[keep] @ th))
            g = x[keep].T @ (s - y[keep]) / problem.n + problem.l2 * th
            h = (x[keep] * (s * (1 - s))[:, None]).T @ x[keep] / problem.n + problem.l2 * np.eye(len(th))
            th -= np.linalg.solve(h, g)
        assert np.allclose(out.theta[row].numpy(), th, atol=1e-9)


def test_not_converged_groups_are_flagged():
    split = _split(120, 30, 4, 3, seed=0)
    net = FlatModel(build_model("mlp", (4,), 3, (6,), "tanh"))
    problem = Problem(net, split, 1e-2)
    theta = fit(problem, net.init_params(0), TIGHT)
    identity = lambda rows: rows  # noqa: E731  (gradient descent: far too slow for 3 steps)
    out = batched_retrain(problem, theta, _weights(problem.n, _groups(problem.n, 1)), identity,
                          RetrainSettings(tol_grad=1e-10, max_iter=3))
    assert not out.converged[1:].any() and (out.iterations <= 3).all()
    assert (out.grad_max[~out.converged] > 1e-10).all()


def test_newton_finish_takes_stalled_groups_to_the_one_at_a_time_optimum():
    """L-BFGS stopped after 3 iterations leaves every group far above the tolerance; the Newton finish
    (fixed metric: the exact Hessian at θ*) then reaches the same optimum as retraining alone."""
    problem = _toy_problem("resnet")
    theta = polish(problem, fit(problem, problem.model.init_params(0), ROUGH), **NEWTON)
    curvature = retraining_curvature(problem, theta, exact_curvature(problem, theta, 0.0, kind="ggn"), 0.0, exact_max_params=4000)
    assert curvature.method == "exact hessian"  # the retraining starts from the true curvature, not the GGN
    weights = _weights(problem.n, _groups(problem.n, 1))
    settings = RetrainSettings(tol_grad=1e-10, max_iter=3, finish_steps=50)
    stalled = batched_retrain(problem, theta, weights, row_preconditioner(curvature), settings)
    assert not stalled.converged[1:].any() and not stalled.newton.any()
    out = finish_unconverged(problem, stalled, weights, curvature.matrix, settings)
    assert out.converged.all() and (out.grad_max <= 1e-10).all()
    assert (out.newton == ~stalled.converged).all() and (out.iterations == stalled.iterations).all()
    for row, w in enumerate(weights):
        alone = polish(problem, fit(problem, theta, TIGHT, w), **NEWTON, weights=w)
        assert torch.allclose(out.theta[row], alone, atol=1e-8), row
    unchanged = finish_unconverged(problem, stalled, weights, None, settings)  # no dense metric: nothing to finish with
    assert unchanged is stalled


def test_exact_curvature_matrix_is_what_its_inverse_inverts():
    """Away from a minimum (θ₀) some Hessian eigenvalues are raised to λ: ``matrix`` carries the raise."""
    problem = _toy_problem("resnet")
    theta = problem.model.init_params(0)
    curvature = exact_curvature(problem, theta, damping=0.1)
    assert curvature.raised_eigenvalues > 0 and curvature.matrix is not None
    v = torch.randn(theta.numel(), 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(curvature.matrix @ curvature.ihvp(v), v, atol=1e-9)
    hessian = dense_hessian(problem.objective, theta) + 0.1 * torch.eye(theta.numel(), dtype=torch.float64)
    evals = torch.linalg.eigvalsh(hessian)
    assert torch.allclose(torch.linalg.eigvalsh(curvature.matrix), evals.clamp_min(problem.l2 + 0.1), atol=1e-9)


def _tiny_cnn() -> tuple[Problem, torch.Tensor]:
    split = _split(12, 5, 0, 3, seed=4, image=(1, 5, 5))
    net = FlatModel(build_model("resnet", (1, 5, 5), 3, (2, 2, 3, 3), "gelu"))
    return Problem(net, split, 1e-2), net.init_params(1)


def test_cnn_hessian_vector_product_equals_double_backward():
    problem, theta = _tiny_cnn()
    v = torch.randn(theta.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t = theta.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(problem.objective(t), t, create_graph=True)
    (double,) = torch.autograd.grad(g @ v, t)
    assert torch.allclose(hvp_of(problem.objective, theta)(v), double, rtol=1e-9, atol=1e-12)


def test_cnn_ggn_products_equal_explicit_jacobian():
    problem, theta = _tiny_cnn()
    x = problem.data.x_train
    jac = torch.autograd.functional.jacobian(lambda t: problem.model(t, x), theta)  # [n, C, p]
    probs = torch.softmax(problem.model(theta, x), -1)
    lam = torch.diag_embed(probs) - probs[:, :, None] * probs[:, None, :]  # cross-entropy in the logits
    explicit = torch.einsum("ncp,ncd,ndq->pq", jac, lam, jac) / problem.n + problem.l2 * torch.eye(theta.numel(), dtype=torch.float64)
    assert torch.allclose(dense_ggn(problem, theta, chunk=5), explicit, rtol=1e-9, atol=1e-12)
    v = torch.randn(theta.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(ggn_vp(problem, theta)(v), explicit @ v, rtol=1e-9, atol=1e-12)


def test_polish_takes_a_cnn_from_where_lbfgs_stops_to_a_minimum():
    problem = _toy_problem("resnet")
    rough = fit(problem, problem.model.init_params(0), ROUGH)
    grad = torch.func.grad(problem.objective)
    assert float(grad(rough).abs().max()) > 1e-6  # L-BFGS alone is far from the tolerance here
    theta = polish(problem, rough, **NEWTON)
    assert float(grad(theta).abs().max()) <= 1e-10
    assert float(problem.objective(theta)) < float(problem.objective(rough))
    assert float(torch.linalg.eigvalsh(dense_hessian(problem.objective, theta)).min()) > 0  # a minimum, not a saddle


def test_polish_leaves_a_saddle_along_negative_curvature():
    """At a stationary point with an indefinite Hessian (θ = 0 of a tanh MLP without biases' symmetry
    broken) the trust-region step follows negative curvature to a lower minimum instead of stopping."""
    problem = _toy_problem("mlp")
    saddle = torch.zeros(problem.model.num_params, dtype=torch.float64)
    grad = torch.func.grad(problem.objective)
    theta = polish(problem, saddle + 1e-6 * problem.model.init_params(0), **NEWTON)
    assert float(torch.linalg.eigvalsh(dense_hessian(problem.objective, saddle)).min()) < 0
    assert float(grad(theta).abs().max()) <= 1e-10
    assert float(problem.objective(theta)) < float(problem.objective(saddle)) - 1e-3
    assert float(torch.linalg.eigvalsh(dense_hessian(problem.objective, theta)).min()) > 0


def test_continuation_in_l2_reaches_the_direct_fit():
    """Training at L2 λ₁ then warm-starting λ₂ ends where training at λ₂ directly does, on a convex problem
    (one optimum; on a non-convex one the continuation may, by design, end in another local minimum)."""
    problem = replace(_toy_problem("logreg"), l2=3e-2)
    settings = FitSettings(max_iter=2000, tol_grad=1e-10)
    direct = train_full(problem, problem.model.init_params(0), settings)
    continued = train_full(problem, problem.model.init_params(0), replace(settings, continuation_l2=1e-2))
    stage = train_full(replace(problem, l2=1e-2), problem.model.init_params(0), settings)
    grad = torch.func.grad(problem.objective)
    assert float(grad(direct).abs().max()) <= 1e-10 and float(grad(continued).abs().max()) <= 1e-10
    assert not torch.allclose(stage, direct, atol=1e-3)  # the first stage really is a different optimum
    assert torch.allclose(continued, direct, atol=1e-7)


def test_normalisation_free_cnn_has_a_stationary_point_a_groupnorm_one_cannot():
    """Why the CNN has no normalisation: a bias-free convolution followed by GroupNorm is scale-invariant
    (ε aside), so ∇ℓ ⟂ W and ⟨∇L, W⟩ = λ‖W‖² > 0 — under L2 the gradient never vanishes."""
    problem, _ = _tiny_cnn()
    conv, norm = torch.nn.Conv2d(1, 3, 3, padding=1, bias=False).double(), torch.nn.GroupNorm(1, 3, eps=0.0).double()
    x = problem.data.x_train

    def loss(w: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(torch.nn.Sequential(conv, norm), {"0.weight": w, "1.weight": norm.weight, "1.bias": norm.bias},
                                          (x,)).pow(3).mean()

    w = conv.weight.detach()
    g = torch.func.grad(loss)(w).detach()
    assert abs(float((g * w).sum())) < 1e-10 * float(w.norm()) * float(g.norm())
    assert torch.allclose(loss(3.0 * w).detach(), loss(w).detach(), rtol=1e-12)
