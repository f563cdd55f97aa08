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

.PHONY: install quickstart test test-fast
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

quickstart: install
	$(BIN)/reformer-train --config configs/quickstart.toml

test: install
	$(BIN)/python -m pytest -q tests

test-fast: install
	$(BIN)/python -m pytest -q tests/unit
