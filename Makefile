# Quick start:  `make demo` (the embedded default, end to end)  and  `make test` (the whole suite).
# Both install what they need into the active virtualenv, or create .venv.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
# Pinned so that pip takes the CPU wheel and never pulls a multi-GB CUDA build; override for GPU machines.
TORCH_SPEC ?= torch==2.13.0
FAIRSEQ_SPEC ?= fairseq-fixed==0.12.3.1

ifdef VIRTUAL_ENV
PY := $(VIRTUAL_ENV)/bin/python
else
PY := $(abspath $(VENV))/bin/python
endif
BIN := $(dir $(PY))
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: help venv system-deps install install-test demo test test-fast lint bench clean

help:
	@echo "make demo   synthesize a corpus, learn units, pretrain a unit LM, prompt-tune it, print results"
	@echo "make test   install test extras (fairseq oracle included) and run the whole suite"
	@echo "make lint   ruff"
	@echo "make bench  run benchmarks/*.py (JSON on stdout)"

venv:
	@if [ ! -x "$(PY)" ]; then echo "creating $(VENV)"; $(PYTHON) -m venv $(VENV); fi

system-deps:
	@bash scripts/install_system_deps.sh

install: venv system-deps
	$(PIP) install "$(TORCH_SPEC)"
	$(PIP) install -e .

# fairseq-fixed is only the oracle of the parity tests. It is built without build isolation, after numpy<2,
# cython and wheel, because an isolated build would pull a CUDA torch into its build environment.
install-test: install
	$(PIP) install "$(TORCH_SPEC)" "numpy<2" cython wheel setuptools
	$(PIP) install --no-build-isolation "$(TORCH_SPEC)" "numpy<2" "$(FAIRSEQ_SPEC)"
	$(PIP) install "$(TORCH_SPEC)" "numpy<2" -e ".[dev]"

demo: install
	PATH="$(BIN):$$PATH" bash recipes/synthetic_commands/run.sh

test: install-test
	$(PY) -m ruff check .
	PATH="$(BIN):$$PATH" $(PY) -m pytest -q

# The suite without the slow end-to-end tests, for the edit-test loop.
test-fast:
	PATH="$(BIN):$$PATH" $(PY) -m pytest -q -m "not slow"

lint:
	$(PY) -m ruff check .

bench:
	@for f in benchmarks/*.py; do echo "== $$f"; PATH="$(BIN):$$PATH" $(PY) $$f; done

clean:
	rm -rf exp .pytest_cache .ruff_cache
