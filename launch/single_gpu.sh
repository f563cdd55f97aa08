#!/usr/bin/env bash
# One process on one GPU (or the CPU): no launcher, discover() reports source "single".
#   launch/single_gpu.sh [--set section.key=value ...] [--resume auto]
# Knobs: CONFIG (default configs/quickstart.toml), GPU (device index, default 0), PYTHON.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
CONFIG="${CONFIG:-$REPO/configs/quickstart.toml}"
PYTHON="${PYTHON:-python}"
if [[ -z "${VIRTUAL_ENV:-}" && -f "$REPO/.venv/bin/activate" ]]; then
    set +u; source "$REPO/.venv/bin/activate"; set -u
fi
# Stale launcher variables would make the trainer wait for ranks that never come.
unset RANK LOCAL_RANK WORLD_SIZE LOCAL_WORLD_SIZE LOCAL_SIZE
export CUDA_VISIBLE_DEVICES="${GPU:-${CUDA_VISIBLE_DEVICES:-0}}"
exec "$PYTHON" -m reformer_dist.cli.train --config "$CONFIG" "$@"
