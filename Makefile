# Two commands do all the set-up: `make demo` and `make test`.
# TORCH pins the PyTorch release; on Linux, PyPI's build of it uses a CUDA GPU when
# one is present. For another CUDA or ROCm build, install torch into .venv first
# (see README.md); pip then keeps it.
PYTHON ?= python3.11
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: demo test setup clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/lmlab demo

test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

clean:
	rm -rf $(VENV) runs
