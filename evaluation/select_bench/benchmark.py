"""``iaif select-bench``: selection on small models, retrained and measured (the paper's Figure 3).

For each dataset × seed × model: a base model is trained on a small random seed set; from it, the
pool's displacements u_a = (1/n) H⁻¹ g_a (exact training Hessian) and, per target, its validation
part's Φ, s and exact-H_f features (``features``). Each method picks k = ⌈budget · |pool|⌉ pool
examples (``methods``); a fresh model is trained on seed set ∪ picks with the same recipe
(``train``); the metric is the loss and accuracy on the target's test part, never seen by any
method. Writes results.json, table.md and one plot per dataset × model × target.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from iaif.common.provenance import write_run_info
from iaif.evaluation.fidelity.datasets import default_data_dir
from iaif.evaluation.fidelity.models import FlatModel, build_model
from iaif.evaluation.fidelity.retrain import FitSettings
from iaif.evaluation.select_bench.data import TARGETS, BenchData, DataSpec, load_bench_data
from iaif.evaluation.select_bench.features import pool_displacements, representation, target_features
from iaif.evaluation.select_bench.methods import METHODS, select
from iaif.evaluation.select_bench.report import INTERACTION, Row, aggregate, diagnostics_table, goal_check, markdown_tables, plot
from iaif.evaluation.select_bench.train import ModelSpec, SubsetTrainer

logger = logging.getLogger(__name__)

DATASETS: dict[str, DataSpec] = {
    # the 10k MNIST images of the data folder at 7×7: 3,000 training (100 seed + 2,900 pool), 2,000 held out
    "mnist": DataSpec("mnist", n_train=3000, n_heldout=2000, downsample=4, n_seed=100),
    # scikit-learn's 8×8 digits (1,797): 1,197 training (100 seed + 1,097 pool), 600 held out
    "digits": DataSpec("digits", n_train=0, n_heldout=600, downsample=1, n_seed=100),
}
MODELS: dict[str, ModelSpec] = {
    "logreg": ModelSpec("logreg", l2=1e-3),
    "mlp": ModelSpec("mlp", (16,), "tanh", l2=1e-3),
}


@dataclass
class SelectBenchConfig:
    """Settings of the small-model selection benchmark."""

    output_dir: str = "runs/select-bench"
    """folder for table.md, results.json, plot_*.png, config.yaml and run_info.json"""
    data_dir: str = ""
    """data folder (MNIST); empty = $IAIF_SHARED_DATA, else ../shared/data next to the repository"""
    datasets: list[str] = field(default_factory=lambda: list(DATASETS))
    """datasets (names in iaif.evaluation.select_bench.benchmark.DATASETS)"""
    models: list[str] = field(default_factory=lambda: list(MODELS))
    """models (names in iaif.evaluation.select_bench.benchmark.MODELS)"""
    targets: list[str] = field(default_factory=lambda: list(TARGETS))
    """plain (the held-out split) and/or shifted (a class-imbalanced part of it)"""
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    """interaction-exact, interaction-ef, first-order, random, similarity"""
    budgets: list[float] = field(default_factory=lambda: [0.01, 0.02, 0.05, 0.1, 0.2])
    """shares of the pool to select"""
    seeds: int = 3
    """runs per setting (seeds seed, seed+1, ...): data split, seed set, shifted classes, initialisation"""
    seed: int = 0
    """first seed"""
    lam: float | None = None
    """λ of the interaction methods; None: the default rule of iaif.selection.objective (× lam_factors)"""
    lam_factors: list[float] = field(default_factory=lambda: [1.0])
    """multipliers of the default λ; with several, each is tried and the one with the lowest loss on
    the target's validation part is kept (per seed, target and budget; the test part is never used)"""
    damping: float = 0.0
    """δ in (H + δI)⁻¹ of the training Hessian (eigenvalues are floored at the L2 weight anyway)"""
    heavy_classes: int = 3
    """shifted target: classes kept whole"""
    light_keep: float = 0.1
    """shifted target: share kept of every other class"""
    fit: FitSettings = field(default_factory=lambda: FitSettings(max_iter=1000, tol_grad=1e-6))
    """L-BFGS settings of every training (base model, retrainings)"""
    cache_dir: str = ""
    """trained-model cache; empty = OUTPUT_DIR/cache"""
    threads: int = 1
    """torch intra-op threads"""


def _check(cfg: SelectBenchConfig) -> None:
    for name, given, known in (("datasets", cfg.datasets, DATASETS), ("models", cfg.models, MODELS),
                               ("targets", cfg.targets, TARGETS), ("methods", cfg.methods, METHODS)):
        bad = [g for g in given if g not in known]
        if bad or not given:
            raise ValueError(f"{name}: unknown or empty {bad}; known: {', '.join(known)}")
    if not cfg.budgets or any(not 0 < b <= 1 for b in cfg.budgets):
        raise ValueError(f"budgets: every share must be in (0, 1], got {cfg.budgets}")
    if not cfg.lam_factors or any(not f > 0 for f in cfg.lam_factors):
        raise ValueError(f"lam_factors: give positive multipliers, got {cfg.lam_factors}")
    if cfg.seeds < 1:
        raise ValueError(f"seeds must be ≥ 1, got {cfg.seeds}")


def run_model(data: BenchData, ds: str, seed: int, model_name: str, cfg: SelectBenchConfig, cache: Path) -> list[Row]:
    """All targets × methods × budgets of one dataset, seed and model."""
    spec = MODELS[model_name]
    split = data.split
    model = FlatModel(build_model(spec.kind, split.image_shape or tuple(split.x_train.shape[1:]), split.num_outputs,
                                  spec.hidden, spec.activation))
    trainer = SubsetTrainer(model, split, spec, model.init_params(seed), cfg.fit, cache,
                            [DATASETS[ds].__dict__, seed, cfg.data_dir and "custom"])
    t0 = time.perf_counter()
    theta = trainer.fit(data.seed_index)
    seed_problem = trainer.problem(data.seed_index, split.x_target[:1], split.y_target[:1])
    u, raised = pool_displacements(seed_problem, theta, data.x(data.pool_index), data.y(data.pool_index), cfg.damping)
    pool_repr = representation(model, theta, data.x(data.pool_index))
    theta_all = trainer.fit(np.concatenate([data.seed_index, data.pool_index]))
    logger.info("%s/%s seed %d: base model and pool features in %.1f s (%d params, %d Hessian eigenvalues raised)",
                ds, model_name, seed, time.perf_counter() - t0, model.num_params, raised)
    rows: list[Row] = []
    n_pool = len(data.pool_index)
    pool_labels = data.y(data.pool_index).numpy().astype(np.int64)
    with torch.no_grad():
        base_wrong = model(theta, data.x(data.pool_index)).argmax(dim=1).numpy() != pool_labels  # misclassified by the base model
    for target in cfg.targets:
        ts = data.targets[target]
        common = {"dataset": ds, "model": model_name, "target": target, "seed": seed}

        def row(method: str, budget: float, k: int, th: torch.Tensor, picks: list[int] | None = None, lam: float | None = None,
                ts=ts, common=common) -> Row:
            val, _ = trainer.metrics(th, ts.x_val, ts.y_val)
            loss, acc = trainer.metrics(th, ts.x_test, ts.y_test)
            out = {**common, "method": method, "budget": budget, "k": k, "lam": lam, "test_loss": loss, "test_acc": acc,
                   "val_loss": val}
            if picks is not None:  # how the picks spread over classes (a diagnostic, not a metric)
                labels = pool_labels[picks]
                out["max_class_share"] = float(np.bincount(labels, minlength=split.num_outputs).max() / len(labels))
                out["heavy_class_share"] = float(np.isin(labels, ts.heavy_classes).mean()) if ts.heavy_classes else None
                out["base_wrong_share"] = float(base_wrong[picks].mean())
            return out

        rows += [row("base", 0.0, 0, theta), row("all-pool", 1.0, n_pool, theta_all)]
        t0 = time.perf_counter()
        feats = target_features(trainer.problem(data.seed_index, ts.x_val, ts.y_val), theta, u)
        target_repr = representation(model, theta, ts.x_val)
        logger.info("  target %s (validation %d, test %d, heavy classes %s): features in %.1f s, H_f %s (rank %d)",
                    target, len(ts.y_val), len(ts.y_test), list(ts.heavy_classes), time.perf_counter() - t0,
                    feats.target_curvature, feats.psi.shape[1])
        for method in cfg.methods:
            t0, trained0 = time.perf_counter(), trainer.trained
            losses = []
            factors = cfg.lam_factors if method in INTERACTION and cfg.lam is None else [1.0]
            for budget in cfg.budgets:
                k = math.ceil(budget * n_pool)
                tried = []
                for factor in factors:
                    picks = select(method, k, feats, pool_repr, target_repr, seed, cfg.lam, factor)
                    th = trainer.fit(np.concatenate([data.seed_index, data.pool_index[picks.indices]]))
                    tried.append({**row(method, budget, k, th, picks.indices, picks.lam), "lam_factor": factor})
                best = min(tried, key=lambda r: r["val_loss"])  # λ chosen on the validation part only
                rows.append({**best, "validation_choice": [{f: r[f] for f in ("lam_factor", "lam", "val_loss")} for r in tried]}
                            if len(tried) > 1 else best)
                losses.append(best["test_loss"])
            logger.info("    %-17s test loss %s  (%.1f s, %d trained)", method, " ".join(f"{v:.4f}" for v in losses),
                        time.perf_counter() - t0, trainer.trained - trained0)
    return rows


def run_select_bench(cfg: SelectBenchConfig) -> Path:
    """Run the benchmark; returns the output folder (module docstring)."""
    _check(cfg)
    out = Path(cfg.output_dir)
    write_run_info(out, cfg, "select-bench")
    cache = Path(cfg.cache_dir) if cfg.cache_dir else out / "cache"
    data_dir = Path(cfg.data_dir) if cfg.data_dir else default_data_dir()
    torch.set_num_threads(cfg.threads)
    logging.getLogger("iaif.selection.greedy").setLevel(logging.WARNING)  # one line per greedy run is noise here
    start = time.perf_counter()
    rows: list[Row] = []
    for ds in cfg.datasets:
        for seed in range(cfg.seed, cfg.seed + cfg.seeds):
            data = load_bench_data(DATASETS[ds], data_dir, seed, cfg.heavy_classes, cfg.light_keep)
            for model_name in cfg.models:
                rows += run_model(data, ds, seed, model_name, cfg, cache)
    agg = aggregate(rows)
    table = markdown_tables(agg)
    goal = goal_check(agg)
    (out / "table.md").write_text(f"{table}\n\nHow the picks spread (means over seeds):\n\n{diagnostics_table(agg)}\n")
    summary = [{"dataset": k[0], "model": k[1], "target": k[2], "method": k[3], "budget": k[4], **v} for k, v in agg.items()]
    results = {"rows": rows, "summary": summary, "goal": goal, "seconds": round(time.perf_counter() - start, 1),
               "datasets": {d: DATASETS[d].__dict__ for d in cfg.datasets},
               "models": {m: MODELS[m].__dict__ for m in cfg.models}}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    for setting in sorted({k[:3] for k in agg}):
        plot(agg, setting, out / f"plot_{'_'.join(setting)}.png")
    print(table)
    for method, g in goal.items():
        print(f"goal ({method} below first-order and random at every budget ≥ 2 %): {g['met']}/{g['cells']} cells")
    print(f"total {time.perf_counter() - start:.0f} s; output in {out}")
    return out
