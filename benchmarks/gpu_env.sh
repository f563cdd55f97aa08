# Sourced by the GPU-machine scripts (gpu_suite.sh, duplication_gpu.sh), from the repository root: picks the
# Python, installs the carried DeepSpeed wheels (the machine is offline; deepspeed is an sdist) and sets the
# environment every step shares.
PY=${PYTHON:-python3}
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then PY=.venv/bin/python; fi
if ls .whl/*.whl >/dev/null 2>&1 && ! $PY -c "import deepspeed" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --target .site .whl/*.whl
  export PYTHONPATH="$PWD/.site:$PWD:${PYTHONPATH:-}"
else
  export PYTHONPATH="$PWD:${PYTHONPATH:-}"
fi
export TORCH_CUDA_ARCH_LIST=9.0                # the image's "9.0a" breaks DeepSpeed's op builder
export TORCH_EXTENSIONS_DIR="$PWD/.torch_extensions"
export HF_HUB_OFFLINE=1
export TRITON_CACHE_DIR="$PWD/.triton_cache"   # one cache for every step: a specialisation compiles once
