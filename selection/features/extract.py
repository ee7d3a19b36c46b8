"""``iaif extract``: projected per-example LoRA-gradient features of a dataset into a feature store.

Runs on one process or many (``accelerate launch -m iaif extract ...``): every process builds the
same plan (length-grouped batches within a token budget, grouped into shards), takes the shards
``rank, rank + world, ...`` and writes each finished shard to the output folder; process 0
assembles the store in dataset order. Rerunning a killed job skips the shards already written.

Feature kinds × projection kinds (all four combinations work and share one projection space, so a
pool store of ``adam`` features and a target store of ``grad`` features are comparable):

* ``grad`` + ``factorised``: the fast path; δ and x are projected before the outer product.
* ``adam`` + any, ``grad`` + ``dense``: the exact per-example gradient ``[B, out, in]`` of each LoRA
  matrix is formed from the hooks (small: r is one side), Adam-preconditioned for ``adam``
  (elementwise, so it needs the full gradient), then projected.

Sampled labels (``sampled_labels: R`` > 0, grad features only), for the Gauss-Newton curvature of
``iaif select --curvature gn``: each target example gets R rows ``<id>#<r>`` (r = 0..R-1), the
gradient of its loss with every answer token replaced by a token drawn from the model's own
predictive distribution at that position (teacher-forced: same input ids, only the labels change).
Draw r of example ``id`` uses ``sample_generator_seed(sample_seed, id, r)`` (see there), so the
rows do not depend on batching or the number of processes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from iaif.common.atomic import write_json
from iaif.common.dist import process_state
from iaif.common.progress import progress
from iaif.selection.features.adam import AdamPreconditioner
from iaif.selection.features.batching import group_shards, token_budget_batches
from iaif.selection.features.fingerprint import EXCLUDED_FILE, dataset_fingerprint, write_digests
from iaif.selection.features.per_example_grads import LoraGradientHooks, LoraMatrix, Relabel, backward_per_example, find_lora_matrices
from iaif.selection.features.projection import DenseProjector, KroneckerProjector, ProjectionKind
from iaif.selection.features.store import (
    META_FILE,
    ShardWriter,
    StoreMeta,
    StoreMismatchError,
    require_match,
    sampled_row_id,
)
from iaif.training.collate import PaddingCollator
from iaif.training.data import (
    IGNORE_INDEX,
    TULU_ASSISTANT,
    TULU_SYSTEM,
    TULU_USER,
    DataConfig,
    Template,
    load_examples,
    tokenize_examples,
)
from iaif.training.lora import LoraSettings, ModelConfig

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

FeatureKind = Literal["grad", "adam"]
PROJECTION_VERSION = 1
"""Bumped whenever the projection's random matrices or layout change (stores of other versions do not mix)."""


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
    template: Template = "tulu"
    """Prompt format: Tulu-v2 markers or the tokenizer's chat template."""
    max_length: int = 2048
    """Truncate examples to this many tokens (examples left without answer tokens are excluded and reported)."""
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
    token_budget: int = 8192
    """Padded tokens per batch (batch size × longest example in it)."""
    max_batch_size: int = 64
    """Cap on examples per batch."""
    shard_examples: int = 1024
    """Examples per resumable shard."""
    output_dir: str = ""
    """Store folder (one per model, checkpoint, dataset and feature kind)."""


class LoraFeaturizer:
    """Per-example projected LoRA-gradient features of a batch, ``[B, d]`` fp32.

    Freezes every weight of ``model`` (the backward pass targets the embeddings) and puts it in
    eval mode (no dropout), so the features are deterministic."""

    def __init__(
        self,
        model: PreTrainedModel,
        feature: FeatureKind,
        projection: ProjectionKind,
        dim: int,
        seed: int,
        adam: AdamPreconditioner | None = None,
    ):
        if feature not in ("grad", "adam") or projection not in ("factorised", "dense"):
            raise ValueError(f"unknown feature/projection kind {feature!r}/{projection!r}")
        if feature == "adam" and adam is None:
            raise ValueError("adam features need the checkpoint's optimizer state")
        self.model, self.feature, self.projection, self.dim, self.adam = model, feature, projection, dim, adam
        self.matrices = find_lora_matrices(model)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        if projection == "factorised":
            self.projectors = {m.name: KroneckerProjector(seed, m.name, *m.shape, dim) for m in self.matrices}
        else:
            self.dense = DenseProjector(seed, dim)
            self.offsets, total = {}, 0
            for m in self.matrices:
                self.offsets[m.name] = total
                total += m.shape[0] * m.shape[1]
            if total > 2**37:
                raise ValueError(f"dense projection supports up to 2**37 LoRA parameters, the adapter has {total}")

    @property
    def num_parameters(self) -> int:
        return sum(m.shape[0] * m.shape[1] for m in self.matrices)

    def __call__(self, batch: dict[str, torch.Tensor], relabel: Relabel | None = None) -> torch.Tensor:
        """Features of ``batch``; with ``relabel``, of the loss on ``relabel(logits)`` (``backward_per_example``)."""
        total: dict[str, torch.Tensor] = {}

        def sink(matrix: LoraMatrix, grads: torch.Tensor) -> None:
            if self.adam is not None:
                grads = self.adam.direction(matrix.name, grads)
            if self.projection == "factorised":
                part = self.projectors[matrix.name].project_weight_grads(grads)
            else:
                part = self.dense.project(grads.flatten(1), self.offsets[matrix.name])
            total["sum"] = part if "sum" not in total else total["sum"] + part

        fast = self.feature == "grad" and self.projection == "factorised"
        hooks = LoraGradientHooks(self.matrices, "factorised" if fast else "full",
                                  projectors=self.projectors if fast else None, sink=None if fast else sink)
        with hooks:
            backward_per_example(self.model, batch, relabel)
        wrong = [m.name for m in self.matrices if hooks.calls.get(m.name, 0) != 1]
        if wrong:
            raise RuntimeError(f"LoRA matrices {wrong[:3]} did not receive exactly one gradient in the backward pass "
                               "(gradient checkpointing and LoRA layers bypassed in forward are not supported)")
        features = hooks.features if fast else total.get("sum")
        if features is None:
            raise RuntimeError("the backward pass produced no LoRA gradient")
        return features


# ------------------------------------------------------------------------------------------------
# Sampled labels
# ------------------------------------------------------------------------------------------------


def sample_generator_seed(sample_seed: int, example_id: str, r: int) -> int:
    """Seed of draw ``r`` of example ``example_id``: the first 8 bytes of
    sha256(f"{sample_seed}/{r}/{example_id}") read big-endian, modulo 2**63."""
    digest = hashlib.sha256(f"{sample_seed}/{r}/{example_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 2**63


def sample_labels(logits: torch.Tensor, labels: torch.Tensor, seeds: list[int]) -> torch.Tensor:
    """``labels`` with every answer token (label ≠ IGNORE_INDEX at position t ≥ 1) replaced by a draw
    from softmax(logits[b, t-1]), the model's predictive distribution for that position.

    Row b draws one float64 uniform per answer token, in position order, from a CPU
    ``torch.Generator`` seeded with ``seeds[b]``, and takes the first token whose cumulative
    probability (float64) exceeds u · total (inverse CDF; zero-probability tokens are never drawn)."""
    if len(seeds) != labels.shape[0]:
        raise ValueError(f"{len(seeds)} seeds for a batch of {labels.shape[0]} rows")
    out = labels.clone()
    vocab = logits.shape[-1]
    for b, seed in enumerate(seeds):
        pos = torch.nonzero(labels[b, 1:] != IGNORE_INDEX).flatten()
        u = torch.rand(len(pos), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        cdf = torch.softmax(logits[b, pos].double(), dim=-1).cumsum(dim=-1)
        draw = torch.searchsorted(cdf, (u.to(cdf.device) * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)
        out[b, pos + 1] = draw.clamp_max(vocab - 1).to(out.device)
    return out


# ------------------------------------------------------------------------------------------------
# The stage
# ------------------------------------------------------------------------------------------------


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def template_hash(template: str, tokenizer: Any) -> str:
    """Hash of the prompt format: the Tulu markers or the tokenizer's chat template, plus the eos token."""
    body = tokenizer.chat_template if template == "chat" else TULU_SYSTEM + TULU_USER + TULU_ASSISTANT
    return _sha(json.dumps([template, body, tokenizer.eos_token]))


def _load_model(cfg: ExtractConfig, device: torch.device) -> tuple[Any, dict[str, Any], AdamPreconditioner | None]:
    """(PeftModel on ``device``, checkpoint metadata for the store, Adam preconditioner or None)."""
    from iaif.training.checkpoint import META_FILE as CHECKPOINT_META
    from iaif.training.checkpoint import load_checkpoint
    from iaif.training.lora import adapter_hash, add_lora, load_adapter, load_base_model, model_adapter_hash

    adam = None
    if not cfg.checkpoint:
        if cfg.feature == "adam":
            raise ValueError("feature=adam needs a warm-up checkpoint (checkpoint: ...checkpoint-epochE)")
        torch.manual_seed(cfg.seed)
        model = add_lora(load_base_model(cfg.model), cfg.lora)
        info: dict[str, Any] = {"checkpoint": None, "adapter_hash": "fresh-" + model_adapter_hash(model), "lr_weight": None}
    elif (Path(cfg.checkpoint) / CHECKPOINT_META).is_file():
        ckpt = load_checkpoint(cfg.checkpoint)
        if ckpt.base_model != cfg.model.name_or_path:
            logger.warning("checkpoint %s was trained on %s; extracting with %s", ckpt.path, ckpt.base_model, cfg.model.name_or_path)
        model = load_adapter(cfg.model, ckpt.adapter_dir)
        info = {"checkpoint": str(ckpt.path), "epoch": ckpt.epoch, "adapter_hash": ckpt.adapter_hash,
                "lr_weight": ckpt.lr_weight, "mean_lr": ckpt.mean_lr}
        if cfg.feature == "adam":
            shapes = {m.name: m.shape for m in find_lora_matrices(model)}
            adam = AdamPreconditioner(ckpt.state, ckpt.betas, ckpt.eps, shapes)
    else:
        if cfg.feature == "adam":
            raise ValueError(f"checkpoint: {cfg.checkpoint} is a bare adapter folder without optimizer state; "
                             "feature=adam needs a warm-up checkpoint folder")
        model = load_adapter(cfg.model, cfg.checkpoint)
        info = {"checkpoint": str(Path(cfg.checkpoint)), "adapter_hash": adapter_hash(cfg.checkpoint), "lr_weight": None}
    if not getattr(model, "hf_device_map", None):  # 4-bit models are placed when loaded
        model.to(device)
    return model, info, adam


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
    examples, excluded = tokenize_examples(load_examples(cfg.data), tokenizer, cfg.template, cfg.max_length)
    if not examples:
        raise ValueError(f"{cfg.data.path}: every example was excluded (no answer tokens within max_length={cfg.max_length})")
    ids = [ex.id for ex in examples]
    draws = max(cfg.sampled_labels, 1)
    row_ids = [sampled_row_id(i, r) for i in ids for r in range(cfg.sampled_labels)] if cfg.sampled_labels else ids
    model, ckpt_info, adam = _load_model(cfg, state.device)
    featurizer = LoraFeaturizer(model, cfg.feature, cfg.projection, cfg.dim, cfg.seed, adam)
    dtype = "float16" if cfg.store_dtype == "fp16" else "float32"
    meta = StoreMeta(
        model=cfg.model.name_or_path, model_revision=cfg.model.revision, precision=cfg.model.precision,
        **ckpt_info,
        feature=cfg.feature, projection=cfg.projection, projection_seed=cfg.seed, dim=cfg.dim,
        projection_version=PROJECTION_VERSION, dtype=dtype,
        dataset=cfg.data.path, dataset_fingerprint=dataset_fingerprint(examples), num_examples=len(examples),
        num_excluded=len(excluded), template=cfg.template, template_hash=template_hash(cfg.template, tokenizer),
        max_length=cfg.max_length, lora_parameters=featurizer.num_parameters, normalised=False,
        sampled_labels=cfg.sampled_labels, sample_seed=cfg.sample_seed if cfg.sampled_labels else None,
        tool_version=package_version(),
    )
    if (out_dir / META_FILE).is_file():
        done, wanted = StoreMeta.read(out_dir / META_FILE).to_dict(), meta.to_dict()
        require_match(done, wanted, [k for k in wanted if k != "tool_version"],
                      f"{out_dir} already holds a finished store of other settings")
        logger.info("%s: store already complete", out_dir)
        return out_dir

    plan = group_shards(token_budget_batches([len(ex) for ex in examples], cfg.token_budget, cfg.max_batch_size),
                        cfg.shard_examples)
    writer = ShardWriter(out_dir)
    if state.is_main_process:
        writer.claim({**meta.to_dict(), "token_budget": cfg.token_budget, "max_batch_size": cfg.max_batch_size,
                      "shard_examples": cfg.shard_examples})
        write_json(out_dir / EXCLUDED_FILE, [vars(e) for e in excluded], indent=2)
        write_digests(out_dir, examples)
    state.wait_for_everyone()

    mine = [s for s in range(state.process_index, len(plan), state.num_processes) if not writer.is_done(s)]
    todo = sum(len(b) for s in mine for b in plan[s])
    logger.info("rank %d: %d of %d shards to do (%d examples)", state.process_index, len(mine), len(plan), todo)
    collate = PaddingCollator(tokenizer.pad_token_id)
    bar = progress(todo, f"extract[{state.process_index}]", "ex", position=state.process_index)
    start, tokens = time.perf_counter(), 0
    for shard in mine:
        rows, values = [], []
        for batch_rows in plan[shard]:
            batch = collate([{"input_ids": examples[i].input_ids, "labels": examples[i].labels} for i in batch_rows])
            batch = {k: v.to(state.device) for k, v in batch.items()}
            for r in range(draws):
                relabel = None
                if cfg.sampled_labels:
                    seeds = [sample_generator_seed(cfg.sample_seed, ids[i], r) for i in batch_rows]
                    relabel = partial(sample_labels, labels=batch["labels"], seeds=seeds)
                feats = featurizer(batch, relabel)
                store_rows = [i * draws + r for i in batch_rows]
                _check_rows(feats, [row_ids[j] for j in store_rows], cfg.store_dtype)
                rows.extend(store_rows)
                values.append(feats.cpu().numpy().astype(dtype))
            tokens += int(batch["attention_mask"].sum())
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


__all__ = ["ExtractConfig", "LoraFeaturizer", "StoreMismatchError", "run_extract", "dataset_fingerprint", "template_hash",
           "sample_generator_seed", "sample_labels"]
