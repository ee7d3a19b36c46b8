"""4-bit QLoRA end to end at real layer widths: `iaif warmup` for a few steps, then `iaif extract` of
Adam features from its checkpoint and of plain gradients, all with ``model.precision=4bit`` (NF4
weights, bf16 compute; bitsandbytes on a GPU).

The base model is randomly initialised from a preset of ``scripts/bench_extract.py`` (``--layers``
decoder layers of it) and saved in bf16 with a byte-level BPE tokenizer trained on the demo corpus;
the data are generated Tulu conversations of about ``--tokens`` tokens. Prints and writes (``--json``)
the warm-up's steps and seconds, each extraction's examples, tokens, seconds and tokens/s, and whether
the stored features are finite and non-zero.

    python scripts/check_qlora.py --device cuda --out /tmp/qlora --json /tmp/qlora.json   # 4-bit, 8B widths
    python scripts/check_qlora.py --preset tiny --precision fp32 --out /tmp/qlora          # CPU dry run
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_extract import PRESETS  # scripts/ is on the path of a script run from it


def build_base(args: argparse.Namespace, folder: Path) -> None:
    """Random-init base model (bf16 on disk) + tokenizer in ``folder``."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from iaif.demo.demo_data import pretraining_corpus
    from iaif.demo.tiny_model import train_tokenizer

    tokenizer = train_tokenizer(pretraining_corpus(0, 400), 1024, 4096)
    shape = {**PRESETS[args.preset], "num_hidden_layers": args.layers}
    torch.manual_seed(0)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**shape, max_position_embeddings=4096),
                                                 dtype=torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def write_data(path: Path, examples: int, tokens: int) -> None:
    """Conversations of about ``tokens`` byte-level tokens (a third prompt, two thirds answer)."""
    from iaif.demo.demo_data import pretraining_corpus

    words = " ".join(pretraining_corpus(1, 200)).split()
    rng = random.Random(0)
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(examples):
            text = [rng.choice(words) for _ in range(tokens // 2)]  # about 2 tokens a word here
            cut = len(text) // 3
            fh.write(json.dumps({"id": f"ex{i}", "messages": [
                {"role": "user", "content": " ".join(text[:cut])},
                {"role": "assistant", "content": " ".join(text[cut:])}]}) + "\n")


def _tokens(data: Path, model: str, max_length: int) -> int:
    from iaif.training.data import load_examples, tokenize_examples
    from iaif.training.lora import ModelConfig, load_tokenizer

    tok = load_tokenizer(ModelConfig(name_or_path=model))
    return sum(len(t.input_ids) for t in tokenize_examples(load_examples(str(data)), tok, "tulu", max_length)[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="llama-3.1-8b")
    ap.add_argument("--layers", type=int, default=2, help="decoder layers of the preset")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="4bit", choices=["4bit", "bf16", "fp32"])
    ap.add_argument("--examples", type=int, default=64, help="examples to extract")
    ap.add_argument("--tokens", type=int, default=512, help="about this many tokens per example (max_length too)")
    ap.add_argument("--warmup-examples", type=int, default=12, help="warm-up examples (batch 4: 3 steps)")
    ap.add_argument("--dim", type=int, default=8192)
    ap.add_argument("--out", required=True, help="work folder (model, data, runs)")
    ap.add_argument("--json", default="", help="also write the results here")
    args = ap.parse_args()

    from iaif.selection.features.extract import ExtractConfig, run_extract
    from iaif.selection.features.store import FeatureStore
    from iaif.training.data import DataConfig, TextFormat
    from iaif.training.finetune import TrainingSettings
    from iaif.training.lora import LoraSettings, ModelConfig
    from iaif.training.warmup import WarmupConfig, run_warmup

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"preset": args.preset, "layers": args.layers, "precision": args.precision,
                           "device": args.device}
    start = time.perf_counter()
    build_base(args, out / "model")
    res["build_seconds"] = round(time.perf_counter() - start, 1)
    data = out / "data.jsonl"
    write_data(data, args.examples, args.tokens)
    model = ModelConfig(name_or_path=str(out / "model"), precision=args.precision)  # type: ignore[arg-type]
    lora = LoraSettings()
    per_device = 2
    training = TrainingSettings(num_epochs=1, effective_batch_size=2 * per_device, per_device_batch_size=per_device,
                                logging_steps=1)
    text = TextFormat(max_length=args.tokens)
    warm = WarmupConfig(data=DataConfig(path=str(data), max_examples=args.warmup_examples), model=model, lora=lora,
                        training=training, text=text, fraction=1.0, output_dir=str(out / "warmup"))
    start = time.perf_counter()
    run_warmup(warm)
    res["warmup_seconds"] = round(time.perf_counter() - start, 1)
    summary = json.loads((out / "warmup" / "train_summary.json").read_text())
    res["warmup_steps"] = summary["global_step"]
    res["warmup_loss_first_last"] = [summary["first_logged_loss"], summary["last_logged_loss"]]
    ckpt = sorted((out / "warmup").glob("checkpoint-epoch*"))[-1]
    tokens = _tokens(data, str(out / "model"), args.tokens)
    for feature, checkpoint in (("adam", str(ckpt)), ("grad", "")):
        cfg = ExtractConfig(model=model, checkpoint=checkpoint, lora=lora, data=DataConfig(path=str(data)),
                            text=text, feature=feature, dim=args.dim,  # type: ignore[arg-type]
                            output_dir=str(out / f"store-{feature}"))
        start = time.perf_counter()
        run_extract(cfg)
        took = time.perf_counter() - start
        store = FeatureStore.open(cfg.output_dir)
        feats = np.asarray(store.features, dtype=np.float32)
        res[f"extract_{feature}"] = {
            "examples": len(store.ids), "tokens": tokens, "seconds": round(took, 2),
            "tokens_per_s": round(tokens / took, 1), "shape": list(feats.shape),
            "finite": bool(np.isfinite(feats).all()), "nonzero_rows": int((np.abs(feats).sum(axis=1) > 0).sum())}
    print(json.dumps(res, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
