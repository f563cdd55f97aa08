#!/usr/bin/env bash
# On a connected machine: put deepspeed and the packages it needs that the offline GPU image lacks into .whl/
# (Python 3.12, manylinux x86_64), to carry to the GPU machine for benchmarks/gpu_suite.sh
# (shared/recipes/gpu-device.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mkdir -p .whl
$PY -m pip wheel -q --no-deps deepspeed==0.19.8 -w .whl
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 -d .whl hjson pydantic pydantic-core annotated-types typing-inspection
ls -l .whl
