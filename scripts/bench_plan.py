"""`iaif plan`'s estimate against the measured peak memory on CPU (peak RSS) of one extract batch and
one training step, for two model sizes and two precisions.

Each case runs in a fresh child process: libraries imported, the kernel's peak-RSS mark reset
(Linux ``/proc/self/clear_refs``), then the randomly initialised model is built in the measured
precision, a fresh fp32 LoRA adapter added and one step run on a batch of ``rows × seq_len`` random
tokens (no padding, the second half of each row is the answer), after a warm-up of the same code on a
one-layer model (modules imported and kernels initialised on first use are library footprint):

  extract  ``LoraFeaturizer`` (grad features, factorised projection), as ``iaif extract`` runs a batch;
  train    forward with labels, backward and one AdamW step over the LoRA parameters, as the Trainer does.

The measured figure is the peak RSS minus the RSS before the model was built (the libraries' own
footprint is excluded, as in the plan). The error is (plan − measured) / measured.

The children run with ``MALLOC_MMAP_THRESHOLD_=65536``: blocks over 64 KiB are mapped and unmapped
directly, so the RSS follows the memory in use. With glibc's default the threshold grows up to 32 MiB
as large blocks are freed, and freed tensors then stay in the heap, counted in the RSS though unused
(``--glibc-default`` measures that way; +20-45 % on the 137M model in fp32).

  OMP_NUM_THREADS=1 python scripts/bench_plan.py                       # tiny + 137M, extract + train, fp32 + bf16
  OMP_NUM_THREADS=1 python scripts/bench_plan.py --models tiny --attention eager
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

MODELS: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=1024, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, rows=8, seq_len=256),
    "137m": dict(vocab_size=32000, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, num_key_value_heads=12, rows=2, seq_len=512),
}
"""tiny: the demo model's architecture (``iaif build-tiny-model`` defaults); 137m: a Llama-style model of
137M parameters (tied embeddings). ``rows`` × ``seq_len`` is the batch."""


def rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field} (Linux only)")


def run_step(case: dict[str, Any], shape: dict[str, Any], rows: int, seq_len: int) -> None:
    """Build the model of ``shape`` with a fresh LoRA and run the case's step on a random batch."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from iaif.selection.features.featurizer import LoraFeaturizer
    from iaif.training.data import IGNORE_INDEX
    from iaif.training.lora import LoraSettings, add_lora

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, shape["vocab_size"], (rows, seq_len), generator=gen)
    labels = ids.clone()
    labels[:, : seq_len // 2] = IGNORE_INDEX
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    torch.manual_seed(0)
    dtype = torch.float32 if case["precision"] == "fp32" else torch.bfloat16
    config = LlamaConfig(**shape, tie_word_embeddings=True, max_position_embeddings=4096)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=case["attention"])
    model = add_lora(model, LoraSettings(r=case["r"], alpha=2 * case["r"], dropout=case["dropout"]))
    if case["mode"] == "extract":
        LoraFeaturizer(model, "grad", "factorised", case["dim"], 0)(batch)
    else:
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        model(**batch).loss.backward()
        optimizer.step()


def child(case: dict[str, Any]) -> dict[str, float]:
    """Run one case in this process and return the measured peak above the baseline, in MiB.

    A warm-up run of the same code on a one-layer model of width 64 first loads the modules and
    kernels that are imported or initialised on first use (library footprint, not the plan's)."""
    import gc

    import torch

    torch.set_num_threads(1)
    spec = MODELS[case["model"]]
    shape = {k: v for k, v in spec.items() if k not in ("rows", "seq_len")}
    small = {**shape, "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
             "num_attention_heads": 2, "num_key_value_heads": 2}
    run_step(case, small, 1, 16)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    base = rss_mib("VmRSS")
    run_step(case, shape, spec["rows"], spec["seq_len"])
    return {"measured_mib": rss_mib("VmHWM") - base}


def planned(case: dict[str, Any], config_file: Path) -> int:
    """The plan's peak in bytes for the case."""
    from iaif.selection.features.memory_plan import PlanConfig, estimate, load_model_config, model_shape
    from iaif.training.lora import LoraSettings

    spec = MODELS[case["model"]]
    lora = LoraSettings(r=case["r"], alpha=2 * case["r"], dropout=case["dropout"])
    cfg = PlanConfig(model=str(config_file), mode=case["mode"], precision=case["precision"], lora=lora,
                     token_budget=spec["rows"] * spec["seq_len"], seq_len=spec["seq_len"], attention=case["attention"],
                     dim=case["dim"], device="cpu")
    return estimate(cfg, model_shape(load_model_config(cfg.model), list(lora.target_modules))).peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,137m")
    parser.add_argument("--modes", default="extract,train")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--attention", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--dim", type=int, default=8192)
    parser.add_argument("--glibc-default", action="store_true",
                        help="measure with glibc's default (dynamic) mmap threshold instead of 64 KiB")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    import tempfile

    print(f"{'model':6} {'mode':8} {'prec':5} {'plan MiB':>9} {'measured MiB':>13} {'error':>7}")
    errors = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            config_file = Path(tmp) / f"{model}.json"
            shape = {k: v for k, v in MODELS[model].items() if k not in ("rows", "seq_len")}
            config_file.write_text(json.dumps({"model_type": "llama", **shape, "tie_word_embeddings": True}))
            for mode in args.modes.split(","):
                for precision in args.precisions.split(","):
                    case = dict(model=model, mode=mode, precision=precision, attention=args.attention, r=args.r,
                                dropout=args.dropout, dim=args.dim)
                    env = {**os.environ, "OMP_NUM_THREADS": "1"}
                    if not args.glibc_default:
                        env["MALLOC_MMAP_THRESHOLD_"] = str(64 << 10)
                    run = subprocess.run([sys.executable, __file__, "--child", json.dumps(case)], capture_output=True,
                                         text=True, env=env, check=False)
                    if run.returncode:
                        raise SystemExit(f"case {case} failed:\n{run.stderr[-3000:]}")
                    measured = json.loads(run.stdout.strip().splitlines()[-1])["measured_mib"]
                    plan = planned(case, config_file) / 2**20
                    error = (plan - measured) / measured
                    errors.append(error)
                    print(f"{model:6} {mode:8} {precision:5} {plan:9.1f} {measured:13.1f} {error:+7.1%}", flush=True)
    within = sum(abs(e) <= 0.15 for e in errors)
    print(f"{within} of {len(errors)} within 15 %; largest |error| {max(map(abs, errors)):.1%}")


if __name__ == "__main__":
    main()
