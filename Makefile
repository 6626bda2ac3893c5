# One command per check. `make serve` and `make test` install what they need first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Written when llama-cpp-python fails to build; tests/install_check.py then fails `make test` loudly.
LLAMA_MISSING := $(VENV)/llama-cpp-missing
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF

.PHONY: install serve test lint typecheck unit integration bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU build of torch; an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	# llama-cpp-python builds from source (about 9 minutes on 2 cores; pip caches the wheel); a native
	# build (the default) crashes at the first completion on this platform's CPUs.
	rm -f $(LLAMA_MISSING)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip install --quiet -e ".[dev,gguf,export]" || { \
	  echo "llama-cpp-python did not build on $$(date -u +%FT%TZ) (pip's output is above it in the install log)" > $(LLAMA_MISSING); \
	  echo "WARNING: llama-cpp-python did not build: the llama.cpp backend is missing and make test will fail until it builds"; \
	  $(BIN)/pip install --quiet -e ".[dev,export]"; }
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/llmos serve

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy

# The fast default leaves out tests marked slow; `make unit UNIT_MARKERS=` runs them all.
UNIT_MARKERS ?= not slow
unit: $(STAMP)
	$(BIN)/pytest -q tests --ignore=tests/integration -m "$(UNIT_MARKERS)"

integration: $(STAMP)
	$(BIN)/pytest -q tests/integration

# The slowest tests are listed at the end, so a run that nears CI's time limit says where the time went.
test: lint typecheck
	$(BIN)/pytest -q tests --durations=40

bench: $(STAMP)
	$(BIN)/python benchmarks/serve.py

clean:
	rm -rf $(VENV) .cache .mypy_cache .ruff_cache .pytest_cache
