"""``iaif plan``: the expected peak memory per device of ``iaif extract`` or ``iaif train`` for a model,
precision, LoRA setting and token budget, and the feature store's size on disk, by arithmetic only
(nothing is loaded but the model's config; the parameter shapes come from building the model on
torch's ``meta`` device, which allocates nothing).

Peak = weights + activations + LoRA (+ gradients and Adam state) + projection buffers, where

* weights: every parameter at the precision's bytes (fp32 4, bf16 2; 4bit: NF4 decoder linear layers
  at 0.5 byte plus the double-quantised block constants, every other parameter fp32 as
  ``prepare_model_for_kbit_training`` leaves it);
* activations: what autograd keeps for the backward pass, per token, for a Llama-style decoder
  (``hidden_size``, ``intermediate_size``, heads, ``head_dim``): per layer the two RMSNorm inputs
  (fp32), the attention's q, k, v, output and log-sum-exp (sdpa), plus the T×T probabilities for
  ``attention: eager`` (and sdpa's math fallback), the MLP's gate, SiLU output and up projection, and
  the LoRA inputs the method keeps (extract: the factorised hooks' projected inputs, or the inputs
  themselves for dense/adam; train: each LoRA input and dropout mask, 1 byte per value on CUDA, the
  input's dtype on the CPU; peft casts LoRA inputs to the adapter's fp32); plus the logits block
  (logits and the fp32 log-softmax the loss keeps; the fp32 copy of bf16 logits is freed once the
  log-softmax is taken); plus the backward pass's own buffers at its peak, the larger of the loss's two
  fp32 [T, V] gradients and one layer's gradients. Frozen linear layers keep nothing (their input
  gradient needs only the weight);
* LoRA: the adapter in fp32 (peft keeps it so for bf16 models); train adds its gradients and AdamW's
  two moments, extract with ``feature: adam`` the checkpoint's two moments;
* projection buffers (extract): the cached factorised projection matrices and the per-batch feature
  sums, or the dense projector's cached Rademacher blocks and one matrix's full per-example gradients.

The process's own footprint (CUDA context, libraries: ~0.5-1 GiB) is not included.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from iaif.common.atomic import write_json
from iaif.selection.features.featurizer import FeatureKind
from iaif.selection.features.projection import ProjectionKind, factor_dims
from iaif.training.lora import LoraSettings

logger = logging.getLogger(__name__)

PlanPrecision = Literal["fp32", "bf16", "4bit"]
NPY_HEADER_BYTES = 128
"""Header of a ``.npy`` file of a 2-D array (numpy pads it to 128 bytes)."""
DENSE_CACHE_BYTES = 2 << 30
"""The dense projector's block cache limit (``DenseProjector(cache_bytes=...)``)."""
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
"""NF4 with double quantisation: 4 bits per weight, an 8-bit absmax per 64-weight block and an fp32
constant per 256 blocks."""


@dataclass
class PlanConfig:
    """Settings of ``iaif plan``."""

    model: str = ""
    """Hub model id, local model folder, or a config.json file."""
    revision: str = "main"
    """Hub revision (ignored for local folders and files)."""
    mode: Literal["extract", "train"] = "extract"
    """extract: per-example LoRA-gradient features (iaif extract); train: LoRA fine-tuning with AdamW (iaif train/warmup)."""
    precision: PlanPrecision = "bf16"
    """Weights/compute precision: fp32, bf16, or 4bit (NF4 weights, bf16 compute)."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA settings (r, target_modules, dropout; train mode keeps a dropout mask when dropout > 0)."""
    token_budget: int = 8192
    """Padded tokens per forward pass (extract: token_budget; train: per_device_batch_size × longest example)."""
    seq_len: int = 2048
    """Longest example in the batch (rows = token_budget // seq_len, at least 1)."""
    device: Literal["cuda", "cpu"] = "cuda"
    """Where it runs: dropout keeps a 1-byte mask on CUDA, a mask in the input's dtype on the CPU."""
    attention: Literal["sdpa", "eager"] = "sdpa"
    """sdpa: a fused kernel that keeps no T×T matrix; eager (and sdpa's math fallback): keeps the attention probabilities."""
    feature: FeatureKind = "grad"
    """Extract: grad or adam features (adam keeps the checkpoint's Adam moments and full per-example gradients)."""
    projection: ProjectionKind = "factorised"
    """Extract: factorised or dense projection."""
    dim: int = 8192
    """Projected dimension d of the features."""
    store_dtype: Literal["fp16", "fp32"] = "fp16"
    """Dtype of the stored features."""
    pool_size: int = 0
    """N: examples in the pool whose feature-store size on disk is shown (0: none)."""
    id_bytes: int = 16
    """Mean length of an example id in characters (for ids.json)."""
    output_file: str = ""
    """Also write the estimate as JSON here (empty: print only)."""


@dataclass(frozen=True)
class Shape:
    """What the estimate needs from a model: parameter counts and the decoder's sizes."""

    params: int
    """All parameters (tied ones once)."""
    quantisable: int
    """Parameters of the decoder layers' linear maps (what 4-bit loading quantises)."""
    lora: tuple[tuple[int, int, int], ...]
    """(in_features, out_features, layer index or -1) of every linear layer LoRA targets."""
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int


@dataclass(frozen=True)
class MemoryPlan:
    """The estimate in bytes (``peak`` per device) and the store size on disk."""

    weights: int
    activations: int
    lora: int
    projection: int
    store_bytes: int
    rows: int
    lora_parameters: int

    @property
    def peak(self) -> int:
        return self.weights + self.activations + self.lora + self.projection


def load_model_config(name: str, revision: str = "main") -> Any:
    """A transformers config from a Hub id, a local folder or a config.json file."""
    from transformers import AutoConfig

    if not name:
        raise ValueError("model: no model given (a Hub id, a local folder or a config.json file)")
    path = Path(name)
    if path.is_file():
        data = json.loads(path.read_text(encoding="utf-8"))
        if "model_type" not in data:
            raise ValueError(f"{path}: not a transformers config (no model_type field)")
        return AutoConfig.for_model(**data)
    return AutoConfig.from_pretrained(name, revision=revision)


def model_shape(config: Any, target_modules: list[str]) -> Shape:
    """Parameter counts from the model built on the meta device, and the decoder sizes from ``config``."""
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    layer_modules = model.get_decoder().layers
    quantisable, lora = 0, []
    for index, layer in enumerate(layer_modules):
        for name, module in layer.named_modules():
            if isinstance(module, nn.Linear):
                quantisable += module.weight.numel() + (module.bias.numel() if module.bias is not None else 0)
                if name.rsplit(".", 1)[-1] in target_modules:
                    lora.append((module.in_features, module.out_features, index))
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in target_modules and ".layers." not in f".{name}":
            lora.append((module.in_features, module.out_features, -1))
    if not lora:
        raise ValueError(f"lora.target_modules: {target_modules} match no linear layer of the model")
    missing = [k for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size")
               if getattr(config, k, None) is None]
    if missing:
        raise ValueError(f"model config has no {missing}: the activation estimate covers Llama-style decoders")
    heads = config.num_attention_heads
    return Shape(
        params=sum(p.numel() for p in model.parameters()), quantisable=quantisable, lora=tuple(lora),
        layers=config.num_hidden_layers, hidden=config.hidden_size, intermediate=config.intermediate_size,
        heads=heads, kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads, vocab=config.vocab_size,
    )


def weight_bytes(shape: Shape, precision: PlanPrecision) -> int:
    """Bytes of the base model's weights at ``precision``."""
    if precision == "4bit":
        return math.ceil(shape.quantisable * NF4_BYTES_PER_PARAM) + (shape.params - shape.quantisable) * 4
    return shape.params * (4 if precision == "fp32" else 2)


def _lora_side_dims(in_features: int, out_features: int, r: int, dim: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """((k_out, k_in) of lora_A, (k_out, k_in) of lora_B), as ``KroneckerProjector`` chooses them."""
    small, large = factor_dims(dim)

    def sides(out: int, inp: int) -> tuple[int, int]:
        return (small, large) if out <= inp else (large, small)

    return sides(r, in_features), sides(out_features, r)


def projection_matrix_bytes(shape: Shape, r: int, dim: int) -> int:
    """Bytes of the factorised projection's cached fp32 matrices (P_out, P_in of every LoRA matrix)."""
    total = 0
    for in_f, out_f, _ in shape.lora:
        (ko_a, ki_a), (ko_b, ki_b) = _lora_side_dims(in_f, out_f, r, dim)
        total += (ko_a * r + ki_a * in_f + ko_b * out_f + ki_b * r) * 4
    return total


def estimate(cfg: PlanConfig, shape: Shape) -> MemoryPlan:
    """The memory plan of ``cfg`` for a model of ``shape`` (see the module docstring for the terms)."""
    if cfg.token_budget < 1 or cfg.seq_len < 1:
        raise ValueError(f"token_budget and seq_len must be positive, got {cfg.token_budget} and {cfg.seq_len}")
    rows = max(1, cfg.token_budget // cfg.seq_len)
    tokens = rows * cfg.seq_len
    e = 4 if cfg.precision == "fp32" else 2  # compute dtype bytes
    r = cfg.lora.r
    extract = cfg.mode == "extract"
    full = extract and (cfg.feature == "adam" or cfg.projection == "dense")

    per_layer = 2 * shape.hidden * 4  # RMSNorm inputs, upcast to fp32
    per_layer += (2 * shape.heads * shape.head_dim + 2 * shape.kv_heads * shape.head_dim) * e + shape.heads * 4
    if cfg.attention == "eager":
        per_layer += shape.heads * cfg.seq_len * (4 + (e if e != 4 else 0))  # fp32 softmax + its cast
    per_layer += 3 * shape.intermediate * e  # SiLU input, SiLU output, up projection
    layer_lora = [0] * shape.layers
    outside = 0
    for in_f, out_f, layer in shape.lora:
        if extract and not full:
            (_, k_in_a), (_, k_in_b) = _lora_side_dims(in_f, out_f, r, cfg.dim)
            kept = (k_in_a + k_in_b) * 4  # the hooks' projected inputs
        elif extract:
            kept = (in_f + r) * 4  # the inputs themselves, cast to the adapter's fp32
        else:
            mask = (1 if cfg.device == "cuda" else 4) * in_f if cfg.lora.dropout > 0 else 0
            kept = (in_f + r) * 4 + mask  # fp32 LoRA inputs and dropout mask
        if layer >= 0:
            layer_lora[layer] += kept
        else:
            outside += kept
    kept = sum(per_layer + extra for extra in layer_lora) + outside + shape.hidden * 4  # + the final norm's input
    kept += shape.vocab * (e + 4)  # the logits and the fp32 log-softmax the loss keeps
    # the backward's own buffers on top of what is kept: the loss's two fp32 [T, V] gradients at its start, or
    # later one layer's gradients (as large as its kept activations; earlier layers' are freed by then)
    per_token = kept + max(2 * 4 * shape.vocab, per_layer + max(layer_lora, default=0))
    if extract:
        per_token += shape.hidden * e  # the input embeddings the backward pass targets
    activations = tokens * per_token

    lora_params = sum(r * (in_f + out_f) for in_f, out_f, _ in shape.lora)
    lora = lora_params * (4 + 4 + 8 if not extract else 4 + (8 if cfg.feature == "adam" else 0))

    projection = 0
    if extract and cfg.projection == "factorised":
        projection = projection_matrix_bytes(shape, r, cfg.dim) + 3 * rows * cfg.dim * 4
        if full:  # adam: one matrix's full gradients [B, out, in] before projection
            projection += rows * max(max(r * i, o * r) for i, o, _ in shape.lora) * 4
    elif extract:
        projection = min(DENSE_CACHE_BYTES, cfg.dim * lora_params * 4) + 3 * rows * cfg.dim * 4
        projection += rows * max(max(r * i, o * r) for i, o, _ in shape.lora) * 4
    dtype_bytes = 2 if cfg.store_dtype == "fp16" else 4
    store = (NPY_HEADER_BYTES + cfg.pool_size * cfg.dim * dtype_bytes + cfg.pool_size * (cfg.id_bytes + 4)
             if cfg.pool_size else 0)
    return MemoryPlan(weights=weight_bytes(shape, cfg.precision), activations=activations, lora=lora,
                      projection=projection, store_bytes=store, rows=rows, lora_parameters=lora_params)


def _gib(n: int) -> str:
    return f"{n / 2**30:10.3f} GiB" if n >= 2**30 else f"{n / 2**20:10.1f} MiB"


def format_plan(cfg: PlanConfig, plan: MemoryPlan, shape: Shape) -> str:
    """The table ``iaif plan`` prints."""
    what = (f"{cfg.mode}, {cfg.precision}, LoRA r={cfg.lora.r} on {','.join(cfg.lora.target_modules)}, "
            f"{plan.rows} × {cfg.seq_len} tokens, attention {cfg.attention}")
    if cfg.mode == "extract":
        what += f", {cfg.feature} features, {cfg.projection} projection d={cfg.dim}"
    lines = [f"{cfg.model}: {shape.params / 1e6:.1f}M parameters, {plan.lora_parameters / 1e6:.2f}M LoRA",
             what, "",
             f"  weights              {_gib(plan.weights)}",
             f"  activations          {_gib(plan.activations)}",
             f"  LoRA {'params+grads+Adam' if cfg.mode == 'train' else 'params          '} {_gib(plan.lora)}",
             f"  projection buffers   {_gib(plan.projection)}",
             f"  peak per device      {_gib(plan.peak)}   (plus the process's own ~0.5-1 GiB)"]
    if cfg.pool_size:
        lines.append(f"  feature store ({cfg.pool_size} examples × {cfg.dim} {cfg.store_dtype}) on disk {_gib(plan.store_bytes)}")
    return "\n".join(lines)


def run_plan(cfg: PlanConfig) -> Path:
    """Print the memory plan of ``cfg`` (and write it as JSON to ``output_file`` if given)."""
    shape = model_shape(load_model_config(cfg.model, cfg.revision), list(cfg.lora.target_modules))
    plan = estimate(cfg, shape)
    print(format_plan(cfg, plan, shape))
    if not cfg.output_file:
        return Path()
    write_json(Path(cfg.output_file), {**asdict(plan), "peak": plan.peak, "config": asdict(cfg)}, indent=2)
    return Path(cfg.output_file)


__all__ = ["MemoryPlan", "PlanConfig", "estimate", "load_model_config", "model_shape", "projection_matrix_bytes", "run_plan",
           "weight_bytes"]
