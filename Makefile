# Quickstart:  make bench   (installs, builds, runs the benchmark)
#              make test    (installs, builds, runs the tests)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
JOBS ?= 2
PYTEST_ARGS ?=

.PHONY: install build test bench bench-full bench-regress gpu-check clean

$(VENV)/.installed: requirements-ci.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements-ci.txt
	touch $@

install: $(VENV)/.installed build

# The extension builds against the pinned torch in the venv (no build isolation, no downloads);
# an editable install, so only a change to the C++/CUDA sources or setup.py rebuilds it.
build: $(VENV)/.built

$(VENV)/.built: $(VENV)/.installed setup.py $(shell find csrc -type f)
	MAX_JOBS=$(JOBS) $(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: install
	$(PY) -m benchmarks.bench_mit_loss --quick

bench-full: install
	$(PY) -m benchmarks.bench_mit_loss --full

bench-regress: install
	$(PY) -m pytest benchmarks/ --benchmark-only

# On a GPU machine with no network: uses the python, torch and triton already installed there.
gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf build *.egg-info mitkernels/_C*.so
