"""Sentence-embedding baseline: a sentence-transformers model (name or local folder, a setting).

A local Hugging Face folder that is not a sentence-transformers model (e.g. the tiny demo model)
is wrapped as ``Transformer`` + mean ``Pooling`` modules. Nothing is downloaded when the
name is a local folder; a Hub name needs the model in the local cache when offline.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path

import torch

from iaif.training.data import Example


def example_text(example: Example) -> str:
    """The example's turns' contents, one per line."""
    return "\n".join(m.content for m in example.messages)


def load_embedder(name: str, device: str = "cpu", max_length: int = 512):
    """A SentenceTransformer from a name or a folder (plain HF folders get mean pooling)."""
    from sentence_transformers import SentenceTransformer

    try:
        modules = importlib.import_module("sentence_transformers.sentence_transformer.modules")
    except ImportError:  # sentence-transformers < 6
        modules = importlib.import_module("sentence_transformers.models")
    Pooling, Transformer = modules.Pooling, modules.Transformer

    folder = Path(name)
    if folder.is_dir() and not (folder / "modules.json").is_file():
        word = Transformer(str(folder), max_seq_length=max_length)
        if word.tokenizer.pad_token is None:
            word.tokenizer.pad_token = word.tokenizer.eos_token
        dim = getattr(word, "get_embedding_dimension", None) or word.get_word_embedding_dimension
        pooling = Pooling(dim(), pooling_mode="mean")
        return SentenceTransformer(modules=[word, pooling], device=device)
    return SentenceTransformer(name, device=device)


@torch.no_grad()
def sentence_embeddings(examples: Sequence[Example], name: str, batch_size: int = 32, device: str = "cpu",
                        max_length: int = 512) -> torch.Tensor:
    """L2-normalised sentence embeddings of the examples, [n, H] (float32, CPU)."""
    model = load_embedder(name, device, max_length)
    emb = model.encode([example_text(e) for e in examples], batch_size=batch_size, convert_to_tensor=True,
                       normalize_embeddings=True, show_progress_bar=len(examples) > batch_size)
    return emb.float().cpu()
