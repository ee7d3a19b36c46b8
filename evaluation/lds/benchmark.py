"""``iaif lds``: linear datamodeling score of every group estimator on held-out retrained subsets.

For each subset table of ``iaif subsets`` (one per subset size) the subsets are split once
(``iaif.selection.airrep.train.is_heldout``): AirRep trains on one part, every estimator is scored on
the other (held-out) part only; the validated λ of the interaction estimators is chosen on the first
part too. Per table and estimator: Spearman ρ between the predicted effect
(``iaif.evaluation.lds.estimators``) and the measured one (target loss after fine-tuning on the subset
− the base model's), with a bootstrap interval over held-out subsets.

Every estimator is also compared with first-order, paired: ρ − ρ(first-order) on the same subsets, with
its interval over the same bootstrap draws (tighter than comparing two overlapping intervals).

Output (``OUTPUT_DIR``): ``lds.json`` (per table: sizes, λ, the split, ρ and interval per estimator, the
paired gains, every held-out subset's measured and predicted effects), ``lds.md`` (both tables), ``scatter-<estimator>.png``
(one panel per table), ``config.yaml``, ``run_info.json``.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import tyro

from iaif.common.atomic import write_json, write_text
from iaif.common.contracts import CheckpointStores, SubsetRow, read_subset_rows
from iaif.common.provenance import write_run_info
from iaif.evaluation.lds.estimators import PoolTerms, predicted_effects
from iaif.evaluation.lds.score import lds, lds_gain
from iaif.selection.airrep.stage import embed
from iaif.selection.airrep.train import AirRepTraining, GroupTable, group_table, split_rows, train_airrep, training_tables
from iaif.selection.features.store import sampled_row_example
from iaif.selection.influence import CheckpointFeatures, FeatureGeometry, influence_matrix, open_checkpoints
from iaif.selection.select import load_targets
from iaif.training.data import DataConfig, TextFormat, load_examples

logger = logging.getLogger(__name__)
RESULTS_FILE = "lds.json"
REFERENCE = "first-order"
"""The estimator every other one is compared with, paired on the same subsets and bootstrap draws."""
TABLE_FILE = "lds.md"


@dataclass
class LdsConfig:
    """Settings of `iaif lds`."""

    tables: list[str] = field(default_factory=list)
    """subsets.jsonl files of `iaif subsets` (one per subset size), all from this pool and these targets."""
    pool: str = ""
    """The pool the subsets were drawn from (ids match the pool feature stores)."""
    targets: list[str] = field(default_factory=list)
    """The target files the subsets' losses were measured on (ids match the target stores)."""
    checkpoints: Annotated[list[CheckpointStores], tyro.conf.Suppress] = field(default_factory=list)
    """YAML only: the feature stores of each warm-up checkpoint, as in `iaif select`; or give the flat lists below."""
    pool_stores: list[str] = field(default_factory=list)
    """Pool feature stores, one per warm-up checkpoint (as in `iaif select`)."""
    target_stores: list[str] = field(default_factory=list)
    """Target feature stores (true labels)."""
    sampled_target_stores: list[str] = field(default_factory=list)
    """Sampled-label target stores (Gauss-Newton κ); none: the GN estimators are left out."""
    normalise: bool = False
    """Feature geometry of the influence estimators, as `iaif select`'s normalise (LESS always uses cosines)."""
    whiten: float | None = None
    """As `iaif select`'s whiten."""
    model: str = ""
    """Base model: its hidden states are the rds representation and AirRep's frozen encoder."""
    text: TextFormat = field(default_factory=TextFormat)
    """Rendering and token limit for the base model's representations."""
    batch_size: int = 16
    """Examples per forward pass of the base model."""
    airrep: AirRepTraining = field(default_factory=AirRepTraining)
    """AirRep's head and optimisation (trained here on the non-held-out subsets of every table)."""
    per_task: bool = False
    """Also score every estimator per target task: f = that task's mean loss (the tables' task losses), Φ
    restricted to that task's targets; AirRep, trained on the whole target, is left out of these rows."""
    holdout_fraction: float = 0.5
    """Share of each table's subsets held out for the LDS (the rest train AirRep)."""
    split_seed: int = 0
    """Seed of the split."""
    bootstrap: int = 1000
    """Bootstrap resamples of the held-out subsets for the intervals."""
    seed: int = 0
    """Seed of the bootstrap."""
    device: str = "cpu"
    """cpu or cuda[:i] for Φ and the base model."""
    chunk_rows: int = 16384
    """Rows per chunk when reading features."""
    output_dir: str = "runs/lds"
    """Folder of lds.json, lds.md, the scatter plots, config.yaml, run_info.json."""


def _task_columns(tasks: list[str]) -> dict[str, list[int]]:
    cols: dict[str, list[int]] = {}
    for i, t in enumerate(tasks):
        cols.setdefault(t, []).append(i)
    return cols


def pool_terms(cfg: LdsConfig, stores: list[CheckpointStores], ckpts: list[CheckpointFeatures], pool_ids: list[str], pool_x: torch.Tensor,
               target_x: torch.Tensor, target_ids: list[str], target_tasks: list[str]) -> PoolTerms:
    """Φ (selector geometry and cosine), the optional sampled-label Φ and the representation similarity."""
    geometry = FeatureGeometry(cfg.normalise, cfg.whiten)
    phi = influence_matrix(ckpts, pool_ids, target_ids, cfg.chunk_rows, cfg.device, geometry).cpu()
    phi_cos = influence_matrix(ckpts, pool_ids, target_ids, cfg.chunk_rows, cfg.device, FeatureGeometry()).cpu()
    sampled, sampled_tasks = None, {}
    if any(p.sampled_targets for p in stores):
        gn = open_checkpoints(stores, sampled=True)
        sampled = influence_matrix(gn, pool_ids, gn[0].target_ids, cfg.chunk_rows, cfg.device, geometry).cpu()
        task_of = dict(zip(target_ids, target_tasks))
        sampled_tasks = _task_columns([task_of[sampled_row_example(r)] for r in gn[0].target_ids])
    similarity = (pool_x @ target_x.T).max(dim=1).values
    return PoolTerms(phi, phi_cos, _task_columns(target_tasks), sampled, similarity, sampled_subtasks=sampled_tasks)


def _score(terms: PoolTerms, held: GroupTable, validation: GroupTable, cfg: LdsConfig) -> dict[str, Any]:
    """ρ and paired gain of every estimator on the held-out groups, and the predictions."""
    measured = held.effects.double().numpy()
    preds, lams = predicted_effects(terms, held.members, validation)
    scores = {name: asdict(lds(p, measured, cfg.bootstrap, cfg.seed)) for name, p in preds.items()}
    gains = {name: asdict(lds_gain(p, preds[REFERENCE], measured, cfg.bootstrap, cfg.seed))
             for name, p in preds.items() if name != REFERENCE}
    return {"lambda": lams, "lds": scores, "gain": gains, "measured": measured.tolist(),
            "predicted": {n: p.tolist() for n, p in preds.items()}}


def _log(result: dict[str, Any]) -> None:
    logger.info("%s (size %d, %d held out%s): %s", result["table"], result["size"], len(result["heldout_subsets"]),
                f", task {result['task']}" if result["task"] else "",
                ", ".join(f"{n} {s['spearman']:.3f}" for n, s in result["lds"].items()))


def _task_effects(table: GroupTable, rows: list[SubsetRow], base: SubsetRow, task: str, where: str) -> GroupTable:
    if task not in base.task_losses or any(task not in r.task_losses for r in rows):
        raise ValueError(f"{where}: per_task needs the loss of task {task!r} in every row")
    effects = torch.tensor([r.task_losses[task] - base.task_losses[task] for r in rows], dtype=torch.float32)
    return GroupTable(table.members, effects)


def run_lds(cfg: LdsConfig) -> Path:
    """Score every estimator on the held-out subsets of every table (module docstring)."""
    from iaif.selection.checks import open_checked_stores, pool_candidates

    if not cfg.tables:
        raise ValueError("tables: give at least one subsets.jsonl of iaif subsets")
    if not cfg.pool:
        raise ValueError("pool: give the pool file the subsets were drawn from")
    start = time.perf_counter()
    pool = load_examples(DataConfig(path=cfg.pool))
    targets = load_targets(cfg.targets)
    stores, ckpts = open_checked_stores(cfg, targets)
    pool_candidates(pool, [p.pool for p in stores], allow_missing=False)
    pool_ids = [e.id for e in pool]
    pool_x = embed(pool, cfg.model, cfg.text.template, cfg.text.max_length, cfg.batch_size, cfg.device)
    target_x = embed(targets, cfg.model, cfg.text.template, cfg.text.max_length, cfg.batch_size, cfg.device)
    terms = pool_terms(cfg, stores, ckpts, pool_ids, pool_x, target_x, [t.id for t in targets], [t.task for t in targets])
    timing = {"features_seconds": round(time.perf_counter() - start, 2)}
    start = time.perf_counter()
    train_tables, train_keys = training_tables(cfg.tables, pool_ids, cfg.holdout_fraction, cfg.split_seed)
    model, curve = train_airrep(pool_x, target_x, train_tables, cfg.airrep)
    terms.airrep = lambda members: model.group_scores(pool_x[members], target_x)
    timing["airrep_train_seconds"] = round(time.perf_counter() - start, 2)
    row_of = {i: n for n, i in enumerate(pool_ids)}
    results: list[dict[str, Any]] = []
    for path in cfg.tables:
        base, train, held = split_rows(read_subset_rows(path), cfg.holdout_fraction, cfg.split_seed)
        overlap = {(str(path), r.subset) for r in held} & set(train_keys)
        if overlap:
            raise RuntimeError(f"{path}: AirRep was trained on held-out subsets {sorted(overlap)[:3]}")
        groups, validation = group_table(held, base, row_of, path), group_table(train, base, row_of, path)
        head = {"table": str(path), "size": int(groups.members.shape[1]), "pool_size": len(pool),
                "base_loss": base.target_loss, "train_subsets": [r.subset for r in train],
                "heldout_subsets": [r.subset for r in held]}
        results.append({**head, "task": None, **_score(terms, groups, validation, cfg)})
        _log(results[-1])
        for task in (sorted(terms.subtasks) if cfg.per_task else []):
            cols = terms.subtasks[task]
            task_terms = terms.for_task(task, (pool_x @ target_x[cols].T).max(dim=1).values)
            results.append({**head, "task": task, **_score(task_terms, _task_effects(groups, held, base, task, path),
                                                           _task_effects(validation, train, base, task, path), cfg)})
            _log(results[-1])
    out = Path(cfg.output_dir)
    write_run_info(out, cfg, "lds")
    write_text(out / TABLE_FILE, markdown_table(results) + f"\nρ − ρ({REFERENCE}), paired:\n\n" + markdown_table(results, "gain"))
    for name in results[0]["lds"]:
        scatter(results, name, out / f"scatter-{_slug(name)}.png")
    write_json(out / RESULTS_FILE, {"results": results, "airrep_loss": [curve[0], curve[-1]], **timing}, indent=2)
    print((out / TABLE_FILE).read_text(encoding="utf-8"))
    return out


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.replace("λ", "lambda").lower()).strip("-")


def markdown_table(results: list[dict[str, Any]], key: str = "lds") -> str:
    """Estimators as rows, one column per table: ρ [low, high] (``key="gain"``: the paired difference to
    the reference estimator)."""
    head = [f"size {r['size']} ({100 * r['size'] / r['pool_size']:.0f} %, {len(r['heldout_subsets'])} held out)"
            + (f", task {r['task']}" if r.get("task") else "") for r in results]
    lines = ["| estimator | " + " | ".join(head) + " |", "|---|" + "---|" * len(results)]
    for name in results[0][key]:
        cells = []
        for r in results:
            s = r[key].get(name)
            cells.append("–" if s is None else f"{s['spearman']:+.2f} [{s['low']:+.2f}, {s['high']:+.2f}]")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def scatter(results: list[dict[str, Any]], name: str, path: Path) -> None:
    """Predicted against measured effect, one panel per table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [r for r in results if name in r["lds"]]
    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.6), squeeze=False)
    for ax, r in zip(axes[0], results):
        s = r["lds"][name]
        ax.scatter(np.asarray(r["predicted"][name]), np.asarray(r["measured"]), s=14)
        label = f"size {r['size']}" + (f" {r['task']}" if r.get("task") else "")
        ax.set_title(f"{label}: ρ = {s['spearman']:+.2f} [{s['low']:+.2f}, {s['high']:+.2f}]", fontsize=9)
        ax.set_xlabel(f"predicted Δ target loss ({name})")
        ax.set_ylabel("measured Δ target loss")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
