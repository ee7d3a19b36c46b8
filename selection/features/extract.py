"""``iaif extract``: projected per-example LoRA-gradient features of a dataset into a feature store.

The stage around the featurizer (``iaif.selection.features.featurizer``: feature and projection
kinds, sampled labels): settings, the plan, resumable writing and the store's metadata.

Runs on one process or many (``accelerate launch -m iaif extract ...``): every process builds the
same plan (length-grouped batches within a token budget, grouped into shards), takes the shards
``rank, rank + world, ...`` and writes each finished shard to the output folder; process 0
assembles the store in dataset order. Rerunning a killed job skips the shards already written.

Sampled labels (``sampled_labels: R`` > 0, grad features only), for the Gauss-Newton curvature of
``iaif select --curvature gn``: each target example gets R rows ``<id>#<r>`` (r = 0..R-1,
``store.sampled_row_id``), the features of its draws r with sampled answer labels.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from iaif.common.atomic import write_json
from iaif.common.dist import min_across_processes, process_state
from iaif.common.oom import largest_fitting
from iaif.common.progress import progress
from iaif.selection.features.batching import group_shards, token_budget_batches
from iaif.selection.features.featurizer import PROJECTION_VERSION, FeatureKind, LoraFeaturizer, load_lora_model, sampled_relabel
from iaif.selection.features.fingerprint import EXCLUDED_FILE, dataset_fingerprint, write_digests
from iaif.selection.features.projection import ProjectionKind
from iaif.selection.features.store import META_FILE, ShardWriter, StoreMeta, require_match, sampled_row_id
from iaif.training.collate import PaddingCollator
from iaif.training.data import (
    TULU_ASSISTANT,
    TULU_SYSTEM,
    TULU_USER,
    DataConfig,
    TextFormat,
    load_examples,
    tokenize_examples,
)
from iaif.training.lora import LoraSettings, ModelConfig

logger = logging.getLogger(__name__)


@dataclass
class ExtractConfig:
    """Settings of ``iaif extract``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Base model (Hub id or local folder), revision and precision (fp32 / bf16 / 4bit)."""
    checkpoint: str = ""
    """A warm-up checkpoint folder (checkpoint-epochE with adapter/, optimizer_state.pt, checkpoint.json),
    or a bare peft adapter folder (grad features only); empty: a fresh LoRA adapter from `lora` and `seed`."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA settings of the fresh adapter used when no checkpoint is given."""
    data: DataConfig = field(default_factory=DataConfig)
    """The pool or target examples."""
    text: TextFormat = field(default_factory=TextFormat)
    """Prompt template and token limit (examples left without answer tokens are excluded and reported)."""
    feature: FeatureKind = "grad"
    """grad: plain per-example gradients (targets); adam: Adam update directions from the checkpoint's optimizer state (pool)."""
    projection: ProjectionKind = "factorised"
    """factorised: per-module Kronecker projection of x and δ (fast, default); dense: Rademacher over the full gradient (LESS)."""
    dim: int = 8192
    """Projected dimension d."""
    seed: int = 0
    """Seed of the random projection (and of a fresh LoRA adapter)."""
    sampled_labels: int = 0
    """R > 0: R rows '<id>#<r>' per example, each with answer labels sampled from the model (Gauss-Newton
    target stores for `select --curvature gn`; feature=grad only); 0: the true labels."""
    sample_seed: int = 0
    """Seed of the label sampling (sampled_labels > 0)."""
    store_dtype: Literal["fp16", "fp32"] = "fp16"
    """Dtype of the stored features."""
    token_budget: int | Literal["auto"] = 8192
    """Padded tokens per batch (batch size × longest example in it); auto: the largest that fits in memory,
    from max_batch_size × the longest example down, halved while the plan's largest batch runs out of
    memory (each process tries, the smallest wins; recorded in meta.json). The features do not depend on it."""
    max_batch_size: int = 64
    """Cap on examples per batch."""
    shard_examples: int = 1024
    """Examples per resumable shard."""
    output_dir: str = ""
    """Store folder (one per model, checkpoint, dataset and feature kind)."""


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def template_hash(template: str, tokenizer: Any) -> str:
    """Hash of the prompt format: the Tulu markers or the tokenizer's chat template, plus the eos token."""
    body = tokenizer.chat_template if template == "chat" else TULU_SYSTEM + TULU_USER + TULU_ASSISTANT
    return _sha(json.dumps([template, body, tokenizer.eos_token]))


def _check_rows(features: torch.Tensor, ids: list[str], store_dtype: str) -> None:
    finite = torch.isfinite(features).all(dim=1)
    if not bool(finite.all()):
        bad = [ids[i] for i in torch.nonzero(~finite).flatten().tolist()]
        raise FloatingPointError(f"non-finite (NaN/inf) gradient features for example(s) {bad[:10]}")
    if store_dtype == "fp16":
        too_big = features.abs().amax(dim=1) > float(np.finfo(np.float16).max)
        if bool(too_big.any()):
            bad = [ids[i] for i in torch.nonzero(too_big).flatten().tolist()]
            raise FloatingPointError(f"features of example(s) {bad[:10]} overflow fp16; use store_dtype: fp32")


def resolve_token_budget(setting: int | Literal["auto"], lengths: Sequence[int], max_batch_size: int,
                         run_batch: Callable[[list[int]], object], job: dict[str, Any] | None = None) -> int:
    """The token budget of the plan: ``setting`` itself, or for ``auto`` the one an unfinished ``job``
    started with, else the largest (over all processes, the smallest of theirs) at which
    ``run_batch`` runs the plan's largest batch without running out of memory (``largest_fitting``)."""
    if setting != "auto":
        return setting
    if job is not None:
        logger.info("token_budget auto: resuming with the budget the job started with, %d", job["token_budget"])
        return int(job["token_budget"])
    longest = max(lengths)

    def probe(budget: int) -> None:
        batches = token_budget_batches(lengths, budget, max_batch_size)
        run_batch(max(batches, key=lambda b: len(b) * lengths[b[0]]))

    found = largest_fitting(probe, longest * max_batch_size, floor=longest, what="token_budget")
    budget = min_across_processes(found)
    logger.info("token_budget auto: %d tokens per batch", budget)
    return budget


def run_extract(cfg: ExtractConfig) -> Path:
    """Compute the store (or finish a killed run of it) and return its folder."""
    from iaif.common.provenance import package_version, write_run_info
    from iaif.training.lora import load_tokenizer

    if not cfg.output_dir:
        raise ValueError("output_dir: no output folder given")
    if cfg.model.gradient_checkpointing:
        raise ValueError("model.gradient_checkpointing: not supported by extract (the hooks need one forward per batch)")
    if cfg.sampled_labels < 0:
        raise ValueError(f"sampled_labels: must be ≥ 0, got {cfg.sampled_labels}")
    if cfg.sampled_labels and cfg.feature != "grad":
        raise ValueError(f"sampled_labels: {cfg.sampled_labels} needs feature=grad (sampled-label target gradients), "
                         f"got feature={cfg.feature}")
    state = process_state(cpu=not torch.cuda.is_available())
    out_dir = Path(cfg.output_dir)
    tokenizer = load_tokenizer(cfg.model)
    examples, excluded = tokenize_examples(load_examples(cfg.data), tokenizer, cfg.text.template, cfg.text.max_length)
    if not examples:
        raise ValueError(f"{cfg.data.path}: every example was excluded (no answer tokens within max_length={cfg.text.max_length})")
    ids = [ex.id for ex in examples]
    draws = max(cfg.sampled_labels, 1)
    row_ids = [sampled_row_id(i, r) for i in ids for r in range(cfg.sampled_labels)] if cfg.sampled_labels else ids
    model, ckpt_info, adam = load_lora_model(cfg.model, cfg.checkpoint, cfg.feature, cfg.lora, cfg.seed, state.device)
    featurizer = LoraFeaturizer(model, cfg.feature, cfg.projection, cfg.dim, cfg.seed, adam)
    dtype = "float16" if cfg.store_dtype == "fp16" else "float32"
    meta = StoreMeta(
        model=cfg.model.name_or_path, model_revision=cfg.model.revision, precision=cfg.model.precision,
        **ckpt_info,
        feature=cfg.feature, projection=cfg.projection, projection_seed=cfg.seed, dim=cfg.dim,
        projection_version=PROJECTION_VERSION, dtype=dtype,
        dataset=cfg.data.path, dataset_fingerprint=dataset_fingerprint(examples), num_examples=len(examples),
        num_excluded=len(excluded), template=cfg.text.template, template_hash=template_hash(cfg.text.template, tokenizer),
        max_length=cfg.text.max_length, lora_parameters=featurizer.num_parameters, normalised=False,
        sampled_labels=cfg.sampled_labels, sample_seed=cfg.sample_seed if cfg.sampled_labels else None,
        tool_version=package_version(),
    )
    if (out_dir / META_FILE).is_file():
        done, wanted = StoreMeta.read(out_dir / META_FILE).to_dict(), meta.to_dict()
        require_match(done, wanted, [k for k in wanted if k not in ("tool_version", "token_budget")],
                      f"{out_dir} already holds a finished store of other settings")
        logger.info("%s: store already complete", out_dir)
        return out_dir

    collate = PaddingCollator(tokenizer.pad_token_id)

    def features_of(batch_rows: list[int], draw: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(features of draw ``draw`` of the examples ``batch_rows``, their attention mask)."""
        batch = collate([{"input_ids": examples[i].input_ids, "labels": examples[i].labels} for i in batch_rows])
        batch = {k: v.to(state.device) for k, v in batch.items()}
        relabel = (sampled_relabel(cfg.sample_seed, [ids[i] for i in batch_rows], draw, batch["labels"])
                   if cfg.sampled_labels else None)
        return featurizer(batch, relabel), batch["attention_mask"]

    lengths = [len(ex) for ex in examples]
    writer = ShardWriter(out_dir)
    budget = resolve_token_budget(cfg.token_budget, lengths, cfg.max_batch_size, lambda rows: features_of(rows, 0),
                                  writer.job())
    meta = replace(meta, token_budget=budget)
    plan = group_shards(token_budget_batches(lengths, budget, cfg.max_batch_size), cfg.shard_examples)
    if state.is_main_process:
        writer.claim({**meta.to_dict(), "max_batch_size": cfg.max_batch_size, "shard_examples": cfg.shard_examples})
        write_json(out_dir / EXCLUDED_FILE, [vars(e) for e in excluded], indent=2)
        write_digests(out_dir, examples)
    state.wait_for_everyone()

    mine = [s for s in range(state.process_index, len(plan), state.num_processes) if not writer.is_done(s)]
    todo = sum(len(b) for s in mine for b in plan[s])
    logger.info("rank %d: %d of %d shards to do (%d examples)", state.process_index, len(mine), len(plan), todo)
    bar = progress(todo, f"extract[{state.process_index}]", "ex", position=state.process_index)
    start, tokens = time.perf_counter(), 0
    for shard in mine:
        rows, values = [], []
        for batch_rows in plan[shard]:
            for r in range(draws):
                feats, mask = features_of(batch_rows, r)
                store_rows = [i * draws + r for i in batch_rows]
                _check_rows(feats, [row_ids[j] for j in store_rows], cfg.store_dtype)
                rows.extend(store_rows)
                values.append(feats.cpu().numpy().astype(dtype))
            tokens += int(mask.sum())
            bar.update(len(batch_rows))
            bar.set_postfix(tok_s=f"{tokens / (time.perf_counter() - start):.0f}")
        writer.write(shard, np.asarray(rows, dtype=np.int64), np.concatenate(values))
    bar.close()
    state.wait_for_everyone()
    if state.is_main_process:
        writer.assemble(len(plan), row_ids, cfg.dim, dtype, meta)
        write_run_info(out_dir, cfg, "extract")
        logger.info("wrote %s: %d × %d %s features (%d excluded)", out_dir, len(row_ids), cfg.dim, dtype, len(excluded))
    state.wait_for_everyone()
    return out_dir


__all__ = ["ExtractConfig", "resolve_token_budget", "run_extract", "template_hash"]
