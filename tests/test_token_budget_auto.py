"""``token_budget: auto`` (extract) and ``per_device_batch_size: auto`` (train) on a simulated memory
limit: the first try runs out of memory, the job goes on with a smaller size, and its output equals a
run with that size given."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_training_finetune import small_config, write_pool
from word_pools import write_word_pool

import iaif.selection.features.extract as extract_module
import iaif.training.finetune as finetune_module
from iaif.common.oom import largest_fitting
from iaif.selection.features.batching import token_budget_batches
from iaif.selection.features.extract import ExtractConfig, run_extract
from iaif.selection.features.featurizer import LoraFeaturizer
from iaif.selection.features.store import FeatureStore
from iaif.training.data import DataConfig, TextFormat, load_examples, tokenize_examples
from iaif.training.finetune import TrainConfig, run_train
from iaif.training.lora import LoraSettings, ModelConfig, add_lora, load_tokenizer

CPU_OOM = "DefaultCPUAllocator: can't allocate memory: you tried to allocate {} bytes."


def test_largest_fitting_halves_until_the_probe_fits():
    tried: list[int] = []

    def probe(size: int) -> None:
        tried.append(size)
        if size > 100:
            raise RuntimeError(CPU_OOM.format(size))

    assert largest_fitting(probe, 1000) == 62 and tried == [1000, 500, 250, 125, 62]
    tried.clear()
    assert largest_fitting(probe, 96) == 96 and tried == [96]


def test_largest_fitting_rounds_down_to_allowed_sizes_and_stops_at_the_floor():
    tried: list[int] = []

    def probe(size: int) -> None:
        tried.append(size)
        if size > 30:
            raise torch.OutOfMemoryError(f"simulated: {size}")

    assert largest_fitting(probe, 100, allowed=lambda s: 100 % s == 0) == 25
    assert tried == [100, 50, 25]  # 50 // 2 = 25 divides 100
    with pytest.raises(MemoryError, match="batch: out of memory even at 40"):
        largest_fitting(probe, 160, floor=40, what="batch")
    with pytest.raises(ValueError, match="not memory"):
        largest_fitting(lambda s: (_ for _ in ()).throw(ValueError("not memory")), 8)


LIMIT = 200
"""Padded tokens per batch the simulated device holds."""


class LimitedFeaturizer(LoraFeaturizer):
    """The featurizer on a simulated device that holds at most ``LIMIT`` padded tokens per batch."""

    seen: list[int] = []

    def __call__(self, batch, relabel=None):
        tokens = batch["input_ids"].numel()
        LimitedFeaturizer.seen.append(tokens)
        if tokens > LIMIT:
            raise torch.OutOfMemoryError(f"simulated allocation limit: {tokens} padded tokens > {LIMIT}")
        return super().__call__(batch, relabel)


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_word_pool(tmp_path_factory.mktemp("auto_data") / "pool.jsonl", 40, 1, (3, 30), (1, 10))


def extract_cfg(model_dir: Path, data: Path, out: Path, **changes) -> ExtractConfig:
    cfg = ExtractConfig(model=ModelConfig(name_or_path=str(model_dir), precision="fp32"),
                        lora=LoraSettings(r=4, alpha=8, dropout=0.0), data=DataConfig(path=str(data)),
                        text=TextFormat(max_length=96), dim=64, store_dtype="fp32", token_budget="auto", max_batch_size=8,
                        shard_examples=16, output_dir=str(out))
    return replace(cfg, **changes)


def test_extract_auto_budget_continues_after_out_of_memory(tiny_model_dir: Path, pool: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch, one_thread):
    monkeypatch.setattr(extract_module, "LoraFeaturizer", LimitedFeaturizer)
    LimitedFeaturizer.seen = []
    auto = FeatureStore.open(run_extract(extract_cfg(tiny_model_dir, pool, tmp_path / "auto")))
    budget = auto.meta.token_budget
    over = [i for i, tokens in enumerate(LimitedFeaturizer.seen) if tokens > LIMIT]
    assert over and over == list(range(len(over)))  # the first tries ran out of memory, nothing after them did
    cfg = extract_cfg(tiny_model_dir, pool, tmp_path)
    lengths = [len(ex) for ex in tokenize_examples(load_examples(cfg.data), load_tokenizer(cfg.model), "tulu", 96)[0]]

    def widest(b: int) -> int:
        return max(len(batch) * max(lengths[i] for i in batch) for batch in token_budget_batches(lengths, b, 8))

    start = max(lengths) * 8
    assert budget in [start >> k for k in range(len(over) + 1)] and widest(budget) <= LIMIT < widest(2 * budget)
    monkeypatch.undo()
    fixed = FeatureStore.open(run_extract(extract_cfg(tiny_model_dir, pool, tmp_path / "fixed", token_budget=budget)))
    assert fixed.meta.token_budget == budget and fixed.ids == auto.ids
    assert np.array_equal(np.asarray(auto.features), np.asarray(fixed.features))  # same plan: the same bytes
    small = FeatureStore.open(run_extract(extract_cfg(tiny_model_dir, pool, tmp_path / "small", token_budget=1)))
    assert np.allclose(np.asarray(auto.features), np.asarray(small.features), rtol=1e-4, atol=1e-6)  # batching-free


ROW_LIMIT = 3
"""Examples per forward pass the simulated device holds in training."""


def add_limited_lora(model, lora):
    """``add_lora``, on a simulated device where a forward pass over more than ``ROW_LIMIT`` examples runs out of memory."""
    peft_model = add_lora(model, lora)

    def limit(module, args, kwargs):
        rows = kwargs["input_ids"].shape[0]
        SEEN_ROWS.append(rows)
        if rows > ROW_LIMIT:
            raise torch.OutOfMemoryError(f"simulated allocation limit: {rows} examples > {ROW_LIMIT}")

    peft_model.register_forward_pre_hook(limit, with_kwargs=True)
    return peft_model


SEEN_ROWS: list[int] = []


def test_train_auto_batch_size_continues_after_out_of_memory(tiny_model_dir: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch, one_thread):
    data = write_pool(tmp_path / "pool.jsonl", 16)
    auto_cfg = small_config(TrainConfig, data, tiny_model_dir, tmp_path / "auto", lora_dropout=0.1, num_epochs=1,
                            effective_batch_size=8, per_device_batch_size="auto")
    monkeypatch.setattr(finetune_module, "add_lora", add_limited_lora)
    SEEN_ROWS.clear()
    auto = run_train(auto_cfg)
    monkeypatch.undo()
    summary = json.loads((auto / "train_summary.json").read_text())
    assert SEEN_ROWS[:3] == [8, 4, 2] and max(SEEN_ROWS[3:]) == 2  # two tries out of memory, then all batches fit
    assert summary["per_device_batch_size"] == 2 and summary["gradient_accumulation_steps"] == 4
    assert summary["global_step"] == 2
    fixed = run_train(replace(auto_cfg, output_dir=str(tmp_path / "fixed"),
                              training=replace(auto_cfg.training, per_device_batch_size=2)))
    got, want = load_file(auto / "adapter" / "adapter_model.safetensors"), load_file(fixed / "adapter" / "adapter_model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)  # the probe changed nothing
