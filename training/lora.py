"""Load a causal LM (Hub id or local folder) in fp32, bf16 or 4-bit NF4 (QLoRA), and wrap it with
a peft LoRA adapter.

4-bit loading goes through bitsandbytes with ``bnb_4bit_quant_type="nf4"`` asked for explicitly
and bf16 compute. It is meant for CUDA GPUs; bitsandbytes 0.50 also runs it on CPU when the layer
input widths are multiples of its 64-value quantisation block (the QLoRA test uses such a model).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from iaif.common.contracts import ADAPTER_CONFIG_FILE

logger = logging.getLogger(__name__)

Precision = Literal["auto", "fp32", "bf16", "4bit"]
ADAPTER_FILES = (ADAPTER_CONFIG_FILE, "adapter_model.safetensors")


@dataclass
class ModelConfig:
    """Which base model to load and how."""

    name_or_path: str = ""
    """Hub model id (e.g. meta-llama/Llama-3.1-8B) or a local HF folder."""
    revision: str = "main"
    """Hub revision (branch, tag or commit); ignored for local folders."""
    precision: Precision = "auto"
    """Weights/compute: fp32, bf16, 4bit (QLoRA: NF4 weights, bf16 compute) or auto (bf16 on a GPU with bf16, else fp32)."""
    attn_implementation: str = "sdpa"
    """Attention kernel passed to from_pretrained (sdpa, eager, flash_attention_2)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    trust_remote_code: bool = False
    """Allow model code from the Hub repository."""


@dataclass
class LoraSettings:
    """peft LoRA adapter settings (defaults: the LESS recipe)."""

    r: int = 128
    """LoRA rank."""
    alpha: int = 512
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = 0.1
    """Dropout on the LoRA input."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Module names that get an adapter."""


def resolve_precision(precision: Precision) -> Literal["fp32", "bf16", "4bit"]:
    """``auto`` → bf16 on a CUDA GPU that supports it, else fp32; other values unchanged."""
    if precision == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    if precision not in ("fp32", "bf16", "4bit"):
        raise ValueError(f"model.precision: unknown value '{precision}' (fp32, bf16, 4bit or auto)")
    return precision


def nf4_quantization_config() -> Any:
    """bitsandbytes 4-bit config for QLoRA: NF4 weights, double quantisation, bf16 compute."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def load_tokenizer(cfg: ModelConfig) -> Any:
    """The model's tokenizer, with a pad token (the eos token when the model has none)."""
    from transformers import AutoTokenizer

    _require_name(cfg)
    tok = AutoTokenizer.from_pretrained(cfg.name_or_path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(f"{cfg.name_or_path}: tokenizer has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok


def load_base_model(cfg: ModelConfig) -> torch.nn.Module:
    """The base causal LM in the configured precision (4bit: prepared for k-bit training)."""
    from transformers import AutoModelForCausalLM

    _require_name(cfg)
    precision = resolve_precision(cfg.precision)
    kwargs: dict[str, Any] = dict(
        revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, attn_implementation=cfg.attn_implementation
    )
    if precision == "4bit":
        kwargs.update(quantization_config=nf4_quantization_config(), dtype=torch.bfloat16)
    else:
        kwargs["dtype"] = torch.bfloat16 if precision == "bf16" else torch.float32
    logger.info("loading %s (%s)", cfg.name_or_path, precision)
    model = AutoModelForCausalLM.from_pretrained(cfg.name_or_path, **kwargs)
    if precision == "4bit":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    elif cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    model.config.use_cache = False
    return model


def add_lora(model: torch.nn.Module, lora: LoraSettings) -> Any:
    """Wrap ``model`` in a trainable peft LoRA adapter (only the LoRA A/B weights train)."""
    from peft import LoraConfig, get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in lora.target_modules if m not in present]
    if missing:
        raise ValueError(f"lora.target_modules: {missing} not found in the model (it has e.g. {sorted(present)[:12]})")
    config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules), bias="none", task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    logger.info("LoRA r=%d alpha=%d on %s: %d trainable parameters", lora.r, lora.alpha, lora.target_modules, trainable)
    return peft_model


def load_adapter(cfg: ModelConfig, adapter_dir: str | Path, trainable: bool = False) -> Any:
    """Base model from ``cfg`` with a saved adapter loaded (``trainable`` keeps LoRA grads on)."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    for name in ADAPTER_FILES:
        if not (adapter_dir / name).is_file():
            raise FileNotFoundError(f"{adapter_dir}: not a peft adapter folder ({name} missing)")
    return PeftModel.from_pretrained(load_base_model(cfg), str(adapter_dir), is_trainable=trainable)


def adapter_hash(adapter_dir: str | Path) -> str:
    """SHA-256 (16 hex digits) of an adapter folder's config and weights files."""
    digest = hashlib.sha256()
    for name in ADAPTER_FILES:
        path = Path(adapter_dir) / name
        if not path.is_file():
            raise FileNotFoundError(f"{adapter_dir}: not a peft adapter folder ({name} missing)")
        digest.update(name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _require_name(cfg: ModelConfig) -> None:
    if not cfg.name_or_path:
        raise ValueError("model.name_or_path: no base model given (a Hub id or a local folder)")
