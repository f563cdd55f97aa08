#!/usr/bin/env bash
# The Reformer paper's duplication task at paper scale on one GPU (issue 22, experiment a): length 1024,
# 1 layer, d_model 256, 128 symbols, trained with LSH-4 for a fixed time (--time-limit: it then checkpoints
# and stops), evaluated with 1/2/4/8 hash rounds and full attention (accuracy on the copied half; paper:
# 99.9-100% with 8 rounds, after far longer training). Prepared like benchmarks/gpu_suite.sh (carried
# DeepSpeed wheels in .whl/); output in $OUT (the device tool's folder) or ./duplication_gpu_out.
#
#   bash benchmarks/duplication_gpu.sh              # on the GPU machine, ~4 min (TRAIN_SECONDS=150 of training)
#   bash benchmarks/duplication_gpu.sh --dry-run    # anywhere, CPU: the same pipeline at toy sizes
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-$PWD/duplication_gpu_out}
mkdir -p "$OUT_DIR"
source benchmarks/gpu_env.sh  # $PY, carried DeepSpeed wheels, the shared environment

if [ "${1:-}" = "--dry-run" ]; then
  exec $PY benchmarks/long_context.py table2 --smoke --set variants=lsh4 --out "$OUT_DIR/table2"
fi
exec $PY benchmarks/long_context.py table2 --out "$OUT_DIR/table2" --time-limit "${TRAIN_SECONDS:-150}" \
  --set variants=lsh4 --set d_model=256 --set length=1024 --set steps=100000 --set batch=16 --set lr=5e-4 \
  --set train_examples=20000 --set examples=64
