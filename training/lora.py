"""Load a causal LM (Hub id or local folder) in fp32, bf16 or 4-bit NF4 (QLoRA), and wrap it with
a peft LoRA adapter.

4-bit loading goes through bitsandbytes with ``bnb_4bit_quant_type="nf4"`` asked for explicitly
and bf16 compute. It is meant for CUDA GPUs; bitsandbytes 0.50 also runs it on CPU when the layer
input widths are multiples of its 64-value quantisation block (the QLoRA test uses such a model).
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
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


def hide_bitsandbytes() -> None:
    """Keep bitsandbytes from being imported until a 4-bit model is asked for (``load_base_model``):
    peft and transformers import it whenever it is installed, which costs seconds and, without a GPU,
    logs a warning about a missing ``kernels`` package. Called by the ``iaif`` command at start-up."""
    if "bitsandbytes" not in sys.modules:
        sys.modules["bitsandbytes"] = None  # type: ignore[assignment]  # import raises ImportError, find_spec gives None


def _allow_bitsandbytes() -> None:
    """Undo ``hide_bitsandbytes`` and forget the availability answers given while it was hidden."""
    if "bitsandbytes" not in sys.modules or sys.modules["bitsandbytes"] is not None:
        return
    del sys.modules["bitsandbytes"]
    import peft.import_utils
    import transformers.utils.import_utils

    for check in (peft.import_utils.is_bnb_4bit_available, transformers.utils.import_utils.is_bitsandbytes_available):
        getattr(check, "cache_clear", lambda: None)()
    with _quiet_bitsandbytes_cpu_kernels():
        import bitsandbytes  # noqa: F401


@contextmanager
def _quiet_bitsandbytes_cpu_kernels() -> Iterator[None]:
    """Drop the one warning bitsandbytes logs on import without a GPU (optional ``kernels`` package missing)."""
    cpu_ops = logging.getLogger("bitsandbytes.backends.cpu.ops")

    def keep(record: logging.LogRecord) -> bool:
        return "kernels" not in record.getMessage()

    cpu_ops.addFilter(keep)
    try:
        yield
    finally:
        cpu_ops.removeFilter(keep)


@contextmanager
def quiet_peft_calls() -> Iterator[None]:
    """Around peft calls (building, training, saving and loading adapters): hide the FutureWarning
    transformers raises when peft reads the deprecated ``is_gradient_checkpointing`` property (peft's
    call, not ours), and peft's notes on adapters that include the embedding layer, which iaif asks for
    on purpose (``embed_tokens`` in ``target_modules``; it is then saved with the adapter, once per save)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        warnings.filterwarnings("ignore", message="Setting `save_embedding_layers` to `True`", category=UserWarning)
        warnings.filterwarnings("ignore", message="Model has `tie_word_embeddings=True` and a tied layer",
                                category=UserWarning)
        yield


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
        _allow_bitsandbytes()
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
    with quiet_peft_calls():
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
    base = load_base_model(cfg)
    with quiet_peft_calls():
        return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=trainable)


ADAPTER_HASH_IGNORED = ("base_model_name_or_path", "revision", "inference_mode", "peft_version")
"""Adapter config fields that do not change what the adapter computes (where the base model was
read from, and whether it was saved for inference), left out of ``adapter_hash``."""


def _canonical(value: Any) -> Any:
    """Config value with a fixed layout: dict keys sorted, lists of scalars sorted (peft's list fields,
    e.g. target_modules, are sets whose saved order changes from process to process)."""
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [_canonical(v) for v in value]
        if all(isinstance(v, (str, int, float, bool)) or v is None for v in items):
            return sorted(items, key=lambda v: (type(v).__name__, str(v)))
        return items
    return value


def adapter_hash_of(config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 (16 hex digits) of what defines a LoRA adapter: its canonicalised config (without
    ``ADAPTER_HASH_IGNORED``) and its weights (by name in sorted order: name, dtype, shape, bytes).
    The one definition of the adapter hash, for saved folders and for adapters in memory alike."""
    digest = hashlib.sha256()
    kept = {k: v for k, v in config.items() if k not in ADAPTER_HASH_IGNORED}
    digest.update(json.dumps(_canonical(kept), sort_keys=True, default=str).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def adapter_hash(adapter_dir: str | Path) -> str:
    """``adapter_hash_of`` a saved peft adapter folder (adapter_config.json + adapter_model.safetensors)."""
    from safetensors.torch import load_file

    for name in ADAPTER_FILES:
        if not (Path(adapter_dir) / name).is_file():
            raise FileNotFoundError(f"{adapter_dir}: not a peft adapter folder ({name} missing)")
    config = json.loads((Path(adapter_dir) / ADAPTER_FILES[0]).read_text(encoding="utf-8"))
    return adapter_hash_of(config, load_file(str(Path(adapter_dir) / ADAPTER_FILES[1])))


def model_adapter_hash(model: Any, adapter_name: str = "default") -> str:
    """``adapter_hash_of`` the adapter of a PeftModel in memory: equal to ``adapter_hash`` of the
    folder ``model.save_pretrained`` writes."""
    from peft import get_peft_model_state_dict

    config = model.peft_config[adapter_name].to_dict()
    return adapter_hash_of(config, get_peft_model_state_dict(model, adapter_name=adapter_name))


def _require_name(cfg: ModelConfig) -> None:
    if not cfg.name_or_path:
        raise ValueError("model.name_or_path: no base model given (a Hub id or a local folder)")
