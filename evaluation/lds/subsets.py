"""``iaif subsets``: fine-tune one LoRA adapter per random subset of a pool and record the target loss.

Subsets are uniform draws, or (``draw: mixture``) coherent groups dominated by a few task families, the
regime where examples of one family are redundant and the interaction term is built to matter.

The data of the linear datamodeling score (LDS, ``iaif lds``) and of AirRep's training: M subsets of
the pool, each of the same size, drawn from ``(seed, subset index)`` alone; each is fine-tuned with the
``iaif train`` recipe (``iaif.training.finetune.train_adapter``, the same Trainer and settings) and the
mean answer-token loss over the target examples is measured after training. The base model's loss is
measured once (row ``subset = -1``).

Output: ``OUTPUT_DIR/subsets.jsonl`` (``iaif.common.contracts.SubsetRow`` per line, appended under a
lock as each subset finishes, with the recipe hash), ``config.yaml``, ``run_info.json``, and
``work/subset-NNNNN/`` while a subset trains (removed once its row is written, unless ``keep_adapters``).

Resume: rerun the same command. Subsets with a row are skipped; a subset killed mid-training resumes
from its last Trainer checkpoint. A table written with another recipe is refused.
Sharding: ``accelerate launch --num_processes P -m iaif subsets ...``: process r trains subsets
i ≡ r (mod P), each on its own (no gradient exchange, ``iaif.common.dist.detach_processes``); every
subset's members and training seed do not depend on P, so the table is the same whatever P is.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from iaif.common.atomic import append_line
from iaif.common.contracts import SUBSETS_FILE, SubsetRow, read_subset_rows
from iaif.common.dist import detach_processes
from iaif.common.provenance import config_to_dict, write_run_info
from iaif.selection.features.per_example_grads import per_example_loss
from iaif.selection.select import load_targets, resolve_k
from iaif.training.collate import PaddingCollator
from iaif.training.data import Example, load_examples, tokenize_examples
from iaif.training.finetune import TrainConfig, train_adapter
from iaif.training.lora import load_base_model, load_tokenizer, quiet_peft_calls

logger = logging.getLogger(__name__)
WORK_DIR = "work"


@dataclass
class SubsetsConfig:
    """Settings of `iaif subsets`."""

    train: TrainConfig = field(default_factory=TrainConfig)
    """The fine-tuning recipe (`iaif train`'s settings); train.data is the pool the subsets are drawn from
    (train.output_dir is not used)."""
    targets: list[str] = field(default_factory=list)
    """Target data files; the measured value is the mean answer-token loss over all their examples."""
    size: int | None = None
    """Examples per subset (overrides fraction)."""
    fraction: float = 0.05
    """Examples per subset as a fraction of the pool."""
    num_subsets: int = 32
    """M: how many subsets (ids 0..M-1; raising M later adds subsets, the finished ones are kept)."""
    seed: int = 0
    """Seed of the subset draws (subset i uses the generator seeded with (seed, i))."""
    draw: Literal["uniform", "mixture"] = "uniform"
    """uniform: every subset of the size equally likely. mixture: coherent groups; each subset first
    draws weights over the pool's task families from a symmetric Dirichlet(mixture_alpha), then fills
    each family's share of the subset in proportion to its weight, so subsets range from one-family
    (redundant) to mixed (complementary)."""
    mixture_alpha: float = 0.3
    """Dirichlet concentration of draw=mixture (smaller: subsets dominated by fewer families)."""
    eval_batch_size: int = 16
    """Target examples per forward pass when measuring the loss."""
    keep_adapters: bool = False
    """Keep each subset's adapter under work/ (default: removed once its row is written)."""
    output_dir: str = "runs/subsets"
    """Folder of subsets.jsonl, config.yaml, run_info.json."""


def draw_subset(n: int, size: int, seed: int, index: int, families: Sequence[str] | None = None,
                alpha: float = 0.3) -> list[int]:
    """Subset ``index``: ``size`` distinct positions of 0..n-1, sorted, from the generator (seed, index).

    Uniform over all subsets of that size, or, with ``families`` (the family of each position), a
    coherent group: weights w ~ Dirichlet(alpha) over the sorted distinct families, then positions drawn
    without replacement, position i with probability proportional to w_f / n_f of its family f (n_f its
    size), so family f is expected to fill a share w_f of the subset while it has members left."""
    if not 1 <= size <= n:
        raise ValueError(f"subset size must be between 1 and the pool size {n}, got {size}")
    rng = np.random.default_rng([seed, index])
    if families is None:
        return sorted(int(i) for i in rng.choice(n, size=size, replace=False))
    if len(families) != n:
        raise ValueError(f"families has {len(families)} entries for a pool of {n}")
    if alpha <= 0:
        raise ValueError(f"mixture_alpha must be > 0, got {alpha}")
    names = sorted(set(families))
    counts = {f: families.count(f) for f in names}
    weights = dict(zip(names, rng.dirichlet([alpha] * len(names))))
    # w_f spread over the family's members; a floor keeps every position drawable, so a subset can be filled
    p = np.array([max(weights[f] / counts[f], 1e-12) for f in families], dtype=np.float64)
    return sorted(int(i) for i in rng.choice(n, size=size, replace=False, p=p / p.sum()))


def recipe_hash(cfg: SubsetsConfig, size: int) -> str:
    """12 hex digits over everything that determines a row: the training recipe, the pool and target
    files, the subset size and the draw seed (not M, the output folder or the adapters' fate)."""
    train = config_to_dict(cfg.train)
    for key in ("output_dir", "resume"):
        train.pop(key, None)
    train["training"].update(train.pop("text"))  # hashed where template and max_length were: tables keep their hash
    data: dict[str, Any] = {"train": train, "targets": list(cfg.targets), "size": size, "seed": cfg.seed}
    if cfg.draw != "uniform":  # uniform tables keep the hash they were written with
        data["draw"] = {"kind": cfg.draw, "alpha": cfg.mixture_alpha}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]


@torch.no_grad()
def target_losses(model: Any, tokenizer: Any, targets: Sequence[Example], cfg: TrainConfig,
                  batch_size: int) -> tuple[float, dict[str, float]]:
    """Mean answer-token loss per target example, averaged over all examples and per task."""
    kept, excluded = tokenize_examples(targets, tokenizer, cfg.text.template, cfg.text.max_length)
    if excluded:
        raise ValueError(f"target example {excluded[0].id} has no answer token within max_length "
                         f"{cfg.text.max_length}")
    collate = PaddingCollator(tokenizer.pad_token_id)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    losses = []
    for start in range(0, len(kept), batch_size):
        batch = collate([{"input_ids": e.input_ids, "labels": e.labels} for e in kept[start : start + batch_size]])
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
        losses.append(per_example_loss(logits, batch["labels"].to(device)).float().cpu())
    model.train(was_training)
    per = torch.cat(losses)
    by_task: dict[str, list[float]] = {}
    for ex, value in zip(targets, per.tolist()):
        by_task.setdefault(ex.task or "", []).append(value)
    return float(per.mean()), {t: float(np.mean(v)) for t, v in sorted(by_task.items())}


def _check_table(rows: Sequence[SubsetRow], path: Path, expected: str) -> None:
    other = sorted({r.recipe_hash for r in rows} - {expected})
    if other:
        raise ValueError(f"{path}: rows of another recipe ({other[0]}, this run's is {expected}); "
                         "use another output_dir or the same settings")


def run_subsets(cfg: SubsetsConfig) -> Path:
    """Train and measure every subset of this process's shard that has no row yet (module docstring)."""
    rank, world = detach_processes()
    if cfg.num_subsets < 1:
        raise ValueError(f"num_subsets must be ≥ 1, got {cfg.num_subsets}")
    out = Path(cfg.output_dir)
    table = out / SUBSETS_FILE
    pool = load_examples(cfg.train.data)
    targets = load_targets(cfg.targets)
    size = resolve_k(cfg.size, None if cfg.size else cfg.fraction, len(pool))
    recipe = recipe_hash(cfg, size)
    rows = read_subset_rows(table) if table.is_file() else []
    _check_table(rows, table, recipe)
    if rank == 0:
        write_run_info(out, cfg, "subsets")
    done = {r.subset for r in rows}
    tokenizer = load_tokenizer(cfg.train.model)
    if rank == 0 and -1 not in done:
        start = time.perf_counter()
        loss, per_task = target_losses(load_base_model(cfg.train.model), tokenizer, targets, cfg.train,
                                       cfg.eval_batch_size)
        append_line(table, SubsetRow(-1, [], loss, per_task, recipe, round(time.perf_counter() - start, 3)).to_json())
    families = [e.task or "" for e in pool] if cfg.draw == "mixture" else None
    if families is not None and len(set(families)) < 2:
        raise ValueError(f"--draw mixture needs pool examples of at least two `task` values; "
                         f"{cfg.train.data.path} has {sorted(set(families))}")
    mine = [i for i in range(cfg.num_subsets) if i % world == rank and i not in done]
    logger.info("process %d of %d: %d subsets of %d examples to train (%d already in %s)",
                rank, world, len(mine), size, len([d for d in done if d >= 0]), table)
    for i in mine:
        start = time.perf_counter()
        members = [pool[j] for j in draw_subset(len(pool), size, cfg.seed, i, families, cfg.mixture_alpha)]
        work = out / WORK_DIR / f"subset-{i:05d}"
        trainer, _ = train_adapter(replace(cfg.train, output_dir=str(work), resume=True), members, "subsets")
        with quiet_peft_calls():
            loss, per_task = target_losses(trainer.model, tokenizer, targets, cfg.train, cfg.eval_batch_size)
        seconds = round(time.perf_counter() - start, 3)
        append_line(table, SubsetRow(i, [e.id for e in members], loss, per_task, recipe, seconds).to_json())
        logger.info("subset %d: target loss %.4f (%.1f s)", i, loss, seconds)
        if not cfg.keep_adapters:
            shutil.rmtree(work, ignore_errors=True)
    return out
