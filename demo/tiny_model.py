"""A tiny offline Llama-architecture base model and tokenizer, built from generated text.

:func:`build_tiny_model` trains a byte-level BPE tokenizer (``tokenizers``) on the pretraining
corpus of :mod:`iaif.demo.demo_data`, pre-trains a randomly initialised ``LlamaForCausalLM`` on it
with ``transformers.Trainer`` on CPU, and saves a normal Hugging Face folder (model, tokenizer,
Tulu chat template) that ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained`` load.

The result is cached: the folder records a hash of the config, and a second call with the same
config returns it at once. Same config (seed included) -> identical weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from iaif.common.atomic import temp_path
from iaif.common.provenance import config_to_dict, write_run_info
from iaif.demo.demo_data import EOS, pretraining_corpus
from iaif.training.data import TULU_CHAT_TEMPLATE

logger = logging.getLogger(__name__)

BOS, PAD, UNK = "<s>", "<pad>", "<unk>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = [BOS, EOS, PAD, UNK, *ROLE_TOKENS]
MARKER_FILE = "tiny_model.json"
RECIPE_VERSION = 2
"""Part of the cache key: bump it when the corpus, tokenizer or pre-training recipe changes."""


def default_cache_dir() -> Path:
    """``$IAIF_CACHE`` or ``$XDG_CACHE_HOME/iaif`` or ``~/.cache/iaif``."""
    if os.environ.get("IAIF_CACHE"):
        return Path(os.environ["IAIF_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "iaif"


@dataclass
class TinyModelConfig:
    """Settings of the tiny offline base model (architecture, tokenizer, pre-training)."""

    output_dir: str = ""
    """Folder for the model; empty: <cache>/tiny-llama-<config hash> ($IAIF_CACHE or ~/.cache/iaif)."""
    seed: int = 0
    """Seed for the corpus, the weight initialisation and the data order."""
    vocab_size: int = 1024
    """BPE vocabulary size (special tokens and the 256 byte symbols included)."""
    hidden_size: int = 128
    """Model width."""
    num_layers: int = 4
    """Number of decoder layers."""
    num_heads: int = 4
    """Attention heads."""
    num_kv_heads: int = 2
    """Key/value heads (grouped-query attention when below num_heads)."""
    intermediate_size: int = 352
    """MLP width."""
    max_position_embeddings: int = 512
    """Longest sequence the model accepts."""
    corpus_documents: int = 4000
    """Generated pretraining conversations (also the tokenizer's training text)."""
    seq_len: int = 128
    """Tokens per pretraining block (documents are packed)."""
    pretrain_steps: int = 400
    """Optimizer steps of pretraining."""
    batch_size: int = 8
    """Blocks per optimizer step."""
    learning_rate: float = 3e-3
    """Peak learning rate (linear warm-up over 5% of the steps, then cosine decay)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""

    @classmethod
    def for_tests(cls, output_dir: str) -> TinyModelConfig:
        """A very small model that builds in seconds, for the test suite."""
        return cls(output_dir=output_dir, vocab_size=320, hidden_size=32, num_layers=2, num_heads=2,
                   num_kv_heads=1, intermediate_size=64, max_position_embeddings=256,
                   corpus_documents=300, seq_len=64, pretrain_steps=20, batch_size=8)

    def config_hash(self) -> str:
        """12 hex digits identifying everything but the output folder."""
        data = {k: v for k, v in config_to_dict(self).items() if k != "output_dir"}
        data["recipe_version"] = RECIPE_VERSION
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]

    def resolved_output_dir(self) -> Path:
        """``output_dir``, or the cache folder keyed by :meth:`config_hash` when it is empty."""
        return Path(self.output_dir) if self.output_dir else default_cache_dir() / f"tiny-llama-{self.config_hash()}"


def train_tokenizer(corpus: list[str], vocab_size: int, model_max_length: int):
    """Byte-level BPE tokenizer trained on ``corpus``, wrapped as a fast HF tokenizer that adds
    ``<s>`` in front and carries the Tulu chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                 unk_token=UNK, additional_special_tokens=list(ROLE_TOKENS))
    hf.chat_template = TULU_CHAT_TEMPLATE
    hf.model_max_length = model_max_length
    return hf


def _packed_blocks(corpus: list[str], tokenizer, seq_len: int) -> list[dict[str, list[int]]]:
    """Tokenise every document (with ``<s>``), concatenate, cut into blocks of ``seq_len``."""
    stream: list[int] = []
    for ids in tokenizer(corpus, add_special_tokens=True)["input_ids"]:
        stream.extend(ids)
    n = len(stream) // seq_len
    if n == 0:
        raise ValueError(f"pretraining corpus has {len(stream)} tokens, fewer than one block of {seq_len}")
    return [{"input_ids": stream[i * seq_len:(i + 1) * seq_len], "labels": stream[i * seq_len:(i + 1) * seq_len]}
            for i in range(n)]


def _pretrain(cfg: TinyModelConfig, tokenizer, corpus: list[str], work_dir: Path):
    from transformers import LlamaConfig, LlamaForCausalLM, set_seed

    from iaif.training.data import TokenizedExample
    from iaif.training.finetune import TrainingSettings, build_trainer

    set_seed(cfg.seed)
    model_cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        intermediate_size=cfg.intermediate_size, max_position_embeddings=cfg.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(model_cfg)
    blocks = _packed_blocks(corpus, tokenizer, cfg.seq_len)
    logger.info("pretraining %.2fM parameters on %d blocks of %d tokens for %d steps",
                model.num_parameters() / 1e6, len(blocks), cfg.seq_len, cfg.pretrain_steps)
    trainer = build_trainer(
        model, tokenizer,
        [TokenizedExample(str(i), b["input_ids"], b["labels"]) for i, b in enumerate(blocks)],
        TrainingSettings(learning_rate=cfg.learning_rate, lr_scheduler_type="cosine", warmup_ratio=0.05,
                         max_steps=cfg.pretrain_steps, effective_batch_size=cfg.batch_size,
                         per_device_batch_size=cfg.batch_size, weight_decay=cfg.weight_decay, seed=cfg.seed,
                         max_grad_norm=1.0, logging_steps=max(1, cfg.pretrain_steps // 10), save_steps=-1),
        work_dir / "trainer", precision="fp32")
    result = trainer.train()
    shutil.rmtree(work_dir / "trainer", ignore_errors=True)
    return model, {"train_loss": result.training_loss, "num_blocks": len(blocks),
                   "num_parameters": model.num_parameters(),
                   "log_history": trainer.state.log_history}


def build_tiny_model(cfg: TinyModelConfig) -> Path:
    """Build (or reuse) the tiny model + tokenizer folder; return its path.

    The folder is written to a temporary sibling and moved into place when complete. An existing
    folder built from a different config is an error (choose another ``output_dir``)."""
    out = cfg.resolved_output_dir()
    digest = cfg.config_hash()
    marker = out / MARKER_FILE
    if marker.is_file():
        built = json.loads(marker.read_text())
        if built.get("config_hash") == digest:
            logger.info("tiny model already built at %s", out)
            return out
        raise FileExistsError(f"{out}: holds a tiny model of another config (hash {built.get('config_hash')}, "
                              f"wanted {digest}); remove it or choose another output_dir")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: exists and is not a tiny-model folder; choose another output_dir")

    tmp = temp_path(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    corpus = pretraining_corpus(cfg.seed, cfg.corpus_documents)
    tokenizer = train_tokenizer(corpus, cfg.vocab_size, cfg.max_position_embeddings)
    model, stats = _pretrain(cfg, tokenizer, corpus, tmp)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    write_run_info(tmp, cfg, "build-tiny-model")
    (tmp / MARKER_FILE).write_text(json.dumps({"config_hash": digest, "config": config_to_dict(cfg), **stats}, indent=2))
    if out.exists():
        out.rmdir()
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(out)
    except OSError:  # another process finished the same build first
        if not (marker.is_file() and json.loads(marker.read_text()).get("config_hash") == digest):
            raise
        shutil.rmtree(tmp)
    logger.info("tiny model written to %s (final train loss %.3f)", out, stats["train_loss"])
    return out
