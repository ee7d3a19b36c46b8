"""Throughput, peak memory and projection share of per-example gradient features, on one model and
one set of batches, in one or more precisions:

  extract-grad / extract-adam              the `iaif extract` path (LoraFeaturizer: batched hooks),
                                           factorised projection, grad and adam features;
  extract-grad-dense / extract-adam-dense  the same with the dense (LESS/TRAK) projection;
  fwd+bwd  plain LoRA training forward + backward over the same batches (the ceiling);
  less     one example per backward, full LoRA gradient, dense Rademacher projection to d
           (gradients buffered and projected 16 at a time as in LESS). Only the projection's matmul
           is timed: one pre-generated d × 16384 Rademacher block is reused for every 16384 gradient
           columns, so no generation cost is counted (favourable to the reference).

The model is randomly initialised from a LlamaConfig in the measured precision (same cost as
trained weights; `--layers N` keeps N decoder layers of the preset); LoRA adapters stay fp32 as peft
makes them. Data are random token sequences whose first half is prompt (masked). Each method runs
in a fresh child process; its peak memory (CPU: the process's peak RSS, reset after the model is
built and the first batch warmed up, so it is the extraction's own peak with the weights resident;
GPU: max allocated) is its own. Methods are repeated in interleaved rounds and each one's best round
is reported (the CPU may be shared with other jobs). The projection share is the time inside the
projection code (factorised: the hooks' P_in·x and P_out·δ products and their outer product; dense
and adam: the projector calls) over the timed loop's time.

`--check N` also compares, on the first N examples, the batched `grad` and `adam` features in fp32
against a one-example-at-a-time autograd reference (full LoRA gradient per example, projected
afterwards) and reports the cosine of the features of the same weights cast to bf16 against fp32.

  python scripts/bench_extract.py                        # tiny model on CPU, fp32
  python scripts/bench_extract.py --preset llama-3.1-8b --layers 1 --dtype fp32,bf16 --min-len 512 \\
      --max-len 512 --examples 4 --token-budget 1024 --rounds 1 --check 2 --methods extract-grad,extract-adam,fwd+bwd,less
  python scripts/bench_extract.py --preset llama-3.1-8b --device cuda --dtype bf16 --min-len 512 --max-len 512
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing as mp
import os
import queue as queue_module
import resource
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=1024, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2),
    "llama-3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0),
}
METHODS = ("extract-grad", "extract-adam", "extract-grad-dense", "extract-adam-dense", "fwd+bwd", "less")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def model_config(args: argparse.Namespace) -> Any:
    """The preset's LlamaConfig, with ``--layers`` decoder layers when given."""
    from transformers import LlamaConfig

    shape = dict(PRESETS[args.preset])
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    return LlamaConfig(**shape, max_position_embeddings=max(4096, args.max_len))


def build_model(args: argparse.Namespace, dtype: str) -> Any:
    """Random-init base model in ``dtype`` (initialised in that dtype: no fp32 copy) + fp32 LoRA r on q/k/v/o."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from iaif.training.lora import quiet_peft_calls

    torch.manual_seed(0)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(model_config(args), dtype=DTYPES[dtype])
    lora = LoraConfig(r=args.rank, lora_alpha=4 * args.rank, lora_dropout=0.0,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False)
    with quiet_peft_calls():
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


def reset_peak_memory(device: str) -> None:
    """Start a new peak: CUDA's allocator statistics, or the kernel's peak RSS (Linux clear_refs)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:  # not Linux: the peak then includes the model's construction
        pass


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@contextmanager
def projection_timer(method: str, device: str) -> Iterator[list[float]]:
    """Accumulate the seconds spent in the projection code of ``method`` into the yielded ``[seconds]``.

    Wraps (for this process only) the class methods that do the projecting: the hooks' forward hook
    (P_in·x) and δ handler (P_out·δ and the outer product) on the factorised ``grad`` path, the
    projectors' calls on the paths that form the full per-example gradient."""
    from iaif.selection.features.per_example_grads import LoraGradientHooks
    from iaif.selection.features.projection import DenseProjector, KroneckerProjector

    total = [0.0]

    def timed(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def inner(*a: Any, **k: Any) -> Any:
            _sync(device)
            start = time.perf_counter()
            out = fn(*a, **k)
            _sync(device)
            total[0] += time.perf_counter() - start
            return out

        return inner

    patches: dict[tuple[type, str], Callable[..., Any]] = {}
    if method == "extract-grad":
        make_hook = LoraGradientHooks._forward_hook
        patches[(LoraGradientHooks, "_forward_hook")] = lambda self, matrix: timed(make_hook(self, matrix))
        patches[(LoraGradientHooks, "_on_delta")] = timed(LoraGradientHooks._on_delta)
    elif method.startswith("extract"):
        patches[(KroneckerProjector, "project_weight_grads")] = timed(KroneckerProjector.project_weight_grads)
        patches[(DenseProjector, "project")] = timed(DenseProjector.project)
    originals = {key: getattr(*key) for key in patches}
    for (cls, name), fn in patches.items():
        setattr(cls, name, fn)
    try:
        yield total
    finally:
        for (cls, name), fn in originals.items():
            setattr(cls, name, fn)


def random_adam(matrices: list[Any]) -> Any:
    """An Adam preconditioner with small random moments for every LoRA matrix (stands in for a warm-up checkpoint's)."""
    from iaif.selection.features.adam import AdamPreconditioner

    g = torch.Generator().manual_seed(2)
    state = {m.name: {"exp_avg": torch.randn(m.shape, generator=g) * 1e-4,
                      "exp_avg_sq": torch.rand(m.shape, generator=g) * 1e-8, "step": 1} for m in matrices}
    return AdamPreconditioner(state, (0.9, 0.999), 1e-8, {m.name: m.shape for m in matrices})


def featurizer_for(method: str, model: Any, args: argparse.Namespace) -> Any:
    from iaif.selection.features.featurizer import LoraFeaturizer
    from iaif.selection.features.per_example_grads import find_lora_matrices

    feature = "adam" if method.startswith("extract-adam") else "grad"
    projection = "dense" if method.endswith("-dense") else "factorised"
    adam = random_adam(find_lora_matrices(model)) if feature == "adam" else None
    return LoraFeaturizer(model, feature, projection, args.dim, seed=0, adam=adam)


def measure(method: str, dtype: str, args: argparse.Namespace) -> dict[str, float]:
    """Run one method in this (child) process: examples, tokens, seconds, projection seconds, peak memory."""
    from iaif.selection.features.batching import token_budget_batches
    from iaif.selection.features.per_example_grads import find_lora_matrices, per_example_loss
    from iaif.selection.features.projection import rademacher_block, stream_key
    from iaif.training.collate import PaddingCollator

    torch.set_num_threads(args.threads)
    model = build_model(args, dtype)
    examples = make_examples(args)
    collate = PaddingCollator(0)
    batches = [collate([examples[i] for i in b])
               for b in token_budget_batches([len(e["input_ids"]) for e in examples], args.token_budget, args.max_batch_size)]
    batches = [{k: v.to(args.device) for k, v in b.items()} for b in batches]
    matrices = find_lora_matrices(model)
    project_seconds = [0.0]

    if method.startswith("extract"):
        featurizer = featurizer_for(method, model, args)

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

        def project(flat: torch.Tensor) -> None:
            _sync(args.device)
            start = time.perf_counter()
            out = torch.zeros(flat.shape[0], args.dim, device=flat.device)
            for col in range(0, flat.shape[1], block.shape[1]):
                part = flat[:, col : col + block.shape[1]]
                out += part @ block[:, : part.shape[1]].T
            out.cpu()
            project_seconds[0] += time.perf_counter() - start

        def step(batch: dict[str, torch.Tensor]) -> None:
            loss = per_example_loss(model(input_ids=batch["input_ids"]).logits, batch["labels"])[0]
            grads = torch.autograd.grad(loss, params)
            buffer.append(torch.cat([g.flatten().float() for g in grads]))
            if len(buffer) == 16:
                project(torch.stack(buffer))
                buffer.clear()

        units = [collate([e]) for e in examples[: args.less_examples or len(examples)]]
        units = [{k: v.to(args.device) for k, v in u.items()} for u in units]
    else:
        raise ValueError(f"--methods: unknown method {method!r} (one of {', '.join(METHODS)})")

    step(units[0])  # warm-up, not timed
    if method == "less":
        buffer.clear()
    reset_peak_memory(args.device)
    with projection_timer(method, args.device) as timer:
        start = time.perf_counter()
        for unit in units:
            step(unit)
        if method == "less" and buffer:
            project(torch.stack(buffer))
        _sync(args.device)
        seconds = time.perf_counter() - start
    tokens = sum(int(u["attention_mask"].sum()) for u in units)
    return {"examples": sum(u["input_ids"].shape[0] for u in units), "tokens": tokens, "seconds": seconds,
            "projection_seconds": timer[0] + project_seconds[0], "peak_mb": peak_memory_mb(args.device)}


def reference_features(model: Any, examples: list[dict[str, list[int]]], dim: int, adam: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad, adam) features of each example from its own autograd backward (full LoRA gradient of its
    mean answer loss, no padding), projected afterwards with each matrix's P_out · G · P_inᵀ, summed."""
    from iaif.selection.features.per_example_grads import find_lora_matrices, per_example_loss
    from iaif.selection.features.projection import KroneckerProjector

    matrices = find_lora_matrices(model)
    projectors = [KroneckerProjector(0, m.name, *m.shape, dim) for m in matrices]
    params = [m.module.weight for m in matrices]
    for p in params:
        p.requires_grad_(True)
    grad_rows, adam_rows = [], []
    device = params[0].device
    for ex in examples:
        ids = torch.tensor([ex["input_ids"]], device=device)
        loss = per_example_loss(model(input_ids=ids).logits, torch.tensor([ex["labels"]], device=device))[0]
        grads = torch.autograd.grad(loss, params)
        grad_rows.append(sum(pr.project_weight_grads(g.float()[None])[0] for pr, g in zip(projectors, grads)))
        adam_rows.append(sum(pr.project_weight_grads(adam.direction(m.name, g.float()[None]))[0]
                             for pr, m, g in zip(projectors, matrices, grads)))
    for p in params:
        p.requires_grad_(False)
    return torch.stack(grad_rows), torch.stack(adam_rows)


def check_features(args: argparse.Namespace) -> dict[str, float]:
    """Batched features (one padded batch) vs the one-at-a-time reference in fp32, and bf16 vs fp32 cosines."""
    from iaif.selection.features.featurizer import LoraFeaturizer
    from iaif.selection.features.per_example_grads import find_lora_matrices
    from iaif.training.collate import PaddingCollator

    torch.set_num_threads(args.threads)
    model = build_model(args, "fp32")
    examples = make_examples(args)[: args.check]
    batch = {k: v.to(args.device) for k, v in PaddingCollator(0)(examples).items()}
    matrices = find_lora_matrices(model)
    adam = random_adam(matrices)
    ref_grad, ref_adam = reference_features(model, examples, args.dim, adam)
    out: dict[str, float] = {}
    fp32: dict[str, torch.Tensor] = {}
    for feature, ref in (("grad", ref_grad), ("adam", ref_adam)):
        fp32[feature] = LoraFeaturizer(model, feature, "factorised", args.dim, seed=0, adam=adam)(batch)
        rel = (fp32[feature] - ref).norm(dim=1) / ref.norm(dim=1)
        out[f"{feature}_max_rel_err_fp32"] = float(rel.max())
    lora = {id(m.module.weight) for m in matrices}
    for p in model.parameters():  # same weights, base cast to bf16; LoRA stays fp32 as peft keeps it
        if id(p) not in lora:
            p.data = p.data.to(torch.bfloat16)
    # The same one-at-a-time autograd reference, now in bf16: it tells the featurizer's own error in bf16
    # (featurizer vs reference, both bf16) from the model's bf16 arithmetic (reference bf16 vs fp32).
    ref_bf16 = dict(zip(("grad", "adam"), reference_features(model, examples, args.dim, adam)))
    for feature, ref in (("grad", ref_grad), ("adam", ref_adam)):
        bf16 = LoraFeaturizer(model, feature, "factorised", args.dim, seed=0, adam=adam)(batch).float()
        for name, a, b in (("bf16", bf16, fp32[feature]), ("bf16_autograd", ref_bf16[feature], ref),
                           ("bf16_vs_autograd_bf16", bf16, ref_bf16[feature])):
            cos = torch.nn.functional.cosine_similarity(a, b, dim=1)
            out[f"{feature}_cos_{name}_min"], out[f"{feature}_cos_{name}_mean"] = float(cos.min()), float(cos.mean())
    return out


def _child(job: str, dtype: str, args: argparse.Namespace, queue: Any) -> None:
    from iaif.training.lora import hide_bitsandbytes

    hide_bitsandbytes()  # as the iaif command does: no 4-bit model here, and no import-time warning from it
    queue.put(check_features(args) if job == "check" else measure(job, dtype, args))


def run_child(ctx: Any, job: str, dtype: str, args: argparse.Namespace) -> dict[str, float]:
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(job, dtype, args, queue))
    proc.start()
    while True:  # a child that dies (an import error, out of memory) must not leave us waiting forever
        try:
            result = queue.get(timeout=1.0)
            break
        except queue_module.Empty:
            if not proc.is_alive():
                raise RuntimeError(f"{job} ({dtype}): the measuring process exited with code {proc.exitcode}") from None
    proc.join()
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="model architecture (random init)")
    parser.add_argument("--layers", type=int, default=0, help="decoder layers to keep (0: the preset's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", help="comma-separated precisions, each measured: fp32, bf16")
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
    parser.add_argument("--methods", default="extract-grad,extract-adam,fwd+bwd,less", help=f"comma-separated, of {', '.join(METHODS)}")
    parser.add_argument("--rounds", type=int, default=2, help="repetitions of every method (interleaved); the best is reported")
    parser.add_argument("--check", type=int, default=0, help="exactness and bf16-cosine check on the first N examples (0: none)")
    parser.add_argument("--json", default="", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    for flag, values, allowed in (("--dtype", args.dtype, DTYPES), ("--methods", args.methods, METHODS)):
        unknown = [v for v in values.split(",") if v not in allowed]
        if unknown:
            parser.error(f"{flag}: unknown {unknown} (choose from {', '.join(allowed)})")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device is available")
    return args


def main() -> None:
    args = parse_args()
    ctx = mp.get_context("spawn")
    methods, dtypes = args.methods.split(","), args.dtype.split(",")
    print(f"torch {torch.__version__}, {args.preset} layers={args.layers or 'all'}, {args.device}, "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    results: dict[str, dict[str, dict[str, float]]] = {d: {} for d in dtypes}
    failed: dict[str, str] = {}  # "<dtype> <method>": why; a method that fails (out of memory) leaves the others measured
    for round_ in range(args.rounds):  # methods interleaved, best round kept: robust to a shared machine's load
        for dtype in dtypes:
            for method in methods:
                if f"{dtype} {method}" in failed:
                    continue
                try:
                    r = run_child(ctx, method, dtype, args)
                except RuntimeError as error:
                    failed[f"{dtype} {method}"] = str(error)
                    print(f"round {round_ + 1} {dtype} {method:18s} FAILED: {error}", flush=True)
                    continue
                print(f"round {round_ + 1} {dtype} {method:18s} {r['tokens'] / r['seconds']:8.1f} tokens/s "
                      f"(load {os.getloadavg()[0]:.2f})", flush=True)
                if method not in results[dtype] or r["seconds"] < results[dtype][method]["seconds"]:
                    results[dtype][method] = r
    print(f"\nbest of {args.rounds} rounds (load average now {os.getloadavg()[0]:.2f}):")
    for dtype, per_method in results.items():
        for method, r in per_method.items():
            print(f"{dtype} {method:18s} {r['tokens'] / r['seconds']:10.1f} tokens/s {r['examples'] / r['seconds']:8.3f} examples/s "
                  f"peak {r['peak_mb']:8.0f} MB  projection {100 * r['projection_seconds'] / r['seconds']:5.1f}% "
                  f"({r['examples']} examples, {r['seconds']:.1f} s)", flush=True)
        speed = {m: r["tokens"] / r["seconds"] for m, r in per_method.items()}
        for a, b in (("extract-grad", "fwd+bwd"), ("extract-adam", "fwd+bwd"), ("extract-grad", "less"), ("extract-adam", "less")):
            if a in speed and b in speed:
                print(f"{dtype} {a} / {b} = {speed[a] / speed[b]:.2f}")
    check = run_child(ctx, "check", "fp32", args) if args.check else {}
    for key, value in check.items():
        print(f"check ({args.check} examples): {key} = {value:.3g}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results, "check": check,
                                               "failed": failed}, indent=2))
    if failed:
        sys.exit(f"failed: {'; '.join(failed.values())}")


if __name__ == "__main__":
    main()
