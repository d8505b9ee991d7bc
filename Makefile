# One entry point for a fresh machine: `make test` and `make train` create .venv, install everything
# from the package registry, build the C++ extension and run.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
DEPS   := $(VENV)/.deps-installed
BUILT  := $(VENV)/.ext-built
CSRC   := $(wildcard csrc/*.cpp csrc/*.h)

.PHONY: install build test test-cpp test-triton train bench bench-core bench-trainer clean

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

# The d2l chapter-3 recipe on Fashion-MNIST (flags: make train TRAIN_ARGS="--model mlp ...").
# Where no copy is on disk (data/, $FASHION_MNIST_DIR, Debian's dataset-fashion-mnist), install the
# Debian package first if apt-get may run (root or password-less sudo); otherwise go on: the trainer
# then tries torchvision's download, and its error names the three ways to provide the data.
train: $(BUILT)
	@if [ -z "$$FASHION_MNIST_DIR" ] && [ ! -d data/FashionMNIST/raw ] \
	    && ! dpkg -s dataset-fashion-mnist 2>/dev/null | grep -q '^Status: install ok installed' \
	    && command -v apt-get >/dev/null 2>&1; then \
	  if [ "$$(id -u)" -eq 0 ]; then SUDO=""; \
	  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; \
	  else SUDO=no; fi; \
	  if [ "$$SUDO" = no ]; then \
	    echo "Fashion-MNIST not on disk and apt-get needs root: skipping dataset-fashion-mnist"; \
	  else \
	    echo "Installing Debian's dataset-fashion-mnist (apt-get update first)"; \
	    { $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq \
	        --no-install-recommends dataset-fashion-mnist; } \
	      || echo "apt-get could not install dataset-fashion-mnist; going on without it"; \
	  fi; \
	fi
	$(PY) -m softmax_ext.train $(TRAIN_ARGS)

bench: $(BUILT)
	$(PY) -m benchmarks

bench-core: $(BUILT)
	$(PY) -m benchmarks --suite core

bench-trainer: $(BUILT)
	$(PY) -m benchmarks --trainer

clean:
	rm -rf build *.egg-info softmax_ext/*.so $(VENV)
