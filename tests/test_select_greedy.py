"""The selector against independent computation: brute-force greedy on J from scratch, explicit
quadratic forms, duplicates, λ = 0, multi-task sum and round-robin."""

from __future__ import annotations

import math

import pytest
import torch

from iaif.selection.estimators import marginal_gain, pairwise_kappa, selection_objective
from iaif.selection.greedy import greedy_select
from iaif.selection.objective import Objective, TaskTerms, build_objectives, default_lambda


def _phi(n: int = 120, m: int = 10, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.3 * torch.randn(n, m, generator=g) + 0.15


def _brute_force_greedy(score_fns, n: int, k: int) -> list[tuple[int, float]]:
    """Greedy on J computed from scratch: score_fns[t](A) is task t's J(A); step i serves task i mod T."""
    chosen: list[int] = []
    out = []
    for step in range(k):
        J = score_fns[step % len(score_fns)]
        base = J(chosen)
        gains = {c: J(chosen + [c]) - base for c in range(n) if c not in chosen}
        best = max(gains, key=gains.get)
        chosen.append(best)
        out.append((best, gains[best]))
    return out


def _ef_J(phi: torch.Tensor, lam: float, scores: torch.Tensor | None = None):
    def J(A: list[int]) -> float:
        return 0.0 if not A else selection_objective(phi[A], lam, None if scores is None else scores[A])
    return J


@pytest.mark.parametrize("lam", [0.0, 0.7, 4.0])
@pytest.mark.parametrize("shortlist", [3, 1024])
def test_every_gain_equals_objective_difference_from_scratch(lam, shortlist):
    phi = _phi()
    result = greedy_select([Objective(phi.mean(dim=1), phi, lam)], 25, shortlist=shortlist, basis_rank=3,
                           progress=False)
    expected = _brute_force_greedy([_ef_J(phi, lam)], phi.shape[0], 25)
    assert result.indices == [c for c, _ in expected]
    for step, (_, gain) in zip(result.steps, expected):
        assert step.gain == pytest.approx(gain, abs=1e-5)
        assert step.first_order - step.interaction == pytest.approx(step.gain, abs=1e-6)
        assert step.first_order == pytest.approx(float(phi[step.index].mean()), abs=1e-6)
    assert sum(s.gain for s in result.steps) == pytest.approx(_ef_J(phi, lam)(result.indices), abs=1e-4)


def test_ef_kappa_equals_explicit_quadratic_form():
    g = torch.Generator().manual_seed(1)
    p, m = 7, 5
    u = torch.randn(4, p, generator=g, dtype=torch.float64)  # displacements u_a
    grads = torch.randn(m, p, generator=g, dtype=torch.float64)  # target gradients g_t
    h_f = grads.T @ grads / m  # empirical Fisher over the targets
    phi = u @ grads.T  # φ_{a,t} = g_tᵀ u_a
    explicit = u @ h_f @ u.T
    assert torch.allclose(pairwise_kappa(phi, phi), explicit)
    group = [0, 2, 3]
    half_sum = 0.5 * explicit[group][:, group].sum()
    j = selection_objective(phi[group], 2.0)
    assert j == pytest.approx(float(phi[group].mean(dim=1).sum() - 2.0 * half_sum))


def test_identity_scale_is_the_parameter_form():
    u = _phi(30, 6, seed=2)
    s = torch.linspace(0.2, 0.5, 30)
    result = greedy_select([Objective(s, u, 0.3, scale=1.0)], 8, shortlist=2, progress=False)

    def J(A):
        return 0.0 if not A else float(s[A].sum() - 0.15 * (u[A].sum(0) @ u[A].sum(0)))

    expected = _brute_force_greedy([J], 30, 8)
    assert result.indices == [c for c, _ in expected]
    assert [st.gain for st in result.steps] == pytest.approx([gn for _, gn in expected], abs=1e-5)


def test_duplicates_interaction_picks_fewer_than_first_order():
    g = torch.Generator().manual_seed(3)
    m = 12
    base = 0.2 * torch.randn(60, m, generator=g) + 0.1
    star = base[0] + 0.6 * torch.rand(m, generator=g)  # one very helpful example ...
    phi = torch.cat([star.repeat(8, 1), base])  # ... present 8 times
    k = 10
    scores = phi.mean(dim=1)
    top_k = torch.topk(scores, k).indices.tolist()
    first = greedy_select([Objective(scores, phi, 0.0)], k, shortlist=4, progress=False)
    assert set(first.indices) == set(top_k)  # λ = 0 is first-order top-k (the 8 copies tie)
    assert [s.gain for s in first.steps] == pytest.approx(torch.topk(scores, k).values.tolist())
    lam = default_lambda(scores, phi, k, None)
    inter = greedy_select([Objective(scores, phi, lam)], k, shortlist=4, progress=False)
    dups = lambda idx: sum(1 for i in idx if i < 8)  # noqa: E731
    assert dups(first.indices) == 8
    assert dups(inter.indices) < dups(first.indices)


def test_lambda_zero_is_top_k_in_order():
    phi = _phi(500, 16, seed=9)
    scores = phi.mean(dim=1)
    result = greedy_select([Objective(scores, phi, 0.0)], 60, shortlist=16, progress=False)
    assert result.indices == torch.topk(scores, 60).indices.tolist()
    assert all(s.interaction == 0 for s in result.steps)


def test_default_lambda_puts_top_k_at_saturation():
    phi = _phi(80, 9, seed=4)
    scores = phi.mean(dim=1)
    k = 10
    lam = default_lambda(scores, phi, k, None)
    top = torch.topk(scores, k).indices
    s_k = float(scores[top].sum())
    assert selection_objective(phi[top], lam) == pytest.approx(s_k / 2, rel=1e-5)
    # d/dt J(t·T_k) = 0 at t = 1
    cum = phi[top].sum(0)
    assert s_k - lam * float(cum @ cum) / phi.shape[1] == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(ValueError, match="set lam explicitly"):
        default_lambda(-scores.abs(), phi, k, None)


def _two_tasks():
    phi = _phi(70, 10, seed=5)
    cols = {"a": slice(0, 4), "b": slice(4, 10)}
    return phi, cols


def test_multitask_sum_equals_sum_of_task_objectives():
    phi, cols = _two_tasks()
    tasks = [TaskTerms(t, phi[:, c].mean(dim=1), c, None) for t, c in cols.items()]
    objs, lams = build_objectives(tasks, phi.clone(), 12, "sum", None, 1.0)
    assert len(objs) == 1 and lams["a"] != lams["b"]  # default λ per task, k_τ = k
    assert lams["b"] == pytest.approx(default_lambda(tasks[1].scores, phi[:, cols["b"]], 12, None))
    total = lambda A: sum(_ef_J(phi[:, c], lams[t])(A) for t, c in cols.items())  # noqa: E731
    result = greedy_select(objs, 12, shortlist=3, progress=False)
    expected = _brute_force_greedy([total], 70, 12)
    assert result.indices == [c for c, _ in expected]
    assert [s.gain for s in result.steps] == pytest.approx([g for _, g in expected], abs=1e-5)
    assert objs[0].value(result.indices) == pytest.approx(total(result.indices), abs=1e-5)


def test_multitask_round_robin_serves_tasks_in_turn():
    phi, cols = _two_tasks()
    tasks = [TaskTerms(t, phi[:, c].mean(dim=1), c, None) for t, c in cols.items()]
    objs, lams = build_objectives(tasks, phi, 9, "round-robin", None, 1.0)
    assert [o.name for o in objs] == ["a", "b"]
    # λ rule under round-robin uses k_τ = ceil(k / T)
    assert lams["a"] == pytest.approx(default_lambda(tasks[0].scores, phi[:, cols["a"]], math.ceil(9 / 2), None))
    result = greedy_select(objs, 9, shortlist=2, progress=False)
    fns = [_ef_J(phi[:, cols[t]], lams[t]) for t in ("a", "b")]
    expected = _brute_force_greedy(fns, 70, 9)
    assert result.indices == [c for c, _ in expected]
    assert [s.task for s in result.steps] == ["a", "b"] * 4 + ["a"]
    assert [s.gain for s in result.steps] == pytest.approx([g for _, g in expected], abs=1e-5)


def test_stochastic_greedy_gains_are_exact_and_seeded():
    phi = _phi(200, 8, seed=6)
    obj = Objective(phi.mean(dim=1), phi, 1.0)
    a = greedy_select([obj], 15, kind="stochastic", epsilon=0.05, seed=3, progress=False)
    b = greedy_select([obj], 15, kind="stochastic", epsilon=0.05, seed=3, progress=False)
    assert a.indices == b.indices and len(set(a.indices)) == 15
    J = _ef_J(phi, 1.0)
    for i, step in enumerate(a.steps):
        assert step.gain == pytest.approx(J(a.indices[: i + 1]) - J(a.indices[:i]), abs=1e-5)


@pytest.mark.parametrize("k", [0, 11])
def test_bad_k(k):
    phi = _phi(10, 3)
    with pytest.raises(ValueError, match="k must be between 1 and the pool size 10"):
        greedy_select([Objective(phi.mean(1), phi, 1.0)], k, progress=False)


def test_nan_scores_rejected():
    phi = _phi(10, 3)
    s = phi.mean(1)
    s[3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        greedy_select([Objective(s, phi, 1.0)], 2, progress=False)


def test_nan_features_rejected():
    phi = _phi(10, 3)
    s = phi.mean(1)
    phi[7, 1] = float("inf")
    with pytest.raises(ValueError, match="row 7 are NaN or inf"):
        greedy_select([Objective(s, phi, 1.0)], 2, progress=False)


# ---------------------------------------------------------------- ties (issue 12, item 2)


def _straightforward_greedy(objectives: list[Objective], k: int) -> list[tuple[int, float]]:
    """The straightforward loop: every step recomputes every gain; the largest wins, and among equal
    gains the lowest index (torch.argmax returns the first maximum)."""
    n = objectives[0].scores.shape[0]
    cums = [torch.zeros(o.curv.shape[1]) for o in objectives]
    selected = torch.zeros(n, dtype=torch.bool)
    out = []
    for step in range(k):
        t = step % len(objectives)
        o = objectives[t]
        gain, _ = marginal_gain(o.scores, o.curv, cums[t], o.lam, o.scale)
        gain = gain.masked_fill(selected, -math.inf)
        best = int(torch.argmax(gain))
        selected[best] = True
        for obj, cum in zip(objectives, cums):
            cum += obj.curv[best]
        out.append((best, float(gain[best])))
    return out


def _duplicate_pool(copies: int, distinct: int, q: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    row = torch.rand(q, generator=g)
    return torch.cat([row.repeat(copies, 1), torch.rand(distinct, q, generator=g)])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("shortlist", [1, 8, 1024])
def test_ties_outnumbering_the_shortlist_terminate_with_the_straightforward_sequence(shortlist):
    phi = _duplicate_pool(5000, 6, 8, seed=0)
    for lam in (0.0, 1.0, 50.0):
        objs = [Objective(phi.mean(dim=1), phi, lam)]
        result = greedy_select(objs, 20, shortlist=shortlist, progress=False, block=1 + shortlist % 7)
        expected = _straightforward_greedy(objs, 20)
        assert result.indices == [c for c, _ in expected]
        assert [s.gain for s in result.steps] == [gn for _, gn in expected]
        copies = [i for i in result.indices if i < 5000]
        assert copies == sorted(copies)  # equal gains: lowest index first


@pytest.mark.timeout(60)
def test_all_rows_identical_pick_in_index_order():
    phi = torch.full((3000, 5), 0.25)
    result = greedy_select([Objective(phi.mean(dim=1), phi, 2.0)], 12, shortlist=1, progress=False)
    assert result.indices == list(range(12))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("tasks", [1, 2])
def test_blocks_of_proposed_steps_pick_what_single_steps_pick(tasks):
    """Blocks (one process: the exchange is with itself) on a pool where proposals often fail: few
    candidates proposed, strong interaction, so a rank's own best often beats the proposal and the
    speculative steps past it are rewound. Same picks, gains and interaction parts as one step at a
    time; fewer exchanges than steps."""
    phi = _phi(400, 6, seed=3)
    objs = [Objective(phi[:, t:].mean(dim=1), phi[:, t:], lam, name=f"t{t}") for t, lam in zip(range(tasks), (3.0, 8.0))]
    ref = greedy_select(objs, 80, shortlist=4, basis_rank=2, progress=False)
    for block in (2, 5, 16):
        got = greedy_select(objs, 80, shortlist=4, basis_rank=2, progress=False, block=block)
        assert got.indices == ref.indices
        assert [(s.gain, s.interaction, s.task) for s in got.steps] == [(s.gain, s.interaction, s.task) for s in ref.steps]
        assert 0 < got.blocks < 80 and ref.blocks == 0


@pytest.mark.timeout(60)
def test_a_rewound_tracker_goes_on_as_the_straightforward_loop():
    """What a rank does when the other ranks agree on fewer steps than it took: picks taken back
    (some after refreshes that left them out of the bounded candidates) must be candidates again, and
    greedy from there on must pick what the straightforward loop picks after the picks that remain,
    down to the last row of the pool."""
    from iaif.selection.greedy import ExactTracker

    g = torch.Generator().manual_seed(5)
    n = 40
    phi = _phi(n, 5, seed=4)
    for _case in range(30):
        obj = Objective(phi.mean(dim=1), phi, (0.0, 0.5, 6.0)[_case % 3])
        selected = torch.zeros(n, dtype=torch.bool)
        tracker = ExactTracker(obj, selected, shortlist=3, basis_rank=1, chunk_rows=16, seed=0)
        picks, cums = [], []
        for _ in range(int(torch.randint(2, 12, (1,), generator=g))):
            local, _, _ = tracker.best()
            if torch.rand(1, generator=g) < 0.5:  # another rank's pick: the best-scored row off the shortlist
                off = ~selected
                off[tracker.short_idx] = False
                local = int(torch.argmax(obj.scores.masked_fill(~off, -math.inf)))
            i = local
            cums.append(tracker.cum.clone())
            selected[i] = True
            tracker.add(i, i, phi[i])
            picks.append(i)
        keep = int(torch.randint(0, len(picks), (1,), generator=g))
        selected[picks[keep:]] = False
        tracker.rewind(cums[keep], picks[keep:])
        assert tracker.free == n - keep
        cum = torch.zeros(5)
        for i in picks[:keep]:  # in pick order, as the tracker added them
            cum += phi[i]
        for _ in range(n - keep):
            gain, _ = marginal_gain(obj.scores, phi, cum, obj.lam)
            gain = gain.masked_fill(selected, -math.inf)
            local, best, _ = tracker.best()
            assert (local, best) == (int(torch.argmax(gain)), float(gain.max())), _case
            selected[local] = True
            tracker.add(local, local, phi[local])
            cum += phi[local]


def test_block_below_one_is_refused():
    phi = _phi(10, 3)
    with pytest.raises(ValueError, match="block: must be ≥ 1.*got 0"):
        greedy_select([Objective(phi.mean(1), phi, 1.0)], 2, block=0, progress=False)


@pytest.mark.parametrize("shortlist", [0, -3])
def test_shortlist_below_one_is_refused(shortlist):
    phi = _phi(10, 3)
    with pytest.raises(ValueError, match=f"shortlist: must be ≥ 1.*got {shortlist}"):
        greedy_select([Objective(phi.mean(1), phi, 1.0)], 2, shortlist=shortlist, progress=False)


@pytest.mark.timeout(120)
def test_exact_greedy_equals_straightforward_loop_on_random_pools_with_many_duplicates():
    """Property test (seeded random cases): pools made of a few distinct rows repeated many times,
    random λ, shortlist, basis rank, one or two round-robin objectives; the exact greedy must pick
    exactly the straightforward loop's sequence with exactly its gains."""
    rng = torch.Generator().manual_seed(12)

    def draw(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, (1,), generator=rng))

    for _case in range(60):
        q = draw(1, 6)
        distinct = torch.randn(draw(1, 12), q, generator=rng) * 0.5 + 0.2
        rows = distinct[torch.randint(len(distinct), (draw(5, 400),), generator=rng)]
        n = rows.shape[0]
        objs = []
        for t in range(draw(1, 2)):
            lam = [0.0, 0.3, 1.0, 5.0, 40.0][draw(0, 4)]
            scores = rows.mean(dim=1) if t == 0 else rows[:, 0] * 0.5
            objs.append(Objective(scores, rows, lam, name=f"t{t}"))
        k = draw(1, min(n, 40))
        shortlist = draw(1, 6)
        block = (1, 2, 3, 8)[_case % 4]  # > 1: steps proposed from exchanged candidates, verified, rewound
        result = greedy_select(objs, k, shortlist=shortlist, basis_rank=draw(0, 3), chunk_rows=draw(7, 128),
                               progress=False, block=block)
        expected = _straightforward_greedy(objs, k)
        assert result.indices == [c for c, _ in expected], (_case, n, q, shortlist, block)
        assert [s.gain for s in result.steps] == [gn for _, gn in expected]
