"""``iaif plan``: its counts against the real thing (an instantiated model's parameters, peft's
trainable parameters, the featurizer's projection matrices, a store written by extract)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from iaif.cli import main
from iaif.selection.features.extract import ExtractConfig, run_extract
from iaif.selection.features.featurizer import LoraFeaturizer
from iaif.selection.features.memory_plan import (
    PlanConfig,
    estimate,
    load_model_config,
    model_shape,
    projection_matrix_bytes,
    weight_bytes,
)
from iaif.training.data import DataConfig, TextFormat
from iaif.training.lora import LoraSettings, ModelConfig, add_lora, load_base_model

LORA = LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_weights_and_lora_parameters_match_the_loaded_model(tiny_model_dir: Path, precision: str):
    shape = model_shape(load_model_config(str(tiny_model_dir)), LORA.target_modules)
    model = load_base_model(ModelConfig(name_or_path=str(tiny_model_dir), precision=precision))
    assert weight_bytes(shape, precision) == sum(p.numel() * p.element_size() for p in model.parameters())
    peft_model = add_lora(model, LORA)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    plan = estimate(PlanConfig(model=str(tiny_model_dir), precision=precision, lora=LORA, dim=64), shape)
    assert plan.lora_parameters == trainable
    assert plan.lora == trainable * 4  # extract: the adapter in fp32
    assert estimate(PlanConfig(precision=precision, lora=LORA, mode="train"), shape).lora == trainable * 16
    featurizer = LoraFeaturizer(peft_model, "grad", "factorised", 64, 0)
    cached = sum(t.numel() * t.element_size() for p in featurizer.projectors.values() for t in p.matrices("cpu"))
    assert projection_matrix_bytes(shape, LORA.r, 64) == cached


def test_config_file_folder_and_bad_input(tiny_model_dir: Path, tmp_path: Path):
    config = tmp_path / "config.json"
    config.write_text((tiny_model_dir / "config.json").read_text())
    assert model_shape(load_model_config(str(config)), ["q_proj"]) == model_shape(load_model_config(str(tiny_model_dir)), ["q_proj"])
    (tmp_path / "bad.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ValueError, match="bad.json: not a transformers config"):
        load_model_config(str(tmp_path / "bad.json"))
    with pytest.raises(ValueError, match=r"lora.target_modules: \['nope'\] match no linear layer"):
        model_shape(load_model_config(str(config)), ["nope"])


def test_activations_grow_with_tokens_and_eager_attention(tiny_model_dir: Path):
    shape = model_shape(load_model_config(str(tiny_model_dir)), LORA.target_modules)
    base = PlanConfig(lora=LORA, token_budget=1024, seq_len=128, dim=64)
    one, two = estimate(base, shape), estimate(replace(base, token_budget=2048), shape)
    assert two.activations == 2 * one.activations and two.weights == one.weights
    eager = estimate(replace(base, attention="eager"), shape)
    # eager keeps the fp32 softmax and its bf16 cast: heads × seq_len × 6 bytes per token in each layer (and in
    # the one layer's gradients of the backward's peak, when they outweigh the loss's)
    probs = 1024 * shape.heads * 128 * 6
    assert shape.layers * probs <= eager.activations - one.activations <= (shape.layers + 1) * probs


def test_store_size_matches_a_written_store(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    pool = tmp_path / "pool.jsonl"
    with open(pool, "w", encoding="utf-8") as fh:
        for i in range(12):
            fh.write(json.dumps({"id": f"ex{i:03d}", "question": "a b c " * (i + 1), "answer": "d e"}) + "\n")
    store = run_extract(ExtractConfig(model=ModelConfig(name_or_path=str(tiny_model_dir), precision="fp32"), lora=LORA,
                                      data=DataConfig(path=str(pool)), text=TextFormat(max_length=64), dim=64, token_budget=256,
                                      output_dir=str(tmp_path / "store")))
    written = (store / "features.npy").stat().st_size + (store / "ids.json").stat().st_size
    main(["plan", "--model", str(tiny_model_dir), "--pool_size", "12", "--id_bytes", "5", "--dim", "64",
          "--output_file", str(tmp_path / "plan.json")])
    assert json.loads((tmp_path / "plan.json").read_text())["store_bytes"] == written
    assert "peak per device" in capsys.readouterr().out
