# One entry point for a fresh machine: `make test` and `make train` create .venv, install the exact
# versions of requirements.lock from the package registry, build the C++ extension and run.
# `make test-compat` does the same in build/compat/ against requirements-compat.lock (the oldest
# supported torch and triton); `make lock` rewrites both locks from pyproject.toml.
PYTHON ?= python3
VENV   ?= .venv
LOCK   ?= requirements.lock
PY     := $(VENV)/bin/python
DEPS   := $(VENV)/.deps-installed
BUILT  := $(VENV)/.ext-built
CSRC   := $(wildcard csrc/*.cpp csrc/*.h)
COMPAT_DIR    := build/compat
COMPAT_PYTHON := 3.12

.PHONY: install build test test-cpp test-isa test-triton test-compat compile-gpu lint format lock train \
	bench bench-core bench-trainer clean

install: $(BUILT)

$(PY):
	$(PYTHON) -m venv $(VENV)

# pip first, at the lock's version, then everything else at the lock's versions.
$(DEPS): $(LOCK) | $(PY)
	$(PY) -m pip install --quiet "$$(grep '^pip==' $(LOCK))"
	$(PY) -m pip install -r $(LOCK)
	touch $@

$(BUILT): $(DEPS) $(CSRC) setup.py pyproject.toml softmax_ext/_build_flags.py
	$(PY) -m pip install --no-build-isolation --no-deps -e .
	touch $@

build: $(BUILT)

# C++ backend, public API, trainer and everything else; then the same parity tests for the Triton
# kernels through Triton's CPU interpreter (TRITON_INTERPRET must be set before triton is imported,
# hence a separate process).
test: lint compile-gpu test-cpp test-triton test-isa

test-cpp: $(BUILT)
	$(PY) -m pytest -q tests

# The whole suite again with each narrower CPU kernel set forced (a machine runs only its widest by
# itself); on a CPU that lacks one, the kernels warn and fall back to the widest they can run.
test-isa: $(BUILT)
	for isa in avx2 baseline; do SOFTMAX_EXT_CPU_ISA=$$isa $(PY) -m pytest -q tests || exit 1; done

test-triton: $(BUILT)
	TRITON_INTERPRET=1 SOFTMAX_EXT_TEST_BACKENDS=triton $(PY) -m pytest -q -m "parity or triton" tests

# Every @triton.jit kernel compiled for sm_80 and sm_90 (no GPU needed) with the configurations its
# launchers choose: fails on a compile error or a register spill, prints the resource table.
compile-gpu: $(DEPS)
	$(PY) tools/compile_gpu.py

# The oldest supported set (requirements-compat.lock, Python $(COMPAT_PYTHON) where installed): a copy
# of this tree in $(COMPAT_DIR) with its own .venv, so the two builds of the extension never
# overwrite each other; then the same test targets there. The copy is refreshed each time (files
# gone from here go there too) but keeps its .venv, build/ and built extension: tar keeps the
# sources' times, so make rebuilds only what changed.
test-compat:
	mkdir -p $(COMPAT_DIR)
	find $(COMPAT_DIR) -mindepth 1 \( -path $(COMPAT_DIR)/.venv -o -path $(COMPAT_DIR)/build \) \
	  -prune -o -type f ! -name '*.so' -print0 | xargs -0 rm -f
	git ls-files -z --cached --others --exclude-standard | grep -zv '^$(COMPAT_DIR)/' \
	  | tar --null -T - -cf - | tar -xf - -C $(COMPAT_DIR)
	$(MAKE) -C $(COMPAT_DIR) test-cpp test-triton compile-gpu LOCK=requirements-compat.lock \
	  PYTHON="$$($(PYTHON) tools/find_python.py $(COMPAT_PYTHON))"

# ruff (lint and format) for Python, clang-format for csrc/; `make format` applies both.
lint: $(DEPS)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/clang-format --dry-run --Werror csrc/*.cpp csrc/*.h

format: $(DEPS)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .
	$(VENV)/bin/clang-format -i csrc/*.cpp csrc/*.h

# Rewrite requirements.lock and requirements-compat.lock from pyproject.toml (resolves in scratch
# virtual environments; the compat one downloads the oldest supported torch).
lock:
	$(PYTHON) tools/lock.py default
	$(PYTHON) tools/lock.py compat

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
	rm -rf build *.egg-info softmax_ext/*.so $(VENV) $(COMPAT_DIR)
