#!/usr/bin/env bash
# Paper-scale pipeline on one node with 8 GPUs: Llama-3.1-8B, LESS recipe, 5% budget, every method.
# Each step is a separate `accelerate launch` so a failed or pre-empted step can be rerun alone;
# finished steps are skipped (resume). Usage: scripts/llama31_8b_pipeline.sh [CONFIG] [extra flags]
set -euo pipefail
CONFIG=${1:-configs/llama31_8b/pipeline.yaml}
shift || true
NUM_GPUS=${NUM_GPUS:-8}
LAUNCH=(accelerate launch --config_file configs/accelerate/multi_gpu.yaml --num_processes "$NUM_GPUS" -m iaif run "$CONFIG")
TARGETS_DIR=${TARGETS_DIR:-runs/llama31_8b/targets}  # must match the `targets:` paths of the config

# selection targets of all 11 tasks (sizes in docs/PAPER_SCALE.md) from the benchmark data folder; humaneval needs the extra
[ -f "$TARGETS_DIR/run_info.json" ] || iaif make-targets --output_dir "$TARGETS_DIR" \
  --benchmarks mmlu bbh tydiqa gsm8k humaneval squad arc_challenge hellaswag piqa commonsenseqa aqua
"${LAUNCH[@]}" --steps warmup "$@"          # DDP LoRA warm-up, 4 checkpoints
"${LAUNCH[@]}" --steps extract "$@"         # pool (Adam) and target (grad) features, sharded over GPUs
iaif run "$CONFIG" --steps select "$@"      # every method, one process (GPU 0 if available)
"${LAUNCH[@]}" --steps train "$@"           # one adapter per method and seed, DDP
"${LAUNCH[@]}" --steps eval "$@"            # lm-eval hf backend, data-parallel over GPUs
iaif run "$CONFIG" --steps report "$@"
