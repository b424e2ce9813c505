# make demo: venv + install + a sample dataset + a short training run.   make test: the whole test suite (CI).
# make test-fast: everything but the tests marked slow (end-to-end runs, the browser).   make lint: ruff.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SAMPLE_DATA ?= input/sample_voc
# Backbone source, see docs/backbones.md: e.g. DEMO_FLAGS="--source timm --weights dinov2_vits14_pretrain.pth",
# DEMO_FLAGS="--hub-dir ../dinov2 --weights dinov2_vits14_pretrain.pth", or DEMO_FLAGS="--source timm --no-pretrained".
DEMO_FLAGS ?=
# Test processes (pytest-xdist); each test module runs whole in one of them, so module fixtures are built once.
TEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadscope

.PHONY: venv demo test test-fast lint format clean-demo

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: requirements.txt requirements-dev.txt requirements-export.txt requirements-app.txt | $(BIN)/python
	$(BIN)/python -m pip install -r requirements-dev.txt
	# Meta's DINOv2 model code for the offline torch.hub tests; its training-only pins are not needed.
	$(BIN)/python -m pip install --no-deps dinov2==0.0.1.dev2
	touch $@

venv: $(VENV)/.installed

$(SAMPLE_DATA): | venv
	$(BIN)/python make_sample_data.py --out $(SAMPLE_DATA) --train 24 --valid 8

demo: venv $(SAMPLE_DATA)
	$(BIN)/python train.py --data-dir $(SAMPLE_DATA) --epochs 3 --imgsz 224 224 --batch 4 --lr 1e-3 --workers 2 --out-dir demo --exist-ok $(DEMO_FLAGS)

test: venv
	$(PYTEST) tests

test-fast: venv
	$(PYTEST) -m "not slow" tests

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean-demo:
	rm -rf $(SAMPLE_DATA) outputs/demo
