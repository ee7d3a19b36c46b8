"""Model loading, LoRA wrapping, QLoRA (4-bit NF4) and the padding collator."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from iaif.training.collate import PaddingCollator, TokenizedDataset
from iaif.training.data import IGNORE_INDEX, DataConfig, TextFormat, TokenizedExample
from iaif.training.finetune import TrainConfig, TrainingSettings, gradient_accumulation_steps, run_train
from iaif.training.lora import LoraSettings, ModelConfig, adapter_hash, add_lora, load_tokenizer, resolve_precision


def test_collator_pads_right_and_masks_labels():
    examples = [TokenizedExample("a", [5, 6, 7], [IGNORE_INDEX, 6, 7]), TokenizedExample("b", [8], [8])]
    batch = PaddingCollator(pad_token_id=0)([TokenizedDataset(examples)[i] for i in range(2)])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]


def test_empty_dataset_and_bad_batch_split_are_errors():
    with pytest.raises(ValueError, match="no training examples"):
        TokenizedDataset([])
    with pytest.raises(ValueError, match="effective_batch_size=128 is not a multiple"):
        gradient_accumulation_steps(TrainingSettings(effective_batch_size=128, per_device_batch_size=3), processes=1)
    assert gradient_accumulation_steps(TrainingSettings(), processes=4) == 32  # LESS: 4 GPUs x 1 x 32


def test_less_defaults_give_the_published_lora_size_on_llama31_8b_shapes():
    """LESS recipe on Llama-3.1-8B: r=128 on q/k/v/o has r*(in+out) weights per projection (~109M)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256)
    with torch.device("meta"):
        model = add_lora(LlamaForCausalLM(cfg), LoraSettings())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    kv_out = 4096 // 32 * 8
    expected = 32 * 128 * ((4096 + 4096) * 2 + (4096 + kv_out) * 2)
    assert trainable == expected == 109_051_904


def test_unknown_target_module_and_missing_model_are_clear_errors(tiny_model_dir: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(ValueError, match=r"lora.target_modules: \['query'\] not found"):
        add_lora(model, LoraSettings(target_modules=["q_proj", "query"]))
    with pytest.raises(ValueError, match="model.name_or_path"):
        load_tokenizer(ModelConfig())
    assert resolve_precision("auto") == ("bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32")


@pytest.fixture(scope="module")
def qlora_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init Llama whose widths are multiples of the 4-bit block size (64), with the tiny tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("qlora_model")
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(tiny_model_dir)))
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                                 pad_token_id=tokenizer.pad_token_id)).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_qlora_nf4_run(qlora_model_dir: Path, tmp_path: Path):
    """QLoRA: NF4 4-bit base with bf16 compute, LoRA trains, adapter saved. CUDA GPUs are the
    intended target; recent bitsandbytes also runs 4-bit layers on CPU, where this test runs too."""
    pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes (pip install iaif[qlora])")
    from bitsandbytes.nn import Params4bit

    from iaif.training.lora import load_base_model

    model_cfg = ModelConfig(name_or_path=str(qlora_model_dir), precision="4bit")
    try:
        base = load_base_model(model_cfg)
    except (RuntimeError, ImportError, NotImplementedError) as err:
        pytest.skip(f"bitsandbytes 4-bit loading is not available on this machine without CUDA: {err}")
    quantised = [m.weight for m in base.modules() if isinstance(getattr(m, "weight", None), Params4bit)]
    assert quantised and all(w.quant_type == "nf4" for w in quantised)
    assert all(m.compute_dtype == torch.bfloat16 for m in base.modules() if hasattr(m, "compute_dtype"))
    del base

    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"prompt": f"Say {w}.", "completion": w}) + "\n" for w in ["yes", "no", "maybe", "ok"]))
    out = run_train(TrainConfig(
        data=DataConfig(path=str(pool)), model=model_cfg, lora=LoraSettings(r=4, alpha=16, dropout=0.0),
        training=TrainingSettings(learning_rate=1e-3, num_epochs=1, effective_batch_size=2, per_device_batch_size=2),
        text=TextFormat(max_length=64),
        output_dir=str(tmp_path / "run"),
    ))
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["global_step"] == 2
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in summary["log_history"] if "loss" in e)
    assert len(adapter_hash(out / "adapter")) == 16


def test_build_trainer_full_parameter_training_as_for_pretraining(tiny_model_dir: Path, tmp_path: Path):
    """The shared Trainer factory also trains a plain (non-LoRA) model by steps, without checkpoints."""
    from transformers import AutoModelForCausalLM

    from iaif.training.finetune import build_trainer

    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(tiny_model_dir)))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = tokenizer("<|user|>\nWhat is 2 plus 3?\n<|assistant|>\n2 plus 3 is 5.</s>")["input_ids"]
    blocks = [TokenizedExample(str(i), ids, ids) for i in range(4)]
    settings = TrainingSettings(learning_rate=1e-2, max_steps=8, effective_batch_size=4, per_device_batch_size=4,
                                save_steps=-1, warmup_ratio=0.0)

    def loss() -> float:
        with torch.no_grad():
            return model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()

    before = loss()
    trainer = build_trainer(model, tokenizer, blocks, settings, tmp_path / "trainer")
    trainer.train()
    assert trainer.state.global_step == 8
    assert loss() < before - 1.0
    assert not list((tmp_path / "trainer").glob("checkpoint-*"))


def _saved_adapter(tiny_model_dir: Path, out: Path) -> tuple[object, Path]:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = add_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraSettings(r=4, alpha=8))
    model.save_pretrained(str(out))
    return model, out


def test_adapter_hash_does_not_depend_on_config_order_written_by_the_process(tiny_model_dir: Path, tmp_path: Path):
    """peft writes target_modules (a set) in an order that changes between processes: byte-identical
    weights must keep one hash, and the in-memory adapter must hash like its saved folder."""
    from iaif.training.lora import model_adapter_hash

    model, folder = _saved_adapter(tiny_model_dir, tmp_path / "a")
    before = adapter_hash(folder)
    assert model_adapter_hash(model) == before
    config_file = folder / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["target_modules"] = list(reversed(sorted(config["target_modules"])))
    config_file.write_text(json.dumps(dict(reversed(list(config.items()))), indent=4))
    assert adapter_hash(folder) == before
    config["r"] = 8  # what the adapter computes changes: so does the hash
    config_file.write_text(json.dumps(config))
    assert adapter_hash(folder) != before


def test_adapter_hash_changes_with_one_weight(tiny_model_dir: Path, tmp_path: Path):
    from safetensors.torch import load_file, save_file

    _, folder = _saved_adapter(tiny_model_dir, tmp_path / "a")
    before = adapter_hash(folder)
    weights = load_file(str(folder / "adapter_model.safetensors"))
    name = sorted(weights)[0]
    weights[name] = weights[name].clone()
    weights[name].view(-1)[0] += 1e-3
    save_file(weights, str(folder / "adapter_model.safetensors"))
    assert adapter_hash(folder) != before


def test_bitsandbytes_is_imported_only_when_4bit_is_asked_for(tiny_model_dir: Path, qlora_model_dir: Path):
    """In a fresh process (as `iaif` starts one): an fp32 LoRA model leaves bitsandbytes unimported and
    prints no third-party warning; a later 4-bit load in the same process still works."""
    import subprocess
    import sys

    script = f"""
import sys
from iaif.training.lora import LoraSettings, ModelConfig, add_lora, hide_bitsandbytes, load_base_model
hide_bitsandbytes()
add_lora(load_base_model(ModelConfig(name_or_path={str(tiny_model_dir)!r}, precision="fp32")), LoraSettings(r=2, alpha=4))
print("fp32 bitsandbytes imported:", sys.modules.get("bitsandbytes") is not None, flush=True)
try:
    load_base_model(ModelConfig(name_or_path={str(qlora_model_dir)!r}, precision="4bit"))
    print("4bit loaded:", type(sys.modules["bitsandbytes"]).__name__)
except (RuntimeError, NotImplementedError) as err:  # no 4-bit support on this machine: still importable
    print("4bit loaded: module", "(unsupported here)")
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    assert "fp32 bitsandbytes imported: False" in lines
    assert lines[-1].startswith("4bit loaded: module")
    noise = [line for line in run.stderr.splitlines() if "Warning" in line or "kernels" in line]
    assert noise == [], noise


@pytest.mark.parametrize("modules", [[], ["q_proj", "v_proj", "embed_tokens"]], ids=["default", "with-embed-tokens"])
def test_redirected_train_log_has_no_progress_bars_and_no_third_party_warnings(tiny_model_dir: Path, tmp_path: Path,
                                                                                modules: list[str]):
    import os
    import subprocess
    import sys

    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"prompt": f"Say {i}.", "completion": f"{i} it is."}) + "\n" for i in range(8)))
    cmd = [sys.executable, "-m", "iaif", "train", "--data.path", str(pool), "--model.name-or-path", str(tiny_model_dir),
           "--lora.r", "4", "--lora.alpha", "8", "--training.num-epochs", "1", "--training.effective-batch-size", "4",
           "--training.per-device-batch-size", "4", "--text.max-length", "64", "--output-dir", str(tmp_path / "out")]
    if modules:  # the demo's final fine-tunes adapt the (tied) embedding too: peft's notes on it stay out of the log
        cmd += ["--lora.target-modules", *modules]
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**env, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    noise = [line for line in run.stderr.splitlines() if "Warning" in line or "WARNING" in line or "it/s]" in line]
    assert noise == [], noise
    assert "'loss'" in run.stdout  # the Trainer's one-line logs stand in for its bar
