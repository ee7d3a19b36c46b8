"""Baselines against hand computation: LESS ranking, random balance, similarity aggregation, RDS+ pooling."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from iaif.selection.baselines.less import less_scores, less_select
from iaif.selection.baselines.random_subset import balanced_quotas, random_select
from iaif.selection.baselines.rds import position_weighted_mean
from iaif.selection.baselines.similarity import similarity_select
from iaif.selection.influence import CheckpointFeatures, FeatureError, influence_matrix


def test_less_reproduces_hand_ranking():
    # two checkpoints with lr weights 0.75 / 0.25; 2-d features so cosines are easy by hand
    pool1 = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [-1.0, 0.0]])
    pool2 = torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    tgt1 = torch.tensor([[1.0, 0.0], [0.0, 3.0], [1.0, 0.0]])
    tgt2 = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    ids, tids = ["p0", "p1", "p2", "p3"], ["t0", "t1", "t2"]
    ckpts = [CheckpointFeatures(pool1, ids, tgt1, tids, 3.0, "c1"), CheckpointFeatures(pool2, ids, tgt2, tids, 1.0, "c2")]
    phi = influence_matrix(ckpts, ids, tids)
    r = 2 ** -0.5
    # cos per checkpoint, weighted 0.75 / 0.25
    hand = torch.tensor([
        [0.75 * 1 + 0.25 * 0, 0.75 * 0 + 0.25 * 0, 0.75 * 1 + 0.25 * 1],
        [0.75 * 0 + 0.25 * 0, 0.75 * 1 + 0.25 * 0, 0.75 * 0 + 0.25 * 1],
        [0.75 * r + 0.25 * 1, 0.75 * r + 0.25 * 1, 0.75 * r + 0.25 * 0],
        [0.75 * -1 + 0.25 * 1, 0.75 * 0 + 0.25 * 1, 0.75 * -1 + 0.25 * 0],
    ])
    assert torch.allclose(phi, hand, atol=1e-6)
    # subtasks: A = {t0, t2}, B = {t1}; score = max(mean over A, mean over B)
    subtasks = {"A": [0, 2], "B": [1]}
    score = [max((hand[i, 0] + hand[i, 2]) / 2, hand[i, 1]) for i in range(4)]
    assert less_scores(phi, subtasks).tolist() == pytest.approx([float(s) for s in score])
    idx, _ = less_select(phi, subtasks, 3)
    assert idx == sorted(range(4), key=lambda i: -float(score[i]))[:3] == [0, 2, 1]


def test_influence_rejects_nan_and_missing_rows():
    ids, tids = ["a", "b"], ["t"]
    bad = torch.tensor([[1.0, 0.0], [float("nan"), 1.0]])
    ck = CheckpointFeatures(bad, ids, torch.ones(1, 2), tids, 1.0, "store-x")
    with pytest.raises(FeatureError, match="store-x \\(pool\\): row 1 \\(id 'b'\\) has NaN"):
        influence_matrix([ck], ids, tids)
    ok = CheckpointFeatures(torch.ones(2, 2), ids, torch.ones(1, 2), tids, 1.0, "store-y")
    with pytest.raises(FeatureError, match="no features for 1 example"):
        influence_matrix([ok], ids, ["t", "u"])


def test_random_is_seeded_and_balanced():
    groups = ["x"] * 50 + ["y"] * 5 + ["z"] * 20
    a = random_select(75, 30, 7, groups)
    assert a == random_select(75, 30, 7, groups) and len(set(a)) == 30
    assert Counter(groups[i] for i in a) == {"x": 13, "y": 5, "z": 12}
    assert balanced_quotas([50, 5, 20], 30) == [13, 5, 12]
    assert random_select(75, 30, 8) != random_select(75, 30, 7)
    with pytest.raises(ValueError):
        random_select(5, 6, 0)


def test_similarity_max_and_round_robin_by_hand():
    pool = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.8, 0.2], [0.05, 1.0], [0.2, 0.8]]), dim=1)
    tgt = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    idx, _ = similarity_select(pool, tgt, 3, "max")
    best = (pool @ tgt.T).max(dim=1).values
    assert idx == torch.argsort(best, descending=True)[:3].tolist()
    # round-robin: target 0 takes row 0, target 1 takes row 3, target 0 takes row 1, target 1 takes row 4
    idx, scores = similarity_select(pool, tgt, 4, "round-robin")
    assert idx == [0, 3, 1, 4]
    assert scores[1] == pytest.approx(float(pool[3] @ tgt[1]))


def test_position_weighted_mean_by_hand():
    hidden = torch.tensor([[[1.0], [2.0], [4.0]], [[3.0], [5.0], [100.0]]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    out = position_weighted_mean(hidden, mask)
    assert out[0, 0] == pytest.approx((1 * 1 + 2 * 2 + 3 * 4) / 6)
    assert out[1, 0] == pytest.approx((1 * 3 + 2 * 5) / 3)
