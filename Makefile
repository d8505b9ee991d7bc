# One entry point for a fresh machine: `make test` and `make train` create .venv, install everything
# from the package registry, build the C++ extension and run.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
DEPS   := $(VENV)/.deps-installed
BUILT  := $(VENV)/.ext-built
CSRC   := $(wildcard csrc/*.cpp csrc/*.h)

.PHONY: install build test test-cpp test-triton train bench clean

install: $(BUILT)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(DEPS): requirements.txt | $(PY)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements.txt
	touch $@

$(BUILT): $(DEPS) $(CSRC) setup.py pyproject.toml softmax_ext/_build_flags.py
	$(PY) -m pip install --no-build-isolation --no-deps -e .
	touch $@

build: $(BUILT)

# C++ backend, public API, trainer and everything else; then the same parity tests for the Triton
# kernels through Triton's CPU interpreter (TRITON_INTERPRET must be set before triton is imported,
# hence a separate process).
test: test-cpp test-triton

test-cpp: $(BUILT)
	$(PY) -m pytest -q tests

test-triton: $(BUILT)
	TRITON_INTERPRET=1 SOFTMAX_EXT_TEST_BACKENDS=triton $(PY) -m pytest -q -m "parity or triton" tests

train: $(BUILT)
	@echo "The Fashion-MNIST trainer is not there yet (issue: the main job)."; exit 1

bench: $(BUILT)
	$(PY) -m benchmarks

clean:
	rm -rf build *.egg-info softmax_ext/*.so $(VENV)
