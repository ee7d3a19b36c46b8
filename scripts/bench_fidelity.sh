#!/usr/bin/env bash
# Fidelity benchmark: the default suite (data-folder pairs when ../shared/data or $IAIF_SHARED_DATA
# exists, else scikit-learn's bundled sets). Prints the correlation table, target checks and total time.
# Extra flags go to `iaif fidelity`, e.g.  scripts/bench_fidelity.sh --pairs mnist_logreg digits_mlp
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${FIDELITY_OUT:-runs/fidelity}"
start=$(date +%s)
python -m iaif fidelity --output-dir "$OUT" "$@"
echo "wall time: $(( $(date +%s) - start )) s; table: $OUT/table.md, results: $OUT/results.json"
