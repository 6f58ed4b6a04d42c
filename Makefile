# lymphnode — every target sets itself up: a fresh clone needs only `make test` or `make demo`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch + torchvision (lightly, timm and segmentation-models-pytorch need torchvision; PyPI's
# torchvision does not load beside the local CPU-only torch 2.13.0, so the pair is 2.14.1/0.29.1,
# CUDA builds that also run on CPU). Other builds: make install TORCH="torch==X torchvision==Y --index-url ..."
TORCH ?= torch==2.14.1 torchvision==0.29.1
DEMO := outputs/demo
# Pretext tasks of the demo table (space-separated; each pretrains once, scratch runs once per size
# and fold): the paper's and the best on the real development set; e.g. DEMO_PRETEXTS=reconstruction
DEMO_PRETEXTS ?= reconstruction stain
# Fine-tuning runs of the demo sweep in parallel (joblib processes of one torch thread each, so
# n_jobs x threads = the 2 cores); 1: one after another, with progress bars.
DEMO_JOBS ?= 2
# Folds of the demo sweep (of the 5 the folds are cut into; the paper's table has all 5):
# 3 keeps reconstruction + stain + scratch (36 runs) under 15 min on 2 cores
DEMO_FOLDS ?= 3
comma := ,
empty :=
space := $(empty) $(empty)
export WANDB_MODE ?= offline
export NO_ALBUMENTATIONS_UPDATE := 1

.PHONY: help install test test-fast test-wheel lint demo demo-clean bench real-dev active

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -e '.[dev]'
	@touch $@

install: $(VENV)/.installed  ## create .venv/ with torch (TORCH=... overrides) and lymphnode[dev]

test: install  ## run the whole test suite (what CI runs)
	$(PY) -m pytest -q

test-fast: install  ## the tests without the slow end-to-end ones
	$(PY) -m pytest -q -m "not slow"

test-wheel: install  ## build the wheel, install it into a new venv, run the chain from outside the repo
	$(PY) -m pytest -q tests/test_wheel.py

lint: install  ## ruff + mypy
	$(VENV)/bin/ruff check lymphnode tests experiments
	$(VENV)/bin/ruff format --check lymphnode tests experiments
	$(VENV)/bin/mypy

demo: install  ## the whole chain on synthetic slides under outputs/demo (reuses what exists)
	$(PY) -m lymphnode.synth out_dir=$(DEMO)
	$(PY) -m lymphnode.prepare paths.root=$(DEMO) level=1 patch_size=128 codec=raw \
		counts.unlabeled=100 counts.labeled=40 counts.test=40
	@for p in $(DEMO_PRETEXTS); do \
		$(PY) -m lymphnode.train experiment=pretrain profile=demo pretext=$$p || exit 1; done
	$(if $(filter 1,$(DEMO_JOBS)),,OMP_NUM_THREADS=1) $(PY) -m lymphnode.train --multirun \
		experiment=table profile=demo pretext=$(subst $(space),$(comma),$(strip $(DEMO_PRETEXTS))) \
		'data.fold=range(0,$(DEMO_FOLDS))' \
		$(if $(filter 1,$(DEMO_JOBS)),,hydra/launcher=local hydra.launcher.n_jobs=$(DEMO_JOBS) \
		callbacks.progress_bar.refresh_rate=0)
	$(PY) -m lymphnode.report $(DEMO)/runs --out $(DEMO)/report --paper
	$(PY) -m lymphnode.infer checkpoint=$(DEMO)/runs/pretrained/size200/fold0/seed0/checkpoints/best.ckpt \
		slides=split:$(DEMO)/caches/split.json annotations=$(DEMO)/annotations out_dir=$(DEMO)/wsi
	$(PY) -m lymphnode.evaluate heatmaps=$(DEMO)/wsi annotations=$(DEMO)/annotations out_dir=$(DEMO)/wsi
	$(PY) -m lymphnode.export heatmaps=$(DEMO)/wsi slides=$(DEMO)/slides out_dir=$(DEMO)/wsi
	@echo "results table: $(DEMO)/report/table.md  plot: $(DEMO)/report/f1_vs_labels.png  WSI: $(DEMO)/wsi/"

# Pretexts of `make real-dev` (all five: ~2.5 h on 2 cores, estimated; REAL_DEV_PRETEXTS=reconstruction: ~45 min)
REAL_DEV_PRETEXTS ?= reconstruction masked contrastive dense_contrastive stain
# Fine-tuning arms of `make real-dev` (default: the recipe; e.g. REAL_DEV_VARIANTS="default fixmatch reinhard")
# and leave-one-centre-out arms of the cross-centre check (e.g. REAL_DEV_LOCO=fixmatch; none by default)
REAL_DEV_VARIANTS ?= default
REAL_DEV_LOCO ?=
real-dev: install  ## the real development set (../shared/data/real_dev): both protocols, every pretext + scratch, reports, the cross-centre check
	$(PY) experiments/real_dev/run.py --pretexts $(REAL_DEV_PRETEXTS) --variants $(REAL_DEV_VARIANTS) \
		$(if $(strip $(REAL_DEV_LOCO)),--loco-variants $(REAL_DEV_LOCO))

active: install  ## random vs active labelling on synthetic slides, 5 seeds, 40/80/120 labels (outputs/active)
	$(PY) experiments/active/run.py

demo-clean:  ## delete outputs/demo
	rm -rf $(DEMO)

bench: install  ## install the benchmark extras (monai, psutil)
	$(PY) -m pip install -e '.[dev,bench]'
