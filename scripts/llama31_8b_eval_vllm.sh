#!/usr/bin/env bash
# Evaluate the paper-scale adapters with vLLM instead of the hf backend (needs `pip install -e ".[vllm]"`).
# vLLM parallelises itself (tensor/data parallel through its own settings), so no accelerate here.
set -euo pipefail
iaif run configs/llama31_8b/pipeline_vllm_eval.yaml "$@"
