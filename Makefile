# Two entry points for newcomers (see README):
#   make quickstart   install into .venv and run a short CPU training run on built-in data
#   make test         install into .venv and run the test suite (what CI runs)
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.torch_extensions
# The venv's tools first for every process make starts: torch JIT-builds DeepSpeed ops with the `ninja`
# on PATH, and the venv's (pip, 1.13) and the system's (1.11) discard each other's builds.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install quickstart test test-fast compile-check lint
$(BIN)/python:
	$(PY) -m venv --system-site-packages $(VENV)

# A torch already visible (e.g. your CUDA build) is kept; otherwise the CPU build is installed first,
# because a bare `torch` requirement would pull a multi-GB CUDA build. The install is editable, so
# only a changed pyproject.toml needs pip again (the stamp saves ~10-30 s per quickstart/test).
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# The Triton versions GPU users run (the H100/H200 image: 3.6.0; torch 2.13's CUDA wheel: 3.7.1), each in a side
# folder, so the compile check proves the kernels under them as well as under the test environment's own.
SIDE_TRITONS := $(VENV)/triton-3.6.0 $(VENV)/triton-3.7.1
$(VENV)/triton-%/.installed: | $(BIN)/python
	$(BIN)/pip install -q --no-deps --upgrade --target $(VENV)/triton-$* triton==$*
	touch $@

# Every Triton kernel the model launches on CUDA, compiled for sm_90 and sm_80 on this CPU (tools/triton_compile_check.py);
# unchanged kernels come from the committed table in benchmarks/compile_table/.
compile-check: install $(addsuffix /.installed,$(SIDE_TRITONS))
	$(BIN)/python tools/triton_compile_check.py $(addprefix --triton ,$(SIDE_TRITONS)) --json $(VENV)/compile_check.json

# Lint and types (config in pyproject.toml): unused imports/locals, undefined names, import order, line length 120,
# whitespace/blank lines, then the layout (`ruff format --check`), then mypy on reformer_dist, tools and benchmarks.
# `$(BIN)/ruff check --fix` and `$(BIN)/ruff format .` mend most finds.
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

quickstart: install
	$(BIN)/reformer-train --config configs/quickstart.toml

test: install lint compile-check
	$(BIN)/python -m pytest -q --durations=15 tests

# Every test that starts no Python subprocess (no training/CLI/tool run, torchrun, mpiexec or srun): those are
# marked `slow` (see pyproject.toml's markers). `make test` runs them all.
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" --durations=10 tests
