"""``iaif select``: choose k examples of a pool (interaction-aware greedy or a baseline) and write
``selected.jsonl`` (each original record unchanged plus ``_iaif``) and ``summary.json``.

Methods: ``interaction`` (greedy on J(A) = Σ s − (λ/2) Σ κ, ``iaif.selection.objective``),
``first-order`` (the same selector with λ = 0: top-k by individual influence), ``less`` (mean over
each (task, subtask) group of target examples, max over all groups, top-k), ``random``, ``rds``
(base-model hidden states), ``embed`` (sentence-transformers). Subtask: the target record's
``subtask`` or ``meta.subtask`` field, else its task.
Curvature ``identity`` holds N × (checkpoints · d) features in memory: meant for small d.
Outputs are written to temporary names and renamed at the end: a failed run leaves nothing half-written.

Under ``accelerate launch`` with several processes, ``interaction`` and ``first-order`` shard the
candidates (``iaif.selection.shard``): each process builds Φ / ψ for its slice only and the greedy runs
over all of them, with the same picks as one process; the other methods run in process 0 alone. Only
process 0 writes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import tyro

from iaif.common.atomic import temp_path
from iaif.common.contracts import SELECTED_FILE, CheckpointStores
from iaif.common.contracts import SELECTION_SUMMARY_FILE as SUMMARY_FILE
from iaif.common.provenance import CONFIG_FILE, RUN_INFO_FILE, config_to_dict, write_run_info
from iaif.selection.curvature import Curvature, FeatureSource, influence_terms
from iaif.selection.influence import (
    CheckpointFeatures,
    FeatureGeometry,
    group_columns,
    influence_matrix,
)
from iaif.selection.objective import Combine, LamBudget, TaskTerms, build_objectives
from iaif.training.data import DataConfig, Example, TextFormat, load_examples

logger = logging.getLogger(__name__)

Method = Literal["interaction", "less", "first-order", "random", "rds", "embed", "airrep"]
"""The selection methods, the one list (the pipeline compares them all by default)."""
SHARDED_METHODS = ("interaction", "first-order")
"""Methods that split the candidates over the processes of a launch."""
META_FIELD = "_iaif"


@dataclass
class SelectConfig:
    """Settings of `iaif select`."""

    method: Method = "interaction"
    """interaction | first-order | less | random | rds | embed."""
    pool: DataConfig = field(default_factory=DataConfig)
    """The candidate pool (its ids match the pool feature stores' rows)."""
    targets: list[str] = field(default_factory=list)
    """Target data files (task of each example: its `task` field, else the file stem)."""
    output_dir: str = "runs/select"
    """Folder for selected.jsonl, summary.json, config.yaml, run_info.json."""
    k: int | None = None
    """Number of examples to select (give k or fraction)."""
    fraction: float | None = None
    """Share of the pool to select, e.g. 0.05 (rounded up)."""
    checkpoints: Annotated[list[CheckpointStores], tyro.conf.Suppress] = field(default_factory=list)
    """YAML only: the feature stores of each warm-up checkpoint (pool, targets, sampled_targets,
    checkpoint, adapter_hash); or give the flat lists below."""
    pool_stores: list[str] = field(default_factory=list)
    """Pool feature stores (Adam features), one per warm-up checkpoint."""
    target_stores: list[str] = field(default_factory=list)
    """Target feature stores (gradients), one or more per checkpoint (paired by adapter hash)."""
    sampled_target_stores: list[str] = field(default_factory=list)
    """Sampled-label target stores for curvature=gn; row ids are '<target id>' or '<target id>#<r>'."""
    curvature: Curvature = "ef"
    """Target curvature: ef (empirical Fisher over target features), gn (sampled-label Gauss-Newton),
    identity (identity in feature space: κ = Σ_c η̄_c cos(Γ_a, Γ_b))."""
    lam: float | None = None
    """Trade-off weight λ; None: per task λ = S_k/Q_k of the first-order top-k set (iaif.selection.objective)."""
    lam_factor: float = 1.0
    """Multiplier of the default λ (ignored when lam is given)."""
    lam_budget: LamBudget = "k"
    """Budget k_τ in the default λ rule under combine=sum: k (every pick counts for every task) or
    per-task (⌈k / T⌉, as round-robin always uses)."""
    combine: Combine = "sum"
    """Multi-task: maximise the sum of per-task objectives, or serve tasks round-robin."""
    normalise: bool = False
    """interaction / first-order: unit-length feature rows (cosine scores) or raw projected vectors
    (dot products: the gradient magnitudes stay in s_a and κ). Raw is the default, chosen on the demo's
    validation split (docs/BENCHMARKS.md, "Selection ablation"). LESS always uses cosines (its recipe)."""
    whiten: float | None = None
    """Training-loss curvature: None keeps H = I (LESS); a number whitens the features with the damped
    Gauss-Newton H = Γ̂ᵀΓ̂/N + δI of each checkpoint's pool features, δ = whiten × its mean eigenvalue."""
    greedy: Literal["exact", "stochastic"] = "exact"
    """Exact greedy, or stochastic greedy with (N/k)·ln(1/epsilon) candidates per step."""
    epsilon: float = 0.01
    """Stochastic greedy's ε."""
    shortlist: int = 1024
    """Exact greedy: candidates tracked exactly between full passes (speed only, same result; split
    over the processes of a launch)."""
    block: int | None = None
    """Exact greedy over several processes: steps proposed per exchange of candidates between them
    (speed only, same result); None: 32 under a launch of several processes, else 1."""
    balance: Literal["none", "source", "task"] = "none"
    """random: equal counts per source file or per task."""
    similarity: Literal["max", "round-robin"] = "max"
    """rds / embed: max over target examples, or round-robin over them."""
    model: str = ""
    """rds: the base model (Hub id or local folder)."""
    embedder: str = "sentence-transformers/all-MiniLM-L6-v2"
    """embed: sentence-transformers model name or local folder."""
    text: TextFormat = field(default_factory=TextFormat)
    """rds / embed: rendering (rds) and truncation length in tokens."""
    batch_size: int = 16
    """rds / embed: examples per forward pass."""
    device: str = "cpu"
    """cpu or cuda[:i] for Φ, the selector and the embedders."""
    chunk_rows: int = 16384
    """Rows per chunk when reading features and recomputing gains."""
    seed: int = 0
    """Seed of random selection, stochastic greedy and the selector's bound basis."""
    airrep_model: str = ""
    """airrep: the trained model (folder or airrep.pt of `iaif airrep`)."""
    allow_missing_features: bool = False
    """Select among the pool examples the pool stores have, when others are not in them at all
    (examples excluded at extraction, listed in excluded.json, are never candidates)."""


@dataclass
class Selection:
    """Chosen candidates (indices into the candidate list) with per-rank metadata."""

    indices: list[int]
    score: Sequence[float | None]
    first_order: Sequence[float | None]
    interaction: Sequence[float | None]
    info: dict[str, Any] = field(default_factory=dict)


def resolve_k(k: int | None, fraction: float | None, n: int) -> int:
    """The number to select from k or fraction; errors when it does not fit the pool."""
    if n == 0:
        raise ValueError("empty pool: nothing to select")
    if (k is None) == (fraction is None):
        raise ValueError("give exactly one of k and fraction")
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        k = math.ceil(fraction * n)
    assert k is not None
    if not 1 <= k <= n:
        raise ValueError(f"k={k} does not fit a pool of {n} candidates")
    return k


def _subtask(ex: Example) -> str:
    meta = ex.record.get("meta")
    sub = ex.record.get("subtask") or (meta.get("subtask") if isinstance(meta, dict) else None)
    return f"{ex.task}/{sub}" if sub else ex.task


def load_targets(paths: Sequence[str]) -> list[Example]:
    """All target examples of the given files, ids unique across files."""
    if not paths:
        raise ValueError("no target data given (targets)")
    examples = [e for p in paths for e in load_examples(DataConfig(path=p))]
    dup = [i for i, c in Counter(e.id for e in examples).items() if c > 1]
    if dup:
        raise ValueError(f"target ids repeat across files: {dup[:3]}")
    return examples


# ---------------------------------------------------------------- feature-based methods


def _source(cfg: SelectConfig, stores: list[CheckpointStores], ckpts: list[CheckpointFeatures]) -> FeatureSource:
    """The features and their geometry: LESS is cosine scores without whitening by definition."""
    geometry = FeatureGeometry() if cfg.method == "less" else FeatureGeometry(cfg.normalise, cfg.whiten)
    return FeatureSource(ckpts, stores, cfg.chunk_rows, cfg.device, geometry)


def _less_select(src: FeatureSource, k: int, cand_ids: list[str], targets: list[Example]) -> Selection:
    from iaif.selection.baselines.less import less_select

    perm, _ = group_columns([t.task for t in targets])
    ordered = [targets[i] for i in perm]
    phi = influence_matrix(src.checkpoints, cand_ids, [t.id for t in ordered], src.chunk_rows, src.device,
                           src.geometry)
    sub_idx: dict[str, list[int]] = {}
    for col, t in enumerate(ordered):
        sub_idx.setdefault(_subtask(t), []).append(col)
    idx, scores = less_select(phi, sub_idx, k)
    vals = scores.tolist()
    return Selection(idx, vals, vals, [None] * k, {"subtasks": len(sub_idx)})


def _feature_select(cfg: SelectConfig, k: int, src: FeatureSource, cand_ids: list[str],
                    targets: list[Example]) -> Selection:
    from iaif.selection.greedy import greedy_select
    from iaif.selection.shard import launch_shard

    if cfg.method == "less":
        return _less_select(src, k, cand_ids, targets)
    shard = launch_shard(len(cand_ids), cfg.chunk_rows)
    if shard.world > 1 and src.device.startswith("cuda"):
        src = replace(src, device=f"cuda:{torch.cuda.current_device()}")  # each process its own GPU
    terms = influence_terms(cfg.curvature, src, cand_ids, [t.id for t in targets], [t.task for t in targets],
                            range(shard.start, shard.stop))
    cols = terms.curv_columns
    tasks = [TaskTerms(name, s, None if cols is None else cols[name], terms.scale) for name, s in terms.scores.items()]
    lam = 0.0 if cfg.method == "first-order" else cfg.lam
    objectives, lams = build_objectives(tasks, terms.curv, k, cfg.combine, lam, cfg.lam_factor, cfg.lam_budget,
                                        shard)
    start = time.perf_counter()
    result = greedy_select(objectives, k, cfg.greedy, cfg.epsilon, cfg.shortlist, chunk_rows=cfg.chunk_rows,
                           seed=cfg.seed, shard=shard, block=cfg.block)
    idx = result.indices
    value = sum(o.value(idx, shard) for o in objectives)
    info = {"lambda": lams, "objective": value, "greedy_seconds": round(time.perf_counter() - start, 3),
            "full_refreshes": result.refreshes, "greedy_blocks": result.blocks, "processes": shard.world,
            "tasks": {n: s.stop - s.start for n, s in terms.target_columns.items()}}
    return Selection(idx, [s.gain for s in result.steps], [s.first_order for s in result.steps],
                     [s.interaction for s in result.steps], info)


# ---------------------------------------------------------------- outputs


def _normalised_content(ex: Example) -> str:
    return " ".join(" ".join(m.content for m in ex.messages).lower().split())


def duplicate_rate(chosen: Sequence[Example]) -> float:
    """Share of chosen examples whose normalised content equals another chosen one's, or whose
    ``meta.cluster`` (when not null) is shared with another chosen one."""
    if not chosen:
        return 0.0
    content = Counter(_normalised_content(e) for e in chosen)

    def cluster(e: Example) -> Any:
        meta = e.record.get("meta")
        return meta.get("cluster") if isinstance(meta, dict) else None

    clusters = Counter(c for c in map(cluster, chosen) if c is not None)
    dup = sum(1 for e in chosen if content[_normalised_content(e)] > 1 or clusters.get(cluster(e), 0) > 1)
    return dup / len(chosen)


def write_selection(out: Path, cfg: SelectConfig, candidates: Sequence[Example], sel: Selection,
                    summary_extra: dict[str, Any]) -> Path:
    """selected.jsonl + summary.json + config/run info, each written to a temporary name and renamed
    (temporary files an interrupted run left are removed first)."""
    from iaif.common.atomic import remove_stale_temps

    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out, [SELECTED_FILE, SUMMARY_FILE, "run"])
    chosen = [candidates[i] for i in sel.indices]
    tmp_sel = temp_path(out / SELECTED_FILE)
    with open(tmp_sel, "w", encoding="utf-8") as fh:
        for rank, ex in enumerate(chosen):
            meta = {"rank": rank, "method": cfg.method, "score": sel.score[rank], "first_order": sel.first_order[rank],
                    "interaction": sel.interaction[rank], "id": ex.id, "source": ex.source, "line": ex.line,
                    "task": ex.task}
            fh.write(json.dumps({**ex.record, META_FIELD: meta}, ensure_ascii=False) + "\n")
    summary = {
        "method": cfg.method, "k": len(chosen), "pool_size": len(candidates),
        "counts_per_source": dict(Counter(e.source for e in chosen)),
        "counts_per_task": dict(Counter(e.task for e in chosen)),
        "objective": sel.info.get("objective"), "duplicate_rate": duplicate_rate(chosen),
        **sel.info, **summary_extra, "config": config_to_dict(cfg),
    }
    tmp_sum = temp_path(out / SUMMARY_FILE)
    tmp_sum.write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
    staging = temp_path(out / "run")
    write_run_info(staging, cfg, "select")
    for name in (CONFIG_FILE, RUN_INFO_FILE):
        os.replace(staging / name, out / name)
    staging.rmdir()
    os.replace(tmp_sel, out / SELECTED_FILE)
    os.replace(tmp_sum, out / SUMMARY_FILE)  # last: marks the selection done
    return out


Selector = Callable[[SelectConfig, list[Example]], tuple[list[Example], Selection, dict[str, Any]]]
"""One method: (settings, pool) -> (candidates, selection over them, extra summary fields)."""


def _select_features(cfg: SelectConfig, pool: list[Example]) -> tuple[list[Example], Selection, dict[str, Any]]:
    """interaction, first-order, less: selection on the gradient feature stores."""
    from iaif.selection.checks import open_checked_stores, pool_candidates

    targets = load_targets(cfg.targets)
    stores, ckpts = open_checked_stores(cfg, targets)
    candidates, extra = pool_candidates(pool, [p.pool for p in stores], cfg.allow_missing_features)
    k = resolve_k(cfg.k, cfg.fraction, len(candidates))
    return candidates, _feature_select(cfg, k, _source(cfg, stores, ckpts), [e.id for e in candidates], targets), extra


def _select_random(cfg: SelectConfig, pool: list[Example]) -> tuple[list[Example], Selection, dict[str, Any]]:
    """random: a uniform (optionally source- or task-balanced) subset."""
    from iaif.selection.baselines.random_subset import random_select

    k = resolve_k(cfg.k, cfg.fraction, len(pool))
    groups = None if cfg.balance == "none" else [e.source if cfg.balance == "source" else e.task for e in pool]
    idx = random_select(len(pool), k, cfg.seed, groups)
    return pool, Selection(idx, [None] * k, [None] * k, [None] * k), {}


def _similarity(cfg: SelectConfig, pool: list[Example],
                embed: Callable[[Sequence[Example]], torch.Tensor]) -> tuple[list[Example], Selection, dict[str, Any]]:
    from iaif.selection.baselines.similarity import similarity_select

    k = resolve_k(cfg.k, cfg.fraction, len(pool))
    targets = load_targets(cfg.targets)
    idx, scores = similarity_select(embed(pool), embed(targets), k, cfg.similarity)
    return pool, Selection(idx, scores, scores, [None] * k), {}


def _select_rds(cfg: SelectConfig, pool: list[Example]) -> tuple[list[Example], Selection, dict[str, Any]]:
    """rds: similarity of base-model hidden states."""
    from iaif.selection.baselines.rds import rds_embeddings

    return _similarity(cfg, pool, lambda xs: rds_embeddings(xs, cfg.model, cfg.text.template, cfg.text.max_length,
                                                            cfg.batch_size, cfg.device))


def _select_embed(cfg: SelectConfig, pool: list[Example]) -> tuple[list[Example], Selection, dict[str, Any]]:
    """embed: similarity of sentence-transformers embeddings."""
    from iaif.selection.baselines.embed import sentence_embeddings

    return _similarity(cfg, pool, lambda xs: sentence_embeddings(xs, cfg.embedder, cfg.batch_size, cfg.device,
                                                                 cfg.text.max_length))


def _select_airrep(cfg: SelectConfig, pool: list[Example]) -> tuple[list[Example], Selection, dict[str, Any]]:
    """airrep: greedy on AirRep's pooled group score (iaif.selection.airrep.method)."""
    from iaif.selection.airrep.method import airrep_select

    return airrep_select(cfg, pool)


METHODS: dict[str, Selector] = {
    "interaction": _select_features, "first-order": _select_features, "less": _select_features,
    "random": _select_random, "rds": _select_rds, "embed": _select_embed, "airrep": _select_airrep,
}
"""Method name -> selector; a new baseline is one function and one entry here (keys: exactly ``Method``)."""


def run_select(cfg: SelectConfig) -> Path:
    """Run one selection method and write its outputs (module docstring). Under a launch of several
    processes every process calls it (``SHARDED_METHODS`` split the work, the others run in process 0)."""
    from iaif.selection.checks import check_settings

    check_settings(cfg)
    if cfg.method not in METHODS:
        raise ValueError(f"unknown method '{cfg.method}'")
    state = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from iaif.common.dist import process_state

        state = process_state(cpu=not torch.cuda.is_available())
    main = state is None or state.is_main_process
    out = Path(cfg.output_dir)
    if main or cfg.method in SHARDED_METHODS:
        pool = load_examples(cfg.pool)
        candidates, sel, extra = METHODS[cfg.method](cfg, pool)
        if main:
            write_selection(out, cfg, candidates, sel, extra)
            logger.info("selected %d of %d with %s -> %s", len(sel.indices), len(candidates), cfg.method,
                        out / SELECTED_FILE)
    if state is not None:
        state.wait_for_everyone()
    return out


def selected_ids(path: str | Path) -> list[str]:
    """Ids from a file of pool ids: one per line, or JSONL records with ``_iaif.id`` or ``id``."""
    from iaif.training.data import json_error_text, read_text_lines

    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file")
    ids = []
    for lineno, raw in read_text_lines(path):
        raw = raw.strip()
        if not raw:
            continue
        if raw.startswith("{"):
            try:
                rec = json.loads(raw)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: {json_error_text(err)}") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object")
            ident = (rec.get(META_FIELD) or {}).get("id", rec.get("id"))
            if ident is None:
                raise ValueError(f"{path}:{lineno}: record has neither '_iaif.id' nor 'id'")
            ids.append(str(ident))
        else:
            ids.append(raw)
    if not ids:
        raise ValueError(f"{path}: no ids")
    return ids

