# make demo: venv + what the scripts need + a sample dataset and clip + a short training run.
# make test: the test tools too, then the whole suite (CI).   make test-fast: everything but the tests
# marked slow (end-to-end runs, the browser).   make lint: ruff.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SAMPLE_DATA ?= input/sample_voc
SAMPLE_CLIP ?= input/sample_clip.mp4
# PyPI's torch is the CUDA build (6.7 GB of venv); on a machine without an NVIDIA GPU:
#   make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu    (PyTorch's CPU-only wheels)
TORCH_INDEX ?=
# Backbone source, see docs/backbones.md: e.g. DEMO_FLAGS="--source timm --weights dinov2_vits14_pretrain.pth",
# DEMO_FLAGS="--hub-dir ../dinov2 --weights dinov2_vits14_pretrain.pth", or DEMO_FLAGS="--source timm --no-pretrained".
DEMO_FLAGS ?=
# Test processes (pytest-xdist); each test module runs whole in one of them, so module fixtures are built once.
TEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadscope

.PHONY: venv demo test test-fast lint format clean-demo

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# What the scripts, the demo's web page and ONNX export need (no test or notebook tools).
$(VENV)/.runtime: requirements.txt requirements-export.txt requirements-app.txt | $(BIN)/python
	$(if $(TORCH_INDEX),$(BIN)/python -m pip install torch torchvision --index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -r requirements.txt -r requirements-export.txt -r requirements-app.txt
	touch $@

# ... and the tests' (pytest, the browser driver, ruff, the notebook runner).
$(VENV)/.installed: $(VENV)/.runtime requirements-dev.txt
	$(BIN)/python -m pip install -r requirements-dev.txt
	# Meta's DINOv2 model code for the offline torch.hub tests; its training-only pins are not needed.
	$(BIN)/python -m pip install --no-deps dinov2==0.0.1.dev2
	touch $@

venv: $(VENV)/.installed

$(SAMPLE_DATA): | $(VENV)/.runtime
	$(BIN)/python make_sample_data.py --out $(SAMPLE_DATA) --train 24 --valid 8 --video $(SAMPLE_CLIP)

demo: $(VENV)/.runtime $(SAMPLE_DATA)
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
	rm -rf $(SAMPLE_DATA) $(SAMPLE_CLIP) outputs/demo outputs/demo_*
