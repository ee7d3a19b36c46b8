"""`iaif extract` end to end on the tiny model: store contents, 1 vs 2 processes, resume after
SIGKILL, mismatch errors, NaN detection, Adam features from a real warm-up checkpoint."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from word_pools import write_word_pool

from iaif.selection.features.extract import ExtractConfig, run_extract
from iaif.selection.features.store import FeatureStore, ShardWriter, StoreMismatchError
from iaif.training.data import DataConfig, TextFormat
from iaif.training.lora import LoraSettings, ModelConfig

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_word_pool(tmp_path_factory.mktemp("extract_data") / "pool.jsonl", 96, 0, (3, 40), (1, 12))


def make_cfg(model_dir: Path, data_path: Path, out: Path, **changes) -> ExtractConfig:
    cfg = ExtractConfig(
        model=ModelConfig(name_or_path=str(model_dir), precision="fp32"),
        lora=LoraSettings(r=8, alpha=16, dropout=0.0),
        data=DataConfig(path=str(data_path)), text=TextFormat(max_length=128), dim=256, seed=0,
        token_budget=160, max_batch_size=2, shard_examples=8, output_dir=str(out),
    )
    return replace(cfg, **changes)


def cli_args(cfg: ExtractConfig) -> list[str]:
    return ["--model.name_or_path", cfg.model.name_or_path, "--model.precision", "fp32",
            "--lora.r", "8", "--lora.alpha", "16", "--lora.dropout", "0.0",
            "--data.path", cfg.data.path, "--text.max_length", "128", "--dim", "256", "--seed", "0",
            "--token_budget", "160", "--max_batch_size", "2", "--shard_examples", "8", "--output_dir", cfg.output_dir]


def single_thread_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path, data_file: Path, tmp_path_factory: pytest.TempPathFactory) -> FeatureStore:
    """An uninterrupted single-process run (one thread, like the subprocesses)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = run_extract(make_cfg(tiny_model_dir, data_file, tmp_path_factory.mktemp("ref") / "store"))
    finally:
        torch.set_num_threads(threads)
    return FeatureStore.open(out)


def test_store_contents(reference: FeatureStore, data_file: Path):
    excluded = {e["id"] for e in json.loads((reference.path / "excluded.json").read_text())}
    ids = [json.loads(line)["id"] for line in data_file.read_text().splitlines()]
    assert excluded and reference.ids == [i for i in ids if i not in excluded]  # dataset order, excluded never stored
    assert reference.features.shape == (len(reference.ids), 256) and reference.features.dtype == np.float16
    assert reference.meta.num_excluded == len(excluded)
    assert isinstance(reference.features, np.memmap)
    meta = reference.meta
    assert meta.projection == "factorised" and meta.dim == 256 and meta.feature == "grad"
    assert meta.adapter_hash.startswith("fresh-") and len(meta.dataset_fingerprint) == 16
    assert np.isfinite(reference.features).all() and np.abs(reference.features).max() > 0
    assert (reference.path / "run_info.json").is_file() and not (reference.path / ".shards").exists()


def test_two_processes_give_the_identical_store(reference: FeatureStore, tmp_path: Path):
    cfg = replace(reference_cfg(reference), output_dir=str(tmp_path / "two"))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "iaif", "extract", *cli_args(cfg)]
    run = subprocess.run(cmd, cwd=REPO, env=single_thread_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "rank 1:" in run.stderr  # really two ranks
    two = FeatureStore.open(cfg.output_dir)
    assert two.ids == reference.ids
    assert np.array_equal(np.asarray(two.features), np.asarray(reference.features))


def reference_cfg(reference: FeatureStore) -> ExtractConfig:
    meta = reference.meta
    return make_cfg(Path(meta.model), Path(meta.dataset), reference.path)


def test_resume_after_kill(reference: FeatureStore, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    cfg = replace(reference_cfg(reference), output_dir=str(tmp_path / "killed"))
    proc = subprocess.Popen([sys.executable, "-m", "iaif", "extract", *cli_args(cfg)], cwd=REPO, env=single_thread_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = Path(cfg.output_dir) / ".shards" / "shard-00000.npz"
    deadline = time.time() + 240
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first.exists() and not (Path(cfg.output_dir) / "meta.json").exists(), "the job was not killed mid-run"
    with pytest.raises(FileNotFoundError, match="unfinished extract job"):
        FeatureStore.open(cfg.output_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with caplog.at_level(logging.INFO, logger="iaif.selection.features.extract"):
            run_extract(cfg)
    finally:
        torch.set_num_threads(threads)
    todo = [r.getMessage() for r in caplog.records if "shards to do" in r.getMessage()]
    left, total = (int(w) for w in todo[0].split(":")[1].split()[0:3:2])
    assert 0 < left < total, todo  # finished shards were not recomputed
    resumed = FeatureStore.open(cfg.output_dir)
    assert resumed.ids == reference.ids
    assert np.array_equal(np.asarray(resumed.features), np.asarray(reference.features))


def test_mismatches_are_refused(reference: FeatureStore, tmp_path: Path):
    cfg = reference_cfg(reference)
    with pytest.raises(StoreMismatchError, match="projection_seed"):
        run_extract(replace(cfg, seed=1))  # into the finished store of seed 0
    with pytest.raises(StoreMismatchError, match="feature"):
        FeatureStore.open(reference.path, expect={"feature": "adam"})

    writer = ShardWriter(tmp_path / "job")
    writer.claim({"dim": 256, "projection": "factorised"})
    with pytest.raises(StoreMismatchError, match="unfinished extract job with other settings"):
        writer.claim({"dim": 256, "projection": "dense"})

    subset = FeatureStore.open(run_extract(replace(cfg, data=DataConfig(path=cfg.data.path, max_examples=10),
                                                   output_dir=str(tmp_path / "subset"))))
    reference.check_compatible(subset, same_dataset=False)  # pool vs target: fine
    with pytest.raises(StoreMismatchError, match="dataset_fingerprint"):
        reference.check_compatible(subset, same_dataset=True)
    dense = FeatureStore.open(run_extract(replace(cfg, projection="dense", data=subset_data(cfg),
                                                  output_dir=str(tmp_path / "dense"))))
    with pytest.raises(StoreMismatchError, match="projection"):
        subset.check_compatible(dense, same_dataset=True)
    other_model = replace(subset, meta=replace(subset.meta, model="other/model"))
    with pytest.raises(StoreMismatchError, match="model"):
        subset.check_compatible(other_model, same_dataset=True)


def subset_data(cfg: ExtractConfig) -> DataConfig:
    return DataConfig(path=cfg.data.path, max_examples=10)


def test_nan_gradient_names_the_example(tiny_model_dir: Path, data_file: Path, tmp_path: Path):
    from iaif.training.lora import add_lora, load_base_model

    model = add_lora(load_base_model(ModelConfig(name_or_path=str(tiny_model_dir), precision="fp32")),
                     LoraSettings(r=8, alpha=16, dropout=0.0))
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_B" in n).fill_(float("nan"))
    model.save_pretrained(tmp_path / "nan_adapter")
    cfg = make_cfg(tiny_model_dir, data_file, tmp_path / "store", checkpoint=str(tmp_path / "nan_adapter"),
                   data=DataConfig(path=str(data_file), max_examples=4))
    with pytest.raises(FloatingPointError, match=r"non-finite .* example\(s\) \['ex"):
        run_extract(cfg)
    assert not (tmp_path / "store" / "meta.json").exists()


def test_adam_features_from_a_warmup_checkpoint(tiny_model_dir: Path, data_file: Path, tmp_path: Path):
    """Store rows == Γ of brute-force per-example gradients with the saved moments, projected."""
    from peft import PeftModel

    from iaif.selection.features.per_example_grads import find_lora_matrices, per_example_loss
    from iaif.selection.features.projection import KroneckerProjector
    from iaif.training.checkpoint import save_checkpoint
    from iaif.training.data import load_examples, tokenize_examples
    from iaif.training.lora import add_lora, load_base_model, load_tokenizer, quiet_peft_calls

    mcfg = ModelConfig(name_or_path=str(tiny_model_dir), precision="fp32")
    torch.manual_seed(0)
    model = add_lora(load_base_model(mcfg), LoraSettings(r=8, alpha=16, dropout=0.0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(5, 300, (2, 12))
    for _ in range(2):  # two steps: lora_B and the moments become non-zero
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    ckpt = save_checkpoint(tmp_path / "checkpoint-epoch1", model, opt, epoch=1, num_epochs=1, global_step=2,
                           mean_lr=1e-2, lr_weight=1.0, base_model=str(tiny_model_dir))
    cfg = make_cfg(tiny_model_dir, data_file, tmp_path / "adam", checkpoint=str(ckpt), feature="adam",
                   store_dtype="fp32", data=DataConfig(path=str(data_file), max_examples=5))
    store = FeatureStore.open(run_extract(cfg))
    assert store.meta.lr_weight == 1.0 and store.meta.feature == "adam" and store.features.dtype == np.float32

    state = torch.load(ckpt / "optimizer_state.pt")
    b1, b2 = state["betas"]
    eps = state["eps"]
    tok = load_tokenizer(mcfg)
    examples, _ = tokenize_examples(load_examples(cfg.data), tok, "tulu", cfg.text.max_length)
    with quiet_peft_calls():
        peft_model = PeftModel.from_pretrained(load_base_model(mcfg), str(ckpt / "adapter"), is_trainable=True).eval()
    matrices = find_lora_matrices(peft_model)
    params = dict(peft_model.named_parameters())
    for row, ex in enumerate(examples):
        loss = per_example_loss(peft_model(input_ids=torch.tensor([ex.input_ids])).logits, torch.tensor([ex.labels]))[0]
        grads = torch.autograd.grad(loss, [params[m.name] for m in matrices])
        expected = torch.zeros(cfg.dim)
        for m, g in zip(matrices, grads):
            s = state["state"][m.name]
            gamma = (b1 * s["exp_avg"] + (1 - b1) * g) / ((b2 * s["exp_avg_sq"] + (1 - b2) * g**2).sqrt() + eps)
            expected += KroneckerProjector(cfg.seed, m.name, *m.shape, cfg.dim).project_weight_grads(gamma[None])[0]
        torch.testing.assert_close(torch.from_numpy(np.array(store.features[row])), expected, rtol=1e-3, atol=1e-4)


def test_temporary_files_left_by_a_killed_extract_are_removed_when_it_resumes(tmp_path: Path):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    writer = ShardWriter(tmp_path / "store")
    writer.claim({"dim": 4})
    stale = [writer.shard_dir / f".shard-00003.npz.tmp-{proc.pid}", tmp_path / "store" / f".ids.json.tmp-{proc.pid}"]
    for path in stale:
        path.write_text("half")
    writer.write(0, np.arange(2), np.zeros((2, 4), dtype=np.float16))
    assert writer.is_done(0) and not list(writer.shard_dir.glob(".shard-00000*"))  # written under a temporary name, renamed
    ShardWriter(tmp_path / "store").claim({"dim": 4})  # the resumed job
    assert not any(p.exists() for p in stale) and writer.is_done(0)
