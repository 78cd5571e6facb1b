# misfeat: the two commands of the README.
#   make demo   builds the environment if missing, then runs the end-to-end demo on the organism
#   make test   builds the environment if missing, then runs the whole test suite (CI calls this)
#   make test-fast   the import-layer contract and the tests not marked slow, no notebooks
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.misfeat-installed
OUT ?= demo-out
PYTEST_ARGS ?=

.PHONY: env demo test test-fast layers lint clean-env browser

env: $(STAMP)

# torch is installed first and pinned, so that pip never resolves a multi-GB CUDA build.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet torch==2.13.0 -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/misfeat demo --out $(OUT)

# Debian's Chromium, for the test that opens the demo report in a headless browser
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  { apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && \
	    apt-get install -y -q chromium >/dev/null 2>&1; }; }; } || \
	  echo "note: no Chromium; the browser rendering test will be skipped"

test: $(STAMP) browser layers
	HF_HUB_OFFLINE=1 $(PY) -m pytest --nbmake tests notebooks $(PYTEST_ARGS)

test-fast: $(STAMP) layers
	HF_HUB_OFFLINE=1 $(PY) -m pytest -m "not slow" tests $(PYTEST_ARGS)

# the import-layer contract of pyproject.toml ([tool.importlinter]): layers only point down
layers: $(STAMP)
	$(VENV)/bin/lint-imports --no-cache

lint: $(STAMP)
	$(VENV)/bin/ruff check misfeat tests scripts

clean-env:
	rm -rf $(VENV)
