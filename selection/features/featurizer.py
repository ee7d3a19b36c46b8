"""The featurizer: projected per-example LoRA-gradient features of a batch (``LoraFeaturizer``), the
model it reads (``load_lora_model``) and sampled labels; the ``iaif extract`` stage
(``iaif.selection.features.extract``) and the benchmarks drive it.

Feature kinds × projection kinds (all four combinations work and share one projection space, so a
pool store of ``adam`` features and a target store of ``grad`` features are comparable):

* ``grad`` + ``factorised``: the fast path; δ and x are projected before the outer product.
* ``adam`` + any, ``grad`` + ``dense``: the exact per-example gradient ``[B, out, in]`` of each LoRA
  matrix is formed from the hooks (small: r is one side), Adam-preconditioned for ``adam``
  (elementwise, so it needs the full gradient), then projected.

Sampled labels (for the Gauss-Newton curvature of ``iaif select --curvature gn``): draw r of an
example is the gradient of its loss with every answer token replaced by a token drawn from the
model's own predictive distribution at that position (teacher-forced: same input ids, only the labels
change). Draw r of example ``id`` uses ``sample_generator_seed(sample_seed, id, r)`` (see there), so
the draws do not depend on batching or the number of processes.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from iaif.selection.features.adam import AdamPreconditioner
from iaif.selection.features.per_example_grads import LoraGradientHooks, LoraMatrix, Relabel, backward_per_example, find_lora_matrices
from iaif.selection.features.projection import DenseProjector, KroneckerProjector, ProjectionKind
from iaif.training.data import IGNORE_INDEX
from iaif.training.lora import LoraSettings, ModelConfig

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

FeatureKind = Literal["grad", "adam"]
PROJECTION_VERSION = 1
"""Bumped whenever the projection's random matrices or layout change (stores of other versions do not mix)."""


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


def sampled_relabel(sample_seed: int, example_ids: Sequence[str], draw: int, labels: torch.Tensor) -> Relabel:
    """The relabelling of draw ``draw`` for a batch of the examples ``example_ids`` (``sample_labels``
    with each example's seed), for ``LoraFeaturizer.__call__``."""
    seeds = [sample_generator_seed(sample_seed, i, draw) for i in example_ids]
    return partial(sample_labels, labels=labels, seeds=seeds)


# ------------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------------


def load_lora_model(model_cfg: ModelConfig, checkpoint: str, feature: FeatureKind, lora: LoraSettings, seed: int,
                    device: torch.device) -> tuple[Any, dict[str, Any], AdamPreconditioner | None]:
    """The model to featurize: (PeftModel on ``device``, the checkpoint's store metadata, Adam
    preconditioner or None).

    ``checkpoint``: a warm-up checkpoint folder, a bare peft adapter folder (grad features only), or
    empty: a fresh adapter of ``lora`` initialised with ``seed``."""
    from iaif.training.checkpoint import META_FILE as CHECKPOINT_META
    from iaif.training.checkpoint import load_checkpoint
    from iaif.training.lora import adapter_hash, add_lora, load_adapter, load_base_model, model_adapter_hash

    adam = None
    if not checkpoint:
        if feature == "adam":
            raise ValueError("feature=adam needs a warm-up checkpoint (checkpoint: ...checkpoint-epochE)")
        torch.manual_seed(seed)
        model = add_lora(load_base_model(model_cfg), lora)
        info: dict[str, Any] = {"checkpoint": None, "adapter_hash": "fresh-" + model_adapter_hash(model), "lr_weight": None}
    elif (Path(checkpoint) / CHECKPOINT_META).is_file():
        ckpt = load_checkpoint(checkpoint)
        if ckpt.base_model != model_cfg.name_or_path:
            logger.warning("checkpoint %s was trained on %s; extracting with %s", ckpt.path, ckpt.base_model, model_cfg.name_or_path)
        model = load_adapter(model_cfg, ckpt.adapter_dir)
        info = {"checkpoint": str(ckpt.path), "epoch": ckpt.epoch, "adapter_hash": ckpt.adapter_hash,
                "lr_weight": ckpt.lr_weight, "mean_lr": ckpt.mean_lr}
        if feature == "adam":
            shapes = {m.name: m.shape for m in find_lora_matrices(model)}
            adam = AdamPreconditioner(ckpt.state, ckpt.betas, ckpt.eps, shapes)
    else:
        if feature == "adam":
            raise ValueError(f"checkpoint: {checkpoint} is a bare adapter folder without optimizer state; "
                             "feature=adam needs a warm-up checkpoint folder")
        model = load_adapter(model_cfg, checkpoint)
        info = {"checkpoint": str(Path(checkpoint)), "adapter_hash": adapter_hash(checkpoint), "lr_weight": None}
    if not getattr(model, "hf_device_map", None):  # 4-bit models are placed when loaded
        model.to(device)
    return model, info, adam
