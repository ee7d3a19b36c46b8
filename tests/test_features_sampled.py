"""Sampled-label target stores (``sampled_labels: R``) for the Gauss-Newton curvature: rows against a
brute-force recomputation with independently reproduced sampling, batching independence, meta and
the refusals, and ``iaif select --curvature gn`` on real extracted stores."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from word_pools import write_word_pool

from iaif.selection.features.extract import ExtractConfig, run_extract
from iaif.selection.features.store import FeatureStore, StoreMismatchError
from iaif.selection.select import SelectConfig, run_select
from iaif.training.data import IGNORE_INDEX, DataConfig, TextFormat
from iaif.training.lora import LoraSettings, ModelConfig

R = 2


def _write(path: Path, n: int, seed: int, prefix: str) -> Path:
    return write_word_pool(path, n, seed, (3, 15), (2, 8), prefix)


def _cfg(model_dir: Path, data: Path, out: Path, **changes) -> ExtractConfig:
    cfg = ExtractConfig(model=ModelConfig(name_or_path=str(model_dir), precision="fp32"),
                        lora=LoraSettings(r=4, alpha=8, dropout=0.0), data=DataConfig(path=str(data)),
                        text=TextFormat(max_length=64), dim=64, seed=0, store_dtype="fp32", token_budget=256, max_batch_size=4,
                        shard_examples=4, output_dir=str(out))
    return replace(cfg, **changes)


@pytest.fixture(scope="module")
def stores(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("sampled")
    pool, targets = _write(tmp / "pool.jsonl", 10, 0, "p"), _write(tmp / "tgt.jsonl", 5, 1, "t")
    cfg = _cfg(tiny_model_dir, targets, tmp / "sampled", sampled_labels=R, sample_seed=7)
    return {"tmp": tmp, "pool_file": pool, "target_file": targets, "cfg": cfg,
            "sampled": FeatureStore.open(run_extract(cfg)),
            "true": FeatureStore.open(run_extract(replace(cfg, sampled_labels=0, output_dir=str(tmp / "true")))),
            "pool": FeatureStore.open(run_extract(_cfg(tiny_model_dir, pool, tmp / "pool")))}


def _draw_seed(sample_seed: int, example_id: str, r: int) -> int:
    """The documented seeding rule, written out again."""
    return int(hashlib.sha256(f"{sample_seed}/{r}/{example_id}".encode()).hexdigest()[:16], 16) & (2**63 - 1)


def test_rows_equal_brute_force_on_sampled_labels(stores: dict, tiny_model_dir: Path):
    from iaif.selection.features.per_example_grads import find_lora_matrices, per_example_loss
    from iaif.selection.features.projection import KroneckerProjector
    from iaif.training.data import load_examples, tokenize_examples
    from iaif.training.lora import add_lora, load_base_model, load_tokenizer

    cfg, store = stores["cfg"], stores["sampled"]
    torch.manual_seed(cfg.seed)  # the fresh adapter of run_extract
    model = add_lora(load_base_model(cfg.model), cfg.lora).eval()
    examples, _ = tokenize_examples(load_examples(cfg.data), load_tokenizer(cfg.model), cfg.text.template, cfg.text.max_length)
    assert store.ids == [f"{ex.id}#{r}" for ex in examples for r in range(R)]
    assert store.meta.sampled_labels == R and store.meta.sample_seed == 7 and store.meta.feature == "grad"
    assert stores["true"].meta.sampled_labels == 0 and stores["true"].meta.sample_seed is None

    matrices = find_lora_matrices(model)
    params = dict(model.named_parameters())
    changed = 0
    for ex in examples:
        ids = torch.tensor([ex.input_ids])
        with torch.no_grad():
            probs = torch.softmax(model(input_ids=ids).logits[0].double(), dim=-1).numpy()
        for r in range(R):
            labels = list(ex.labels)
            g = torch.Generator().manual_seed(_draw_seed(7, ex.id, r))
            answer = [t for t in range(1, len(labels)) if labels[t] != IGNORE_INDEX]
            uniforms = torch.rand(len(answer), generator=g, dtype=torch.float64).numpy()
            for t, u in zip(answer, uniforms):
                cdf = np.cumsum(probs[t - 1])
                labels[t] = int(np.argmax(cdf > u * cdf[-1]))  # first token whose cumulative mass exceeds u
            changed += sum(a != b for a, b in zip(labels, ex.labels))
            loss = per_example_loss(model(input_ids=ids).logits, torch.tensor([labels]))[0]
            grads = torch.autograd.grad(loss, [params[m.name].requires_grad_(True) for m in matrices])
            expected = sum(KroneckerProjector(cfg.seed, m.name, *m.shape, cfg.dim).project_weight_grads(gr[None])[0]
                           for m, gr in zip(matrices, grads))
            row = torch.from_numpy(np.array(store.features[store.ids.index(f"{ex.id}#{r}")]))
            torch.testing.assert_close(row, expected, rtol=1e-3, atol=1e-5)
    assert changed > 0  # the sampled labels really differ from the data's answers


def test_rows_do_not_depend_on_batching(stores: dict):
    cfg = stores["cfg"]
    other = FeatureStore.open(run_extract(replace(cfg, max_batch_size=1, shard_examples=1,
                                                  output_dir=str(stores["tmp"] / "batch1"))))
    assert other.ids == stores["sampled"].ids
    np.testing.assert_allclose(np.asarray(other.features), np.asarray(stores["sampled"].features), rtol=1e-4, atol=1e-6)
    reseeded = FeatureStore.open(run_extract(replace(cfg, sample_seed=8, output_dir=str(stores["tmp"] / "seed8"))))
    assert not np.allclose(np.asarray(reseeded.features), np.asarray(stores["sampled"].features))


def test_sampled_store_is_never_taken_for_a_true_label_one(stores: dict, tmp_path: Path):
    cfg = stores["cfg"]
    with pytest.raises(StoreMismatchError, match="sampled_labels"):
        run_extract(replace(cfg, sampled_labels=0))  # into the finished sampled store
    with pytest.raises(ValueError, match="feature=grad"):
        run_extract(replace(cfg, feature="adam", output_dir=str(tmp_path / "adam")))
    select = SelectConfig(pool=DataConfig(path=str(stores["pool_file"])), targets=[str(stores["target_file"])],
                          pool_stores=[str(stores["pool"].path)], target_stores=[str(stores["sampled"].path)],
                          output_dir=str(tmp_path / "out"), k=3)
    with pytest.raises(StoreMismatchError, match="sampled-label store"):
        run_select(select)
    assert not (tmp_path / "out" / "selected.jsonl").exists()


@pytest.mark.parametrize("normalise", [False, True])
def test_select_gn_on_extracted_stores(stores: dict, tmp_path: Path, normalise: bool):
    lam = 1.5
    out = run_select(SelectConfig(
        pool=DataConfig(path=str(stores["pool_file"])), targets=[str(stores["target_file"])],
        pool_stores=[str(stores["pool"].path)], target_stores=[str(stores["true"].path)],
        sampled_target_stores=[str(stores["sampled"].path)], curvature="gn", lam=lam,
        output_dir=str(tmp_path / "out"), k=3, normalise=normalise))
    lines = [json.loads(x)["_iaif"] for x in (out / "selected.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and len({x["id"] for x in lines}) == 3

    def unit(x: np.ndarray) -> np.ndarray:
        """Rows as the selector compares them: unit length (cosines) or as stored (dot products)."""
        x = np.asarray(x, dtype=np.float64)
        return x / np.linalg.norm(x, axis=1, keepdims=True) if normalise else x

    pool, true, sampled = stores["pool"], stores["true"], stores["sampled"]
    first = lines[0]
    a = unit(pool.features)[pool.ids.index(first["id"])]
    assert first["first_order"] == pytest.approx(float((unit(true.features) @ a).mean()), rel=1e-4)
    psi = unit(sampled.features) @ a  # κ(a, a) from the sampled-label columns, averaged over m·R of them
    assert first["interaction"] == pytest.approx(lam * 0.5 * float(psi @ psi) / len(sampled.ids), rel=1e-4)
