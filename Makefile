# lymphnode — every target sets itself up: a fresh clone needs only `make test` or `make demo`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# CPU build by default (from local disk here); GPU users: make install TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH ?= torch==2.13.0
DEMO := outputs/demo
export WANDB_MODE ?= offline
export NO_ALBUMENTATIONS_UPDATE := 1

.PHONY: help install test test-fast lint demo demo-clean bench

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install $(TORCH)
	$(PY) -m pip install -e '.[dev]'
	@touch $@

install: $(VENV)/.installed  ## create .venv/ with torch (TORCH=... overrides) and lymphnode[dev]

test: install  ## run the whole test suite (what CI runs)
	$(PY) -m pytest -q

test-fast: install  ## the tests without the slow end-to-end ones
	$(PY) -m pytest -q -m "not slow"

lint: install  ## ruff + mypy
	$(VENV)/bin/ruff check lymphnode tests experiments
	$(VENV)/bin/ruff format --check lymphnode tests experiments
	$(VENV)/bin/mypy

demo: install  ## the whole chain on synthetic slides under outputs/demo (reuses what exists)
	$(PY) -m lymphnode.synth out_dir=$(DEMO)/slides profile=demo
	$(PY) -m lymphnode.prepare profile=demo

demo-clean:  ## delete outputs/demo
	rm -rf $(DEMO)

bench: install  ## install the benchmark extras (monai, psutil)
	$(PY) -m pip install -e '.[dev,bench]'
