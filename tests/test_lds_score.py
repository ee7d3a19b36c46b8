"""LDS: Spearman of a known linear estimator on synthetic groups against a hand computation, and the
estimators' group predictions against explicit loops over pairs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from iaif.evaluation.lds.estimators import PoolTerms, predicted_effects
from iaif.evaluation.lds.score import lds, spearman


def _hand_spearman(x: np.ndarray, y: np.ndarray) -> float:
    """1 − 6 Σ d² / (n (n² − 1)) on ranks counted by hand (no ties)."""
    n = len(x)
    rank_x = [sum(1 for v in x if v < xi) for xi in x]
    rank_y = [sum(1 for v in y if v < yi) for yi in y]
    d2 = sum((a - b) ** 2 for a, b in zip(rank_x, rank_y))
    return 1 - 6 * d2 / (n * (n * n - 1))


def test_lds_of_a_linear_estimator_equals_the_hand_computation():
    rng = np.random.default_rng(0)
    n, groups, size = 40, 25, 6
    beta = rng.normal(size=n)  # true per-example effects
    weights = beta + rng.normal(scale=0.8, size=n)  # the estimator's noisy per-example effects
    members = np.stack([rng.choice(n, size, replace=False) for _ in range(groups)])
    measured = beta[members].sum(axis=1) + 0.3 * (beta[members] ** 2).sum(axis=1)  # with a non-additive part
    predicted = weights[members].sum(axis=1)
    result = lds(predicted, measured, resamples=200, seed=1)
    assert result.spearman == pytest.approx(_hand_spearman(predicted, measured), abs=1e-12)
    assert result.low <= result.spearman <= result.high and result.subsets == groups
    assert lds(predicted, measured, resamples=200, seed=1) == result  # seeded bootstrap
    assert lds(predicted, -measured, resamples=50).spearman == pytest.approx(-result.spearman)


def test_undefined_and_too_small_inputs():
    assert np.isnan(spearman(np.ones(5), np.arange(5.0)))
    with pytest.raises(ValueError, match="at least 3"):
        lds(np.arange(2.0), np.arange(2.0))


def test_estimators_predict_minus_the_objective_by_explicit_pair_loops():
    torch.manual_seed(0)
    n, m = 12, 5
    phi = torch.randn(n, m) + 0.3
    sampled = torch.randn(n, 2 * m)
    terms = PoolTerms(phi=phi, phi_cosine=phi / phi.norm(dim=1, keepdim=True), subtasks={"a": [0, 1], "b": [2, 3, 4]},
                      sampled=sampled, similarity=torch.randn(n))
    members = torch.tensor([[0, 3, 5], [1, 2, 11], [4, 6, 7]])
    preds, lams = predicted_effects(terms, members)
    for g, group in enumerate(members.tolist()):
        first = sum(float(phi[a].mean()) for a in group)
        ef = sum(float(phi[a] @ phi[b]) / m for a in group for b in group) / 2
        gn = sum(float(sampled[a] @ sampled[b]) / (2 * m) for a in group for b in group) / 2
        assert preds["first-order"][g] == pytest.approx(-first, rel=1e-5)
        assert preds["interaction-ef"][g] == pytest.approx(-first + ef, rel=1e-5)
        assert preds["interaction-ef-λ"][g] == pytest.approx(-first + lams["ef"] * ef, rel=1e-5)
        assert preds["interaction-gn"][g] == pytest.approx(-first + gn, rel=1e-5)
        assert preds["interaction-gn-λ"][g] == pytest.approx(-first + lams["gn"] * gn, rel=1e-5)
        less = sum(max(float(terms.phi_cosine[a, :2].mean()), float(terms.phi_cosine[a, 2:].mean())) for a in group)
        assert preds["less"][g] == pytest.approx(-less, rel=1e-5)
        assert preds["rds"][g] == pytest.approx(-float(terms.similarity[group].sum()), rel=1e-5)
    # λ: the selector's rule, S_k / Q_k of the first-order top-3 set
    top = torch.topk(phi.mean(dim=1), 3).indices
    s_k = float(phi[top].mean(dim=1).sum())
    q_k = float(phi[top].sum(dim=0) @ phi[top].sum(dim=0)) / m
    assert lams["ef"] == pytest.approx(s_k / q_k, rel=1e-5)


def test_validated_lambda_is_the_grid_argmax_on_the_validation_groups_only():
    from scipy.stats import spearmanr

    from iaif.evaluation.lds.estimators import LAMBDA_GRID_OCTAVES, validated_lambda
    from iaif.selection.airrep.train import GroupTable
    from iaif.selection.objective import default_lambda

    torch.manual_seed(1)
    n, m, size = 40, 6, 5
    phi = torch.randn(n, m) + 0.2
    s = phi.mean(dim=1)

    def pair_loop(group: list[int], lam: float) -> float:  # −J(A) by explicit loops
        return -sum(float(s[a]) for a in group) + lam * sum(float(phi[a] @ phi[b]) / m for a in group for b in group) / 2

    groups = [torch.randperm(n)[:size].tolist() for _ in range(30)]
    members = torch.tensor(groups)
    rule = default_lambda(s, phi, size, None)  # the grid's centre, as predicted_effects uses it
    grid = [0.0, *(rule * 2.0**k for k in range(-LAMBDA_GRID_OCTAVES, LAMBDA_GRID_OCTAVES + 1))]
    truth = torch.tensor([pair_loop(g, rule * 8) for g in groups]) + 0.05 * torch.randn(len(groups))
    chosen = validated_lambda(phi, s, rule, GroupTable(members, truth))
    rhos = [spearmanr([pair_loop(g, lam) for g in groups], truth.numpy()).statistic for lam in grid]
    assert chosen == grid[int(np.argmax(rhos))] and chosen > 0
    # purely additive effects: λ = 0, the first-order sum, wins (ties go to the smallest λ)
    additive = torch.tensor([pair_loop(g, 0.0) for g in groups])
    assert validated_lambda(phi, s, rule, GroupTable(members, additive)) == 0.0
    # the held-out groups never enter: predicted_effects takes the validation groups as their own argument
    terms = PoolTerms(phi=phi, phi_cosine=phi / phi.norm(dim=1, keepdim=True), subtasks={"a": list(range(m))})
    preds, lams = predicted_effects(terms, members[:10], GroupTable(members, truth))
    assert lams["ef-val"] == chosen
    assert preds["interaction-ef-λval"][3] == pytest.approx(pair_loop(groups[3], chosen), rel=1e-5)


def test_paired_gain_uses_the_same_bootstrap_draws_for_both_estimators():
    from iaif.evaluation.lds.score import lds_gain

    rng = np.random.default_rng(3)
    measured = rng.normal(size=30)
    good, poor = measured + rng.normal(scale=0.3, size=30), measured + rng.normal(scale=2.0, size=30)
    gain = lds_gain(good, poor, measured, resamples=300, seed=4)
    assert gain.spearman == pytest.approx(spearman(good, measured) - spearman(poor, measured))
    # by hand: the same resampled subsets for both estimators, then the percentile interval of the differences
    draws = np.random.default_rng(4).integers(0, 30, size=(300, 30))
    diffs = [spearman(good[d], measured[d]) - spearman(poor[d], measured[d]) for d in draws]
    assert (gain.low, gain.high) == pytest.approx(tuple(np.quantile(diffs, [0.025, 0.975])))
    same = lds_gain(good, good, measured, resamples=100)
    assert (same.spearman, same.low, same.high) == (0.0, 0.0, 0.0)


def test_per_task_terms_score_one_task_by_explicit_pair_loops():
    torch.manual_seed(2)
    n, m = 10, 5
    phi, sampled = torch.randn(n, m) + 0.2, torch.randn(n, 4)
    terms = PoolTerms(phi=phi, phi_cosine=phi / phi.norm(dim=1, keepdim=True), subtasks={"a": [0, 1], "b": [2, 3, 4]},
                      sampled=sampled, similarity=torch.randn(n), sampled_subtasks={"a": [0, 2], "b": [1, 3]})
    similarity_b = torch.randn(n)
    members = torch.tensor([[0, 3, 5], [1, 2, 9]])
    preds, lams = predicted_effects(terms.for_task("b", similarity_b), members)
    assert "airrep" not in preds
    for g, group in enumerate(members.tolist()):
        first = sum(float(phi[a, 2:].mean()) for a in group)  # s_a of task b: the mean over b's targets only
        ef = sum(float(phi[a, 2:] @ phi[b, 2:]) / 3 for a in group for b in group) / 2
        gn = sum(float(sampled[a, [1, 3]] @ sampled[b, [1, 3]]) / 2 for a in group for b in group) / 2
        assert preds["first-order"][g] == pytest.approx(-first, rel=1e-5)
        assert preds["interaction-ef-λ"][g] == pytest.approx(-first + lams["ef"] * ef, rel=1e-5)
        assert preds["interaction-gn-λ"][g] == pytest.approx(-first + lams["gn"] * gn, rel=1e-5)
        assert preds["rds"][g] == pytest.approx(-float(similarity_b[group].sum()), rel=1e-5)
