"""RDS+ embeddings (Ivison et al. 2025): the base model's last hidden states, position-weighted
mean pooling (weight of token i ∝ i, padding excluded), L2-normalised."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from iaif.training.data import Example, Template, render

logger = logging.getLogger(__name__)


def position_weighted_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ_i w_i h_i / Σ_i w_i with w_i = i (1-based position among real tokens), [B, L, H] → [B, H]."""
    pos = mask.cumsum(dim=1) * mask
    weights = pos.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1)


@torch.no_grad()
def rds_embeddings(examples: Sequence[Example], model_path: str, template: Template = "tulu",
                   max_length: int = 2048, batch_size: int = 16, device: str = "cpu",
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """L2-normalised RDS+ embedding of every example's rendered text (prompt and answer), [n, H]."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not model_path:
        raise ValueError("rds needs the base model: set model (Hub id or local folder)")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).eval()
    torch.nn.Module.to(model, device)  # transformers' decorator on PreTrainedModel.to hides its signature from type checkers
    texts = [render(ex, tokenizer, template)[0] for ex in examples]
    lengths = [len(t) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: -lengths[i])  # similar lengths share a batch
    out = torch.empty(len(texts), model.config.hidden_size, dtype=torch.float32)
    for start in tqdm(range(0, len(order), batch_size), desc="RDS+ embeddings", mininterval=2.0):
        idx = order[start : start + batch_size]
        enc = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True, truncation=True,
                        max_length=max_length).to(device)
        hidden = model(**enc, output_hidden_states=True).hidden_states[-1]
        pooled = position_weighted_mean(hidden.float(), enc["attention_mask"])
        out[idx] = torch.nn.functional.normalize(pooled, dim=1).cpu()
    return out
