#!/usr/bin/env bash
# Type-check the installed layout. The repository keeps one folder per stage (selection/, training/,
# evaluation/, ...) that installs as iaif.<stage>; a type checker resolves modules from folders, so
# this mirrors the wheel's layout with symbolic links under build/typecheck and checks `-p iaif`.
set -euo pipefail
cd "$(dirname "$0")/.."
stage=build/typecheck
rm -rf "$stage" && mkdir -p "$stage/iaif"
for f in iaif/*.py; do ln -s "../../../$f" "$stage/$f"; done
for pair in common:common demo:demo configs:configs training:training selection:selection evaluation:evaluation; do
    ln -s "../../../${pair#*:}" "$stage/iaif/${pair%%:*}"
done
cd "$stage" && exec python -m mypy --config-file ../../pyproject.toml -p iaif "$@"
