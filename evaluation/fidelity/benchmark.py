"""``iaif fidelity``: removal estimators against leave-group-out retraining on small models.

For each dataset-model pair (and, for non-convex models, each L2 regime): train to the optimum,
draw random and coherent groups, retrain without each group (batched, cached), evaluate the four
estimators, and report Spearman/Pearson correlations per estimator by group kind and size bucket
over the converged groups, a scatter plot per pair and regime, and ``results.json``. Pair-regimes
are independent: with ``jobs`` > 1 they run in separate processes, with the same results.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from iaif.common.progress import log_to_stderr
from iaif.common.provenance import write_run_info
from iaif.evaluation.fidelity.datasets import default_data_dir, load_split
from iaif.evaluation.fidelity.estimate import estimate_groups
from iaif.evaluation.fidelity.groups import GroupSettings, draw_groups, projected_gradients
from iaif.evaluation.fidelity.hessian import CurvatureKind, build_curvature, retraining_curvature
from iaif.evaluation.fidelity.models import FlatModel, ModelKind, build_model
from iaif.evaluation.fidelity.objective import Problem
from iaif.evaluation.fidelity.report import PairResult, markdown_table, scatter_plot, target_checks, write_results
from iaif.evaluation.fidelity.retrain import RETRAIN_SOLVER, FitSettings, RetrainCache, RetrainSettings, leave_group_out

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PairSpec:
    """One dataset-model pair."""

    dataset: str
    model: ModelKind
    hidden: tuple[int, ...] = ()
    activation: str = "tanh"
    l2: float = 1e-3
    n_train: int = 0
    n_target: int = 500
    downsample: int = 1
    curvature: CurvatureKind = "hessian"
    """curvature of the training objective: hessian | ggn (damped Gauss-Newton)"""
    seeds: int = 2
    """non-convex models: initialisations averaged (truth and estimates), unless the configuration's
    ``nonconvex_seeds`` sets the number for every pair; convex models use one"""
    fit: tuple[tuple[str, Any], ...] = ()
    """``FitSettings`` fields this pair sets over the configuration's ``fit`` (e.g. a continuation in L2)"""

    @property
    def convex(self) -> bool:
        return self.model == "logreg"

    def describe(self) -> str:
        arch = self.model + (f" {list(self.hidden)} {self.activation}" if self.hidden else "")
        return f"{self.dataset} / {arch} / L2 {self.l2:g}" + (" / GGN" if self.curvature == "ggn" else "")


PAIRS: dict[str, PairSpec] = {
    # with the data folder (the paper's kinds of pairs, sized for a 2-core CPU)
    "mnist_logreg": PairSpec("mnist", "logreg", l2=1e-3, n_train=3000, n_target=1000, downsample=2),
    "mnist_mlp": PairSpec("mnist", "mlp", (16,), l2=1e-2, n_train=2000, n_target=1000, downsample=2),
    "concrete_mlp": PairSpec("concrete", "mlp", (32,), l2=1e-2, n_target=230),
    "parkinsons_mlp": PairSpec("parkinsons", "mlp", (32,), l2=1e-2, n_train=2000, n_target=1000),
    "digits_mlp": PairSpec("digits", "mlp", (32,), l2=1e-2, n_target=397),
    # the CNNs use one seed: a CNN seed's retraining is most of the suite's CPU time (docs/BENCHMARKS.md)
    "mnist_resnet": PairSpec("mnist", "resnet", (2, 2, 2, 2), "gelu", l2=1e-2, n_train=1000, n_target=1000, downsample=4,
                             curvature="ggn", fit=(("continuation_l2", 1e-3),), seeds=1),  # from θ₀ at 0.01 it collapses to f = ln 10
    "digits_resnet": PairSpec("digits", "resnet", (4, 8, 8, 8), "gelu", l2=1e-2, n_target=397, seeds=1),
    # offline, scikit-learn's bundled sets only
    "breast_cancer_logreg": PairSpec("breast_cancer", "logreg", l2=1e-2, n_target=169),
    "digits_logreg": PairSpec("digits", "logreg", l2=1e-3, n_target=397),
    "diabetes_mlp": PairSpec("diabetes", "mlp", (16,), l2=1e-2, n_target=142),
    "wine_mlp": PairSpec("wine", "mlp", (8,), l2=1e-2, n_target=58),
}
DATA_SUITE = ("mnist_logreg", "mnist_mlp", "concrete_mlp", "parkinsons_mlp", "digits_mlp", "mnist_resnet")
OFFLINE_SUITE = ("breast_cancer_logreg", "digits_logreg", "digits_mlp", "diabetes_mlp", "wine_mlp", "digits_resnet")


@dataclass
class FidelityConfig:
    """Settings of the fidelity benchmark."""

    output_dir: str = "runs/fidelity"
    """folder for table.md, results.json, scatter plots, config.yaml and run_info.json"""
    data_dir: str = ""
    """data folder; empty = $IAIF_SHARED_DATA, else ../shared/data next to the repository"""
    pairs: list[str] = field(default_factory=list)
    """pairs to run (names in iaif.evaluation.fidelity.benchmark.PAIRS); empty = the default suite:
    the data-folder suite when the folder exists, else the scikit-learn suite"""
    seed: int = 0
    """seed of the data split, the groups and the first initialisation"""
    weak_l2: float = 1e-3
    """second L2 regime: every non-convex pair is also run with this L2 weight (0 = off)"""
    quick: bool = False
    """smoke preset: 3 random + 6 coherent groups on 3 sizes per pair, one seed (the tests use it)"""
    nonconvex_seeds: int = 0
    """non-convex models: initialisations averaged (truth and estimates); 0 = each pair's own number
    (2 for the MLPs, 1 for the CNNs); convex models use one"""
    nonconvex_start: str = "optimum"
    """non-convex retraining starts from: optimum (the seed's θ*, warm start) | init (the seed's θ₀)"""
    ihvp: str = "auto"
    """inverse-Hessian-vector products: exact | cg | auto (exact up to exact_max_params)"""
    damping: float = 0.0
    """δ in (H + δI)⁻¹"""
    exact_max_params: int = 4000
    """auto switches to conjugate gradient above this many parameters"""
    cg_tol: float = 1e-10
    """relative residual tolerance of conjugate gradient"""
    cg_maxiter: int = 1000
    """iteration cap of conjugate gradient"""
    groups: GroupSettings = field(default_factory=GroupSettings)
    """group kinds, counts and sizes"""
    fit: FitSettings = field(default_factory=FitSettings)
    """L-BFGS settings of the full training"""
    retrain: RetrainSettings = field(default_factory=RetrainSettings)
    """batched leave-group-out retraining (preconditioned L-BFGS, per-group convergence test)"""
    cache_dir: str = ""
    """retraining cache; empty = OUTPUT_DIR/cache"""
    threads: int = 1
    """torch intra-op threads per process (1 is fastest for these small models, far faster on a busy CPU)"""
    jobs: int = 0
    """pair-regimes computed at once, each in its own process with ``threads`` threads (0 = the CPU
    cores this process may use, divided by ``threads``); the results do not depend on it"""


def resolve_pairs(cfg: FidelityConfig) -> tuple[list[str], Path]:
    """The pairs to run and the data folder (checks every name)."""
    data_dir = Path(cfg.data_dir) if cfg.data_dir else default_data_dir()
    names = list(cfg.pairs) or list(DATA_SUITE if data_dir.is_dir() else OFFLINE_SUITE)
    unknown = [n for n in names if n not in PAIRS]
    if unknown:
        raise ValueError(f"pairs: unknown {unknown}; known: {', '.join(PAIRS)}")
    return names, data_dir


def regimes(names: list[str], cfg: FidelityConfig) -> list[tuple[str, PairSpec]]:
    """(result name, spec) per pair and L2 regime: non-convex pairs also at ``weak_l2``."""
    out = []
    for name in names:
        spec = PAIRS[name]
        specs = [spec] + ([replace(spec, l2=cfg.weak_l2)] if cfg.weak_l2 > 0 and not spec.convex and cfg.weak_l2 != spec.l2 else [])
        out += [(f"{name}_l2-{sp.l2:g}", sp) for sp in specs]
    return out


def pair_seeds(spec: PairSpec, cfg: FidelityConfig) -> list[int]:
    """The initialisations a pair averages: one when convex or ``quick``, else ``nonconvex_seeds`` or,
    with 0 there, the pair's own number."""
    count = 1 if spec.convex or cfg.quick else cfg.nonconvex_seeds or spec.seeds
    return [cfg.seed + s for s in range(count)]


def run_pair(name: str, spec: PairSpec, cfg: FidelityConfig, data_dir: Path, cache_root: Path) -> PairResult:
    """Train, draw groups, retrain (batched, cached) and estimate on one pair."""
    logger.info("pair %s: %s", name, spec.describe())
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    split = load_split(spec.dataset, data_dir, spec.n_train, spec.n_target, cfg.seed, spec.downsample)
    input_shape = split.image_shape or tuple(split.x_train.shape[1:])
    model = FlatModel(build_model(spec.model, input_shape, split.num_outputs, spec.hidden, spec.activation))
    problem = Problem(model, split, spec.l2)
    seeds = pair_seeds(spec, cfg)
    warm = spec.convex or cfg.nonconvex_start == "optimum"
    data_hash = hashlib.sha1(b"".join(t.numpy().tobytes() for t in (split.x_train, split.y_train, split.x_target, split.y_target)))
    fit_settings = replace(cfg.fit, **dict(spec.fit))
    # a seed's θ* and retrainings do not depend on how many seeds are averaged: the count stays out of the key
    per_seed_spec = {k: v for k, v in asdict(spec).items() if k != "seeds"}
    key = [per_seed_spec, data_hash.hexdigest(), cfg.seed, asdict(fit_settings), asdict(cfg.retrain), warm, RETRAIN_SOLVER,
           cfg.ihvp, cfg.damping, cfg.exact_max_params, cfg.cg_tol, cfg.cg_maxiter, torch.__version__]
    fingerprint = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    caches = [RetrainCache(cache_root / name, fingerprint, s) for s in seeds]
    inits = [model.init_params(s) for s in seeds]
    thetas = [c.full_model(problem, th0, fit_settings) for c, th0 in zip(caches, inits)]
    timings["train_full_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    grads = projected_gradients(problem, thetas[0], cfg.groups.projection_dim, cfg.seed)
    groups = draw_groups(split.class_labels(), split.x_train.numpy(), grads, cfg.groups, cfg.seed)
    index = [g.index for g in groups]
    timings["groups_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    curvatures = [build_curvature(problem, th, cfg.ihvp, cfg.damping, cfg.exact_max_params, cfg.cg_tol, cfg.cg_maxiter,  # type: ignore[arg-type]
                                  spec.curvature) for th in thetas]
    starting = [retraining_curvature(problem, th, c, cfg.damping, cfg.exact_max_params) for th, c in zip(thetas, curvatures)]
    timings["curvature_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    truth = leave_group_out(problem, index, thetas if warm else inits, thetas, starting, caches, cfg.retrain,
                            label=f"{name} retrain")
    timings["retrain_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    per_seed = [estimate_groups(problem, th, c, index, label=f"{name} estimate seed {s}")
                for s, (th, c) in enumerate(zip(thetas, curvatures))]
    timings["estimate_s"] = time.perf_counter() - t0
    raised, method = max(c.raised_eigenvalues for c in curvatures), curvatures[0].method
    converged = np.asarray(truth.converged.all(axis=1), dtype=bool)
    info = {"n": split.n, "m": len(split.y_target), "params": model.num_params, "seeds": seeds, "convex": spec.convex,
            "l2": spec.l2, "ihvp": method, "damping": cfg.damping, "raised_eigenvalues_max": raised,
            "f_full": [float(problem.target(t)) for t in thetas], "groups": len(index),
            "converged_groups": int(converged.sum()), "newton_finished": int(truth.newton.sum()),
            "newton_converged": int((truth.newton & truth.converged).sum()),
            "retrain_iterations_median": float(np.median(truth.iterations)),
            "retrain_iterations_max": int(truth.iterations.max()), "retrain_grad_max": float(truth.grad_max.max()), **timings}
    logger.info("%s: %s", name, info)
    return PairResult(name, spec.describe(), [g.kind for g in groups], [len(i) for i in index],
                      truth.delta.mean(axis=1), np.mean(per_seed, axis=0), info, converged)


def job_count(cfg: FidelityConfig, runs: int) -> int:
    """Processes for ``runs`` pair-regimes: ``cfg.jobs``, or with 0 the usable cores over ``threads``."""
    if cfg.jobs < 0:
        raise ValueError(f"jobs: {cfg.jobs} is negative (0 = one per available core)")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(runs, cfg.jobs or cores // max(cfg.threads, 1)))


def _start_worker(threads: int, level: int) -> None:
    torch.set_num_threads(threads)
    log_to_stderr(level)


def pair_results(runs: list[tuple[str, PairSpec]], cfg: FidelityConfig, data_dir: Path, cache_root: Path,
                 jobs: int) -> Iterator[PairResult]:
    """Each pair-regime's result as soon as it is ready: here, in order, with one job; else from a pool
    of ``jobs`` spawned processes, the CNN's regimes and the weak-L2 ones submitted first (they take
    most of the suite's time, so the others fill in around them). When one fails, the queued ones are
    cancelled, the running ones finish (their retrainings are cached) and the error is raised."""
    if jobs == 1:
        for run, spec in runs:
            yield run_pair(run, spec, cfg, data_dir, cache_root)
        return
    order = sorted(runs, key=lambda r: (r[1].model != "resnet", r[1].l2))
    logger.info("%d pair-regimes in %d processes: %s", len(runs), jobs, ", ".join(run for run, _ in order))
    pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
                               initargs=(cfg.threads, logging.getLogger().getEffectiveLevel()))
    try:
        futures = [pool.submit(run_pair, run, spec, cfg, data_dir, cache_root) for run, spec in order]
        for future in as_completed(futures):
            yield future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def run_fidelity(cfg: FidelityConfig) -> Path:
    """Run the benchmark; returns the output folder (table.md, results.json, scatter_*.png)."""
    names, data_dir = resolve_pairs(cfg)
    if cfg.nonconvex_seeds < 0:
        raise ValueError(f"nonconvex_seeds: {cfg.nonconvex_seeds} is negative (0 = each pair's own number)")
    if cfg.nonconvex_start not in ("optimum", "init"):
        raise ValueError(f"nonconvex_start: '{cfg.nonconvex_start}' is not one of optimum, init")
    if cfg.quick:
        cfg = replace(cfg, groups=replace(cfg.groups, random_groups=3, coherent_groups=6, num_sizes=3))
    runs = regimes(names, cfg)
    jobs = job_count(cfg, len(runs))
    out = Path(cfg.output_dir)
    write_run_info(out, cfg, "fidelity")
    cache_root = Path(cfg.cache_dir) if cfg.cache_dir else out / "cache"
    torch.set_num_threads(cfg.threads)
    start = time.perf_counter()
    convex = {run: spec.convex for run, spec in runs}
    done: dict[str, PairResult] = {}
    for res in pair_results(runs, cfg, data_dir, cache_root, jobs):
        done[res.name] = res
        scatter_plot(res, out / f"scatter_{res.name}.png")
        write_results([done[run] for run, _ in runs if run in done], convex, out)
    results = [done[run] for run, _ in runs]
    table = markdown_table(results)
    (out / "table.md").write_text(table + "\n")
    print(table)
    for res in results:
        checks = target_checks(res, convex[res.name])
        print(f"{res.name} ({res.info['converged_groups']}/{res.info['groups']} converged): "
              + ", ".join(f"{k} {v['value']:+.3f} ({'met' if v['met'] else 'MISSED'})" for k, v in checks.items()))
    print(f"total {time.perf_counter() - start:.0f} s in {jobs} process(es); output in {out}")
    return out
