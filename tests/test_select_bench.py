"""Selection benchmark (``iaif select-bench``) against independent computation: retraining reaches the
optimum a separate numpy/scipy solver finds, the exact-H_f greedy equals a brute-force greedy on the
explicit κ matrix, the Gauss-Newton H_f equals the Hessian where they must agree, and the shifted
target's parts are disjoint and imbalanced as specified."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from scipy.special import log_softmax, softmax

from iaif.evaluation.fidelity.models import FlatModel, build_model
from iaif.evaluation.fidelity.retrain import FitSettings
from iaif.evaluation.select_bench.data import DataSpec, load_bench_data
from iaif.evaluation.select_bench.features import gauss_newton, pool_displacements, target_features
from iaif.evaluation.select_bench.methods import select
from iaif.evaluation.select_bench.train import ModelSpec, SubsetTrainer

SPEC = DataSpec("digits", n_train=160, n_heldout=120, downsample=2, n_seed=30)  # 4×4 inputs, 170 parameters
L2 = 1e-2


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bench():
    data = load_bench_data(SPEC, None, seed=0, heavy_classes=3, light_keep=0.2)
    model = FlatModel(build_model("logreg", data.split.image_shape, 10))
    trainer = SubsetTrainer(model, data.split, ModelSpec("logreg", l2=L2), model.init_params(0),
                            FitSettings(max_iter=2000, tol_grad=1e-9), None, "test")
    return data, model, trainer


def _numpy_optimum(x: np.ndarray, y: np.ndarray, l2: float) -> np.ndarray:
    """Multinomial logistic regression with an L2 penalty on weights and biases, by scipy from zero;
    returned in nn.Linear's layout [W (C×d) row-major, b (C)]."""
    n, d = x.shape
    xa = np.hstack([x, np.ones((n, 1))])
    onehot = np.eye(10)[y]

    def obj(flat: np.ndarray) -> tuple[float, np.ndarray]:
        w = flat.reshape(d + 1, 10)
        z = xa @ w
        loss = -(log_softmax(z, axis=1) * onehot).sum() / n + 0.5 * l2 * (flat @ flat)
        return loss, (xa.T @ (softmax(z, axis=1) - onehot) / n + l2 * w).ravel()

    res = minimize(obj, np.zeros((d + 1) * 10), jac=True, method="L-BFGS-B", options={"maxiter": 5000, "gtol": 1e-12, "ftol": 1e-15})
    w = res.x.reshape(d + 1, 10)
    return np.concatenate([w[:d].T.ravel(), w[d]])


def test_retraining_on_seed_and_picks_reaches_the_closed_form_optimum(bench):
    data, _, trainer = bench
    picks = data.pool_index[[3, 7, 7, 20, 41, 2]]  # a repeat and any order: the set is what counts
    union = np.concatenate([data.seed_index, picks])
    theta = trainer.fit(union)
    rows = np.unique(union)
    x = data.split.x_train[torch.as_tensor(rows)].flatten(1).numpy()
    y = data.split.y_train[torch.as_tensor(rows)].numpy().astype(int)
    expected = _numpy_optimum(x, y, L2)
    assert np.abs(theta.numpy() - expected).max() < 1e-5
    # the same set given in another order (and without the repeat) trains the same model
    again = trainer.fit(np.concatenate([picks[::-1], data.seed_index[::-1]]))
    assert torch.allclose(theta, again, atol=1e-9)


def test_exact_curvature_greedy_equals_brute_force_on_explicit_kappa(bench):
    data, model, trainer = bench
    theta = trainer.fit(data.seed_index)
    seed_problem = trainer.problem(data.seed_index, data.targets["shifted"].x_val, data.targets["shifted"].y_val)
    pool = data.pool_index[:60]
    u, _ = pool_displacements(seed_problem, theta, data.x(pool), data.y(pool), damping=0.0)
    feats = target_features(seed_problem, theta, u)
    # explicit κ = U H_f Uᵀ with H_f from torch.autograd (independent of the dense-Hessian helper)
    h_f = torch.autograd.functional.hessian(seed_problem.target, theta)
    kappa = (u @ h_f @ u.T).numpy()
    grad_f = torch.autograd.functional.jacobian(seed_problem.target, theta)
    s = (u @ grad_f).numpy()
    assert np.allclose(feats.scores.numpy(), s, rtol=1e-4, atol=1e-7)
    k = 12
    top = np.argsort(-s, kind="stable")[:k]
    lam = s[top].sum() / kappa[np.ix_(top, top)].sum()  # the default rule λ = S_k / Q_k
    chosen: list[int] = []
    for _ in range(k):
        gain = s - lam * (kappa[:, chosen].sum(axis=1) + 0.5 * np.diag(kappa))
        gain[chosen] = -np.inf
        chosen.append(int(np.argmax(gain)))
    picks = select("interaction-exact", k, feats, torch.zeros(0), torch.zeros(0), seed=0)
    assert picks.lam == pytest.approx(lam, rel=1e-4)
    assert picks.indices == chosen
    assert len(set(chosen) & set(top.tolist())) < k  # the interaction term changed the set


def test_gauss_newton_equals_hessian_for_logistic_regression(bench):
    data, model, trainer = bench
    theta = trainer.fit(data.seed_index)
    ts = data.targets["plain"]
    problem = trainer.problem(data.seed_index, ts.x_val, ts.y_val)
    h_f = torch.autograd.functional.hessian(problem.target, theta)
    assert torch.allclose(gauss_newton(model, theta, ts.x_val), h_f, atol=1e-10)


def test_shifted_target_parts_are_disjoint_and_imbalanced(bench):
    data, _, _ = bench
    sh, plain = data.targets["shifted"], data.targets["plain"]
    assert len(sh.heavy_classes) == 3
    rows = lambda x: {tuple(r) for r in x.flatten(1).tolist()}  # noqa: E731
    assert not rows(sh.x_val) & rows(sh.x_test)
    assert rows(sh.x_val) <= rows(plain.x_val) and rows(sh.x_test) <= rows(plain.x_test)
    for part, full in ((sh.y_val, plain.y_val), (sh.y_test, plain.y_test)):
        for c in range(10):
            have, total = int((part == c).sum()), int((full == c).sum())
            if c in sh.heavy_classes:
                assert have == total
            elif total:
                assert have == max(1, round(0.2 * total))


def test_stage_end_to_end_on_digits(tmp_path):
    """The stage's wiring: every row is written, and a reported cell equals retraining by hand on
    seed set ∪ the method's picks (pool rows mapped back to training rows) and scoring the test part."""
    import json
    import math

    from iaif.evaluation.select_bench.benchmark import DATASETS, MODELS, SelectBenchConfig, run_select_bench
    from iaif.selection.baselines.random_subset import random_select

    cfg = SelectBenchConfig(output_dir=str(tmp_path), datasets=["digits"], models=["logreg"], methods=["first-order", "random"],
                            budgets=[0.05], seeds=1, seed=3)
    out = run_select_bench(cfg)
    res = json.loads((out / "results.json").read_text())
    assert len(res["rows"]) == 2 * (2 + 2)  # per target: base, all-pool, two methods
    assert (out / "plot_digits_logreg_shifted.png").is_file() and "| random |" in (out / "table.md").read_text()
    cell = next(r for r in res["rows"] if r["method"] == "random" and r["target"] == "shifted")
    data = load_bench_data(DATASETS["digits"], None, 3, cfg.heavy_classes, cfg.light_keep)
    k = math.ceil(0.05 * len(data.pool_index))
    assert cell["k"] == k
    spec = MODELS["logreg"]
    model = FlatModel(build_model("logreg", data.split.image_shape, 10))
    trainer = SubsetTrainer(model, data.split, spec, model.init_params(3), cfg.fit, None, "by hand")
    picks = data.pool_index[random_select(len(data.pool_index), k, 3)]
    theta = trainer.fit(np.concatenate([data.seed_index, picks]))
    ts = data.targets["shifted"]
    assert trainer.metrics(theta, ts.x_test, ts.y_test)[0] == pytest.approx(cell["test_loss"], rel=1e-6)
