#!/usr/bin/env bash
# One-shot GPU check (issue 11, item 4): everything only a GPU shows, on one GPU within 8 minutes,
# into one JSON file.
#
#   scripts/gpu_check.sh [RESULTS.json]          # default: $OUT/gpu_check.json (./gpu_check.json without $OUT)
#   scripts/gpu_check.sh --tiny [RESULTS.json]   # CPU dry run, tiny sizes: the same steps (tests/test_gpu_check.py)
#   PYTHON=/opt/torch/.venv/bin/python3 scripts/gpu_check.sh   # the interpreter that holds torch, iaif and bitsandbytes
#                                                              # (default: `python`); docs/BENCHMARKS.md, "One-shot GPU check"
#
# Steps, each under `timeout` and never stopping the others (a step's entry holds its exit status,
# seconds, its figures and, when it failed, the end of its log):
#   extract    random-init Llama-3.1-8B (32 layers, bf16), 512-token examples: tokens/s of `iaif extract`'s
#              featurizer (grad, adam) vs LoRA forward+backward vs the LESS-style one-example-per-backward
#   cosine     bf16 vs fp32 features of the same weights (cosine) and the batched-vs-per-example error in fp32
#   greedy     exact and stochastic greedy on the GPU, N = 2.7M candidates x m = 256 (fp16 store), k = 5%
#   qlora      4-bit (NF4) `iaif warmup` for a few steps, then `iaif extract` (adam, grad) at 8B widths (2 layers)
#   vllm       `iaif eval --backend vllm` smoke test on a small model + adapter, only if vllm imports
# The steps share one deadline (470 s after the start); a step left with too little time is skipped.
# The dry run allows 5x the time of each step and of the deadline (a shared CPU is slow at anything).
set -euo pipefail
py="${PYTHON:-python}"
cd "$(dirname "$0")/.."

tiny=0
if [[ "${1:-}" == "--tiny" ]]; then tiny=1; shift; fi
results="${1:-${OUT:-.}/gpu_check.json}"
mkdir -p "$(dirname "$results")"
work="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
trap 'rm -rf "$work"' EXIT
parts="$work/parts"
mkdir -p "$parts"
slack=$(( tiny ? 5 : 1 ))
deadline=$(( $(date +%s) + 470 * slack ))

# step NAME SECONDS COMMAND...: run it under timeout (capped by the deadline), record rc and seconds
step() {
    local name=$1 limit=$2 rc=0 t0 left
    shift 2
    limit=$(( limit * slack ))
    t0=$(date +%s)
    left=$(( deadline - t0 ))
    if (( left < limit )); then limit=$left; fi
    if (( limit < 10 )); then
        echo "{\"rc\": null, \"skipped\": \"out of time\"}" > "$parts/$name.status.json"
        echo "[gpu_check] $name: skipped (out of time)" >&2
        return 0
    fi
    echo "[gpu_check] $name: up to ${limit}s" >&2
    timeout --kill-after=10 "$limit" "$@" > "$parts/$name.log" 2>&1 || rc=$?
    echo "{\"rc\": $rc, \"seconds\": $(( $(date +%s) - t0 )), \"limit_s\": $limit}" > "$parts/$name.status.json"
    echo "[gpu_check] $name: rc=$rc in $(( $(date +%s) - t0 ))s" >&2
}

skip() {  # skip NAME REASON
    "$py" -c 'import json, sys; print(json.dumps({"rc": None, "skipped": sys.argv[1]}))' "$2" > "$parts/$1.status.json"
    echo "[gpu_check] $1: skipped ($2)" >&2
}

if (( tiny )); then
    device=cpu; model=(--preset tiny); len=(--min-len 64 --max-len 64); n=20000; k=1000
    extract_sizes=(--examples 4 --less-examples 2 --token-budget 1024); qlora=(--preset tiny --precision fp32 --examples 4
    --tokens 96 --dim 64 --warmup-examples 4); threads=(--threads 1)
else
    device=cuda; model=(--preset llama-3.1-8b); len=(--min-len 512 --max-len 512); n=2700000; k=135000
    extract_sizes=(--examples 64 --less-examples 16 --token-budget 8192); qlora=(--preset llama-3.1-8b --precision 4bit
    --layers 2 --examples 64 --tokens 512); threads=(--threads 4)
fi

"$py" -c 'import torch, json, sys, os; print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda,
    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "tiny": sys.argv[1] == "1",
    "cpus": os.cpu_count(), "python": sys.executable}))' "$tiny" > "$parts/environment.json"

step extract 150 "$py" scripts/bench_extract.py "${model[@]}" --device "$device" --dtype bf16 "${len[@]}" \
    "${extract_sizes[@]}" "${threads[@]}" --rounds 1 --methods extract-grad,extract-adam,fwd+bwd,less \
    --json "$parts/extract.json"
step cosine 70 "$py" scripts/bench_extract.py "${model[@]}" --device "$device" --dtype bf16 "${len[@]}" \
    --examples 2 "${threads[@]}" --rounds 1 --methods extract-grad --check 2 --json "$parts/cosine.json"
step greedy_store 30 "$py" scripts/bench_greedy.py --n "$n" --k "$k" --store "$work/phi.npy" --write-only
for kind in exact stochastic; do
    step "greedy_$kind" "$([[ $kind == exact ]] && echo 150 || echo 50)" "$py" scripts/bench_greedy.py --n "$n" --k "$k" --store "$work/phi.npy" --kind "$kind" \
        --device "$device" --json "$parts/greedy_$kind.json"
done
rm -f "$work/phi.npy"
step qlora 70 "$py" scripts/check_qlora.py "${qlora[@]}" --device "$device" --out "$work/qlora" \
    --json "$parts/qlora.json"
if "$py" -c "import vllm" > /dev/null 2>&1; then
    vllm_run() {
        set -e
        "$py" -m iaif make-demo-data --output_dir "$work/demo"
        "$py" scripts/check_qlora.py --preset tiny --precision bf16 --device "$device" --examples 4 --tokens 128 \
            --dim 64 --out "$work/vllm_base"
        "$py" -m iaif eval --model "$work/vllm_base/model" --adapter "$work/vllm_base/warmup/checkpoint-epoch1/adapter" \
            --backend vllm --demo_targets "$work/demo/targets" --limit 8 --output_dir "$work/eval_vllm"
        cp "$work/eval_vllm/scores.json" "$parts/vllm.json"
    }
    export -f vllm_run
    export work device parts py
    step vllm 120 bash -c vllm_run
else
    skip vllm "vllm is not installed"
fi

"$py" - "$parts" "$results" <<'EOF'
import json, sys
from pathlib import Path

parts, results = Path(sys.argv[1]), Path(sys.argv[2])
out = {"environment": json.loads((parts / "environment.json").read_text()), "steps": {}}
for status in sorted(parts.glob("*.status.json")):
    name = status.name[: -len(".status.json")]
    entry = json.loads(status.read_text())
    figures = parts / f"{name}.json"
    if figures.is_file():
        entry["figures"] = json.loads(figures.read_text())
    log = parts / f"{name}.log"
    if entry.get("rc") not in (0, None) and log.is_file():
        entry["log_tail"] = log.read_text(errors="replace")[-3000:]
    out["steps"][name] = entry
results.write_text(json.dumps(out, indent=2))
print(f"[gpu_check] results in {results}", file=sys.stderr)
EOF
