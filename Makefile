# One command per check. `make serve` and `make test` install what they need first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF

.PHONY: install serve test lint typecheck unit integration bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU build of torch; an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	# llama-cpp-python builds from source (about 9 minutes on 2 cores; pip caches the wheel); a native
	# build (the default) crashes at the first completion on this platform's CPUs.
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip install --quiet -e ".[dev,gguf]" || { \
	  echo "WARNING: llama-cpp-python did not build: the llama.cpp backend's tests will be skipped"; \
	  $(BIN)/pip install --quiet -e ".[dev]"; }
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/llmos serve

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -q tests --ignore=tests/integration

integration: $(STAMP)
	$(BIN)/pytest -q tests/integration

test: lint typecheck
	$(BIN)/pytest -q tests

bench: $(STAMP)
	$(BIN)/python benchmarks/serve.py

clean:
	rm -rf $(VENV) .cache .mypy_cache .ruff_cache .pytest_cache
