"""Throughput and peak memory of per-example gradient features, on one model and one set of batches:

  (a) extract  — the `iaif extract` path (LoraFeaturizer: batched hooks, factorised projection),
                 for `grad` and `adam` features;
  (b) fwd+bwd  — plain LoRA training forward + backward over the same batches (the ceiling);
  (c) LESS     — one example per backward, full LoRA gradient, dense Rademacher projection to d
                 (gradients buffered and projected 16 at a time as in LESS). Only the projection's
                 matmul is timed: one pre-generated d × 16384 Rademacher block is reused for every
                 16384 gradient columns, so no generation cost is counted (a lower bound on the
                 reference's cost, i.e. favourable to it).

The model is randomly initialised from a LlamaConfig (same cost as trained weights); data are
random token sequences whose first half is prompt (masked). Each method runs in a fresh child
process so its peak memory (CPU: max RSS; GPU: max allocated) is its own; methods are repeated in
interleaved rounds and each one's best round is reported (the CPU may be shared with other jobs).

  python scripts/bench_extract.py                        # tiny model on CPU
  python scripts/bench_extract.py --preset llama-3.1-8b --device cuda --dtype bf16 --min-len 512 --max-len 512
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import time
from typing import Any

import torch

PRESETS = {
    "tiny": dict(vocab_size=1024, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2),
    "llama-3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0),
}


def build_model(args: argparse.Namespace) -> Any:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    config = LlamaConfig(**PRESETS[args.preset], max_position_embeddings=max(4096, args.max_len))
    with torch.device(args.device):
        model = LlamaForCausalLM(config).to(dtype)
    lora = LoraConfig(r=args.rank, lora_alpha=4 * args.rank, lora_dropout=0.0,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False)
    return get_peft_model(model, lora).eval()


def make_examples(args: argparse.Namespace) -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(1)
    vocab = PRESETS[args.preset]["vocab_size"]
    out = []
    for _ in range(args.examples):
        n = int(torch.randint(args.min_len, args.max_len + 1, (1,), generator=g))
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * (n // 2) + ids[n // 2 :]})
    return out


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(method: str, args: argparse.Namespace) -> dict[str, float]:
    """Run one method in this (child) process; returns examples, tokens, seconds, peak memory."""
    from iaif.selection.features.adam import AdamPreconditioner
    from iaif.selection.features.batching import token_budget_batches
    from iaif.selection.features.featurizer import LoraFeaturizer
    from iaif.selection.features.per_example_grads import find_lora_matrices, per_example_loss
    from iaif.selection.features.projection import rademacher_block, stream_key
    from iaif.training.collate import PaddingCollator

    torch.set_num_threads(args.threads)
    model = build_model(args)
    examples = make_examples(args)
    collate = PaddingCollator(0)
    batches = [collate([examples[i] for i in b])
               for b in token_budget_batches([len(e["input_ids"]) for e in examples], args.token_budget, args.max_batch_size)]
    batches = [{k: v.to(args.device) for k, v in b.items()} for b in batches]
    matrices = find_lora_matrices(model)

    if method.startswith("extract"):
        adam = None
        if method == "extract-adam":
            g = torch.Generator().manual_seed(2)
            state = {m.name: {"exp_avg": torch.randn(m.shape, generator=g) * 1e-4,
                              "exp_avg_sq": torch.rand(m.shape, generator=g) * 1e-8, "step": 1} for m in matrices}
            adam = AdamPreconditioner(state, (0.9, 0.999), 1e-8, {m.name: m.shape for m in matrices})
        featurizer = LoraFeaturizer(model, "adam" if adam else "grad", "factorised", args.dim, seed=0, adam=adam)

        def step(batch: dict[str, torch.Tensor]) -> None:
            featurizer(batch).cpu()

        units = batches
    elif method == "fwd+bwd":
        for m in matrices:
            m.module.weight.requires_grad_(True)

        def step(batch: dict[str, torch.Tensor]) -> None:
            model(**batch).loss.backward()
            model.zero_grad(set_to_none=True)

        units = batches
    elif method == "less":
        params = [m.module.weight for m in matrices]
        for p in params:
            p.requires_grad_(True)
        block = rademacher_block(stream_key(0, "dense"), 0, args.dim, 0, 16384, args.device) / args.dim**0.5
        buffer: list[torch.Tensor] = []

        def project(flat: torch.Tensor) -> torch.Tensor:
            out = torch.zeros(flat.shape[0], args.dim, device=flat.device)
            for start in range(0, flat.shape[1], block.shape[1]):
                part = flat[:, start : start + block.shape[1]]
                out += part @ block[:, : part.shape[1]].T
            return out

        def step(batch: dict[str, torch.Tensor]) -> None:
            loss = per_example_loss(model(input_ids=batch["input_ids"]).logits, batch["labels"])[0]
            grads = torch.autograd.grad(loss, params)
            buffer.append(torch.cat([g.flatten().float() for g in grads]))
            if len(buffer) == 16:
                project(torch.stack(buffer)).cpu()
                buffer.clear()

        units = [collate([e]) for e in examples[: args.less_examples or len(examples)]]
        units = [{k: v.to(args.device) for k, v in u.items()} for u in units]
    else:
        raise ValueError(method)

    step(units[0])  # warm-up, not timed
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for unit in units:
        step(unit)
    if method == "less" and buffer:
        project(torch.stack(buffer)).cpu()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tokens = sum(int(u["attention_mask"].sum()) for u in units)
    return {"examples": sum(u["input_ids"].shape[0] for u in units), "tokens": tokens, "seconds": seconds,
            "peak_mb": peak_memory_mb(args.device)}


def _child(method: str, args: argparse.Namespace, queue: Any) -> None:
    queue.put(measure(method, args))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="model architecture (random init)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--rank", type=int, default=128, help="LoRA rank on q/k/v/o")
    parser.add_argument("--dim", type=int, default=8192, help="projected dimension")
    parser.add_argument("--examples", type=int, default=128)
    parser.add_argument("--less-examples", type=int, default=None,
                        help="time the LESS-style reference on the first N examples only (default: all)")
    parser.add_argument("--min-len", type=int, default=64)
    parser.add_argument("--max-len", type=int, default=256)
    parser.add_argument("--token-budget", type=int, default=4096)
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", default="extract-grad,extract-adam,fwd+bwd,less")
    parser.add_argument("--rounds", type=int, default=2, help="repetitions of every method (interleaved); the best is reported")
    args = parser.parse_args()

    ctx = mp.get_context("spawn")
    methods = args.methods.split(",")
    results: dict[str, dict[str, float]] = {}
    for round_ in range(args.rounds):  # methods interleaved, best round kept: robust to a shared machine's load
        for method in methods:
            queue = ctx.Queue()
            proc = ctx.Process(target=_child, args=(method, args, queue))
            proc.start()
            r = queue.get()
            proc.join()
            print(f"round {round_ + 1} {method:13s} {r['tokens'] / r['seconds']:8.0f} tokens/s", flush=True)
            if method not in results or r["seconds"] < results[method]["seconds"]:
                results[method] = r
    print(f"\nbest of {args.rounds} rounds:")
    for method, r in results.items():
        print(f"{method:13s} {r['tokens'] / r['seconds']:10.0f} tokens/s {r['examples'] / r['seconds']:8.2f} examples/s "
              f"peak {r['peak_mb']:8.0f} MB  ({r['examples']} examples, {r['seconds']:.1f} s)", flush=True)
    speed = {m: r["tokens"] / r["seconds"] for m, r in results.items()}
    if "extract-grad" in speed and "fwd+bwd" in speed:
        print(f"extract-grad / fwd+bwd = {speed['extract-grad'] / speed['fwd+bwd']:.2f}")
    if "extract-grad" in speed and "less" in speed:
        print(f"extract-grad / LESS-style = {speed['extract-grad'] / speed['less']:.1f}x")
    if "extract-adam" in speed and "less" in speed:
        print(f"extract-adam / LESS-style = {speed['extract-adam'] / speed['less']:.1f}x")


if __name__ == "__main__":
    main()
