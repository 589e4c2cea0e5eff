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

# The parity tests' oracle: fairseq in its own virtualenv, with numpy<2 (fairseq still uses numpy-1 aliases), while
# the toolkit is tested under numpy 2, as its users run it. tests/oracle.py runs the scripts of tests/oracles/fairseq/
# with this interpreter, or with $SPEECHPROMPT_FAIRSEQ_PYTHON when that is set (then nothing is built here).
ORACLE_VENV ?= .venv-fairseq
ORACLE_PY := $(abspath $(ORACLE_VENV))/bin/python
ORACLE_PIP := $(ORACLE_PY) -m pip --disable-pip-version-check -q
ORACLE_REQS := tests/oracles/fairseq/requirements.txt
# Built once per torch and fairseq pin (and again when $(ORACLE_REQS) changes).
ORACLE_STAMP := $(ORACLE_VENV)/.speechprompt-oracle-$(shell printf '%s' '$(TORCH_SPEC) $(FAIRSEQ_SPEC)' | cksum | cut -d' ' -f1)
ifdef SPEECHPROMPT_FAIRSEQ_PYTHON
ORACLE_FOR_TESTS :=
else
ORACLE_FOR_TESTS := oracle-env
endif

# The suite runs on every core (pytest-xdist), at most 4 workers: each test is single-threaded, and some start
# their own subprocesses. PYTEST_JOBS= runs it in one process.
PYTEST_JOBS ?= -n auto --maxprocesses=4

# install-test is done once per environment, checkout and torch pin (and again when pyproject.toml changes).
TEST_STAMP := $(abspath $(BIN)..)/.speechprompt-test-$(shell printf '%s' '$(CURDIR) $(TORCH_SPEC)' | cksum | cut -d' ' -f1)

.PHONY: help venv system-deps install install-test oracle-env demo test test-fast lint bench clean

help:
	@echo "make demo        synthesize a corpus, learn units, pretrain a unit LM, prompt-tune it, print results"
	@echo "make test        install the test extras, build the fairseq oracle (.venv-fairseq) if missing, run ruff"
	@echo "                 and the whole suite"
	@echo "make test-fast   the suite without the slow end-to-end tests"
	@echo "make oracle-env  build .venv-fairseq, the fairseq oracle of the parity tests"
	@echo "make lint        ruff"
	@echo "make bench       run benchmarks/*.py (JSON on stdout)"

venv:
	@if [ ! -x "$(PY)" ]; then echo "creating $(VENV)"; $(PYTHON) -m venv $(VENV); fi

system-deps:
	@bash scripts/install_system_deps.sh

install: venv system-deps
	$(PIP) install "$(TORCH_SPEC)"
	$(PIP) install -e ".[phones]"

# The toolkit's test environment: numpy 2 (whatever pip resolves with the pinned torch) and never fairseq. An
# environment that an older `make test` filled with fairseq-fixed and numpy<2 is put right once.
install-test: $(TEST_STAMP)

$(TEST_STAMP): pyproject.toml | venv system-deps
	@if $(PY) -m pip show -q fairseq-fixed >/dev/null 2>&1; then \
	    echo "removing fairseq-fixed from $(PY): the parity tests run fairseq in $(ORACLE_VENV) (make oracle-env)"; \
	    $(PIP) uninstall -y fairseq-fixed; fi
	$(PIP) install "$(TORCH_SPEC)"
	$(PIP) install "$(TORCH_SPEC)" "numpy>=2" -e ".[dev]"
	@touch $@

# fairseq-fixed is built last, without build isolation, after torch, numpy<2, cython and wheel, because an isolated
# build would pull a CUDA torch into its build environment; and without its dependencies, which would add torchaudio
# ($(ORACLE_REQS) has the rest, installed first).
oracle-env: $(ORACLE_STAMP)

$(ORACLE_STAMP): $(ORACLE_REQS)
	@bash scripts/install_system_deps.sh --build-tools --python "$(PYTHON)"
	@if [ ! -x "$(ORACLE_PY)" ]; then echo "creating $(ORACLE_VENV)"; $(PYTHON) -m venv $(ORACLE_VENV); fi
	$(ORACLE_PIP) install "$(TORCH_SPEC)" "numpy<2" cython wheel setuptools
	$(ORACLE_PIP) install "$(TORCH_SPEC)" "numpy<2" -r $(ORACLE_REQS)
	$(ORACLE_PIP) install --no-build-isolation --no-deps "$(FAIRSEQ_SPEC)"
	cd / && $(ORACLE_PY) -c "import fairseq.models.hubert, fairseq.models.transformer_lm, sklearn, soundfile, numpy; \
	    print('fairseq oracle ready: fairseq', fairseq.__version__, 'numpy', numpy.__version__)"
	@touch $@

demo: install
	PATH="$(BIN):$$PATH" bash recipes/synthetic_commands/run.sh

test: install-test $(ORACLE_FOR_TESTS)
	$(PY) -m ruff check .
	PATH="$(BIN):$$PATH" $(PY) -m pytest -q $(PYTEST_JOBS)

# The suite without the slow end-to-end tests, for the edit-test loop.
test-fast: install-test $(ORACLE_FOR_TESTS)
	PATH="$(BIN):$$PATH" $(PY) -m pytest -q -m "not slow" $(PYTEST_JOBS)

lint:
	$(PY) -m ruff check .

bench:
	@for f in benchmarks/*.py; do echo "== $$f"; PATH="$(BIN):$$PATH" $(PY) $$f; done

clean:
	rm -rf exp .pytest_cache .ruff_cache
