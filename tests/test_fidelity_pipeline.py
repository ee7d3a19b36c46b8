"""Fidelity benchmark plumbing: data loaders, groups, the retraining cache, the stage end to end."""

from __future__ import annotations

import gzip
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from iaif.evaluation.fidelity import retrain
from iaif.evaluation.fidelity.benchmark import FidelityConfig, run_fidelity
from iaif.evaluation.fidelity.datasets import load_split, read_idx
from iaif.evaluation.fidelity.groups import GroupSettings, draw_groups, size_grid
from iaif.evaluation.fidelity.report import SUBSETS
from iaif.training.data import DataError


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_shared_data_loaders(shared_data):
    mnist = load_split("mnist", shared_data, 500, 200, seed=0, downsample=2)
    assert mnist.x_train.shape == (500, 1, 14, 14) and mnist.x_target.shape == (200, 1, 14, 14)
    assert mnist.num_outputs == 10 and mnist.task == "multiclass"
    concrete = load_split("concrete", shared_data, 0, 230, seed=0)
    assert concrete.x_train.shape == (800, 8) and concrete.task == "regression"
    assert abs(float(concrete.y_train.mean())) < 1e-9  # standardised with training statistics
    parkinsons = load_split("parkinsons", shared_data, 1000, 500, seed=0)
    assert parkinsons.x_train.shape == (1000, 19)


def test_bad_inputs_name_file_line_and_field(tmp_path):
    bad = tmp_path / "uci_concrete"
    bad.mkdir()
    (bad / "Concrete_Data.csv").write_text("a;b;Concrete compressive strength\n1;2;3\n4;x;6\n")
    with pytest.raises(DataError, match=r"Concrete_Data.csv:3: field 'b'"):
        load_split("concrete", tmp_path, 0, 1, seed=0)
    idx = tmp_path / "bad-idx.gz"
    with gzip.open(idx, "wb") as fh:
        fh.write(b"\x00\x00\x08\x01\x00\x00\x00\x05abc")
    with pytest.raises(DataError, match="header says"):
        read_idx(idx)
    with pytest.raises(ValueError, match="unknown dataset"):
        load_split("imagenet", tmp_path, 0, 1, seed=0)


def test_groups_sizes_kinds_and_coherence():
    rng = np.random.default_rng(0)
    labels = rng.integers(4, size=400)
    feats = rng.normal(size=(400, 5)) + labels[:, None]
    settings = GroupSettings(random_groups=10, coherent_groups=12, clusters=4, num_sizes=5)
    groups = draw_groups(labels, feats, rng.normal(size=(400, 8)), settings, seed=0)
    grid = size_grid(400, settings.min_fraction, settings.max_fraction, settings.num_sizes)
    assert grid[0] == 1 and grid[-1] == 100
    assert len({tuple(g.index) for g in groups}) == len(groups) == 22
    assert {g.kind for g in groups} == {"random", "class", "feature_cluster", "gradient_cluster"}
    for g in groups:
        assert len(np.unique(g.index)) == len(g.index) and len(g.index) in grid
        if g.kind == "class":
            assert len(np.unique(labels[g.index])) == 1


def test_run_fidelity_writes_outputs_and_reuses_the_cache(tmp_path, monkeypatch):
    cfg = FidelityConfig(output_dir=str(tmp_path / "out"), pairs=["breast_cancer_logreg"], quick=True)
    out = run_fidelity(cfg)
    for name in ("table.md", "results.json", "scatter_breast_cancer_logreg_l2-0.01.png", "run_info.json", "config.yaml"):
        assert (out / name).is_file()
    first = json.loads((out / "results.json").read_text())["pairs"]["breast_cancer_logreg_l2-0.01"]
    assert len(first["groups"]) == 9  # the quick preset: 3 random + 6 coherent
    assert set(first["correlations"]["interaction_exact"]) == set(SUBSETS)
    assert first["info"]["converged_groups"] == sum(g["converged"] for g in first["groups"]) == 9

    def no_training(*args, **kwargs):
        raise AssertionError("a rerun must take every retraining from the cache")

    monkeypatch.setattr(retrain, "fit", no_training)
    monkeypatch.setattr(retrain, "batched_retrain", no_training)
    again = json.loads((run_fidelity(cfg) / "results.json").read_text())["pairs"]["breast_cancer_logreg_l2-0.01"]
    assert [g["actual"] for g in again["groups"]] == [g["actual"] for g in first["groups"]]


def test_unknown_pair_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="unknown"):
        run_fidelity(FidelityConfig(output_dir=str(tmp_path), pairs=["nope"]))


def test_retrain_cache_loads_theta_with_weights_only_explicitly(tmp_path, monkeypatch):
    """torch < 2.6 (allowed by pyproject) unpickles arbitrary objects unless weights_only=True is passed."""
    cache = retrain.RetrainCache(tmp_path, "pair", 0)
    torch.save(torch.arange(3.0), cache.theta_path)
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    theta = cache.full_model(problem=None, theta0=None, settings=None)
    assert torch.equal(theta, torch.arange(3.0))
    assert [c.get("weights_only") for c in calls] == [True]


def test_weak_l2_regime_runs_non_convex_pairs_twice():
    from iaif.evaluation.fidelity.benchmark import regimes

    runs = regimes(["breast_cancer_logreg", "wine_mlp"], FidelityConfig(weak_l2=1e-3))
    assert [name for name, _ in runs] == ["breast_cancer_logreg_l2-0.01", "wine_mlp_l2-0.01", "wine_mlp_l2-0.001"]
    assert [spec.l2 for _, spec in runs] == [0.01, 0.01, 0.001]


def test_pair_regimes_in_two_processes_give_the_one_process_results(tmp_path):
    """jobs only decides where a pair-regime is computed: results.json is the same, timings aside."""
    def results(jobs: int) -> dict:
        cfg = FidelityConfig(output_dir=str(tmp_path / f"jobs{jobs}"), pairs=["breast_cancer_logreg", "wine_mlp"],
                             quick=True, jobs=jobs)
        pairs = json.loads((run_fidelity(cfg) / "results.json").read_text())["pairs"]
        for pair in pairs.values():
            pair["info"] = {k: v for k, v in pair["info"].items() if not k.endswith("_s")}
        return pairs

    one, two = results(1), results(2)
    assert list(one) == ["breast_cancer_logreg_l2-0.01", "wine_mlp_l2-0.01", "wine_mlp_l2-0.001"]
    assert two == one


def test_negative_jobs_is_an_error_naming_the_setting(tmp_path):
    with pytest.raises(ValueError, match="jobs: -1"):
        run_fidelity(FidelityConfig(output_dir=str(tmp_path), pairs=["wine_mlp"], jobs=-1))


def test_seeds_per_pair_unless_the_configuration_sets_them(tmp_path):
    from iaif.evaluation.fidelity.benchmark import PAIRS, pair_seeds

    default, three = FidelityConfig(seed=5), FidelityConfig(seed=5, nonconvex_seeds=3)
    assert pair_seeds(PAIRS["mnist_mlp"], default) == [5, 6]
    assert pair_seeds(PAIRS["mnist_resnet"], default) == [5]
    assert pair_seeds(PAIRS["mnist_resnet"], three) == pair_seeds(PAIRS["wine_mlp"], three) == [5, 6, 7]
    assert pair_seeds(PAIRS["mnist_logreg"], three) == [5]
    assert pair_seeds(PAIRS["wine_mlp"], FidelityConfig(quick=True, nonconvex_seeds=3)) == [0]
    with pytest.raises(ValueError, match="nonconvex_seeds: -1"):
        run_fidelity(FidelityConfig(output_dir=str(tmp_path), pairs=["wine_mlp"], nonconvex_seeds=-1))


def test_more_seeds_reuse_the_retrainings_of_fewer(tmp_path, monkeypatch):
    """The cache fingerprint leaves out the seed count (the pair's and the configuration's): going
    from one seed to two retrains only seed 1."""
    from iaif.evaluation.fidelity import benchmark

    small = GroupSettings(random_groups=2, coherent_groups=3, num_sizes=2)
    cfg = FidelityConfig(output_dir=str(tmp_path / "one"), cache_dir=str(tmp_path / "cache"), pairs=["wine_mlp"],
                         weak_l2=0.0, groups=small, jobs=1)
    monkeypatch.setitem(benchmark.PAIRS, "wine_mlp", replace(benchmark.PAIRS["wine_mlp"], seeds=1))
    run_fidelity(cfg)
    seed0 = next((tmp_path / "cache").glob("*/*-seed0.json"))
    first = seed0.read_text()
    monkeypatch.setitem(benchmark.PAIRS, "wine_mlp", replace(benchmark.PAIRS["wine_mlp"], seeds=2))
    run_fidelity(replace(cfg, output_dir=str(tmp_path / "two")))
    run_fidelity(replace(cfg, output_dir=str(tmp_path / "three"), nonconvex_seeds=2))
    files = sorted(p.name for p in seed0.parent.iterdir())
    fingerprint = seed0.name.split("-seed")[0]
    assert files == [f"{fingerprint}-seed{s}{ext}" for s in (0, 1) for ext in ("-theta.pt", ".json")]
    assert seed0.read_text() == first
