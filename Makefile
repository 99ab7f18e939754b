# The set-up-complete entry points (see README):
#   make quickstart   # venv + locked dependencies + native build, then the pipeline on the bundled corpus
#   make test         # venv + locked dependencies + native build, then the test suite (what CI runs)
#   make notebook     # the same, plus JupyterLab, opened on notebooks/walkthrough.ipynb
#   make llama        # llama.cpp's Python binding (built from source: minutes), for the GGUF checks and bench
#   make fuzz         # the native entry points fuzzed under ASan + UBSan (build/fuzz/), FUZZ_SECONDS per harness
# and the one way versions move forward, on purpose:
#   make lock         # resolve requirements*.txt afresh in a scratch venv -> requirements.lock; then make test
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
DEV_INSTALLED := $(VENV)/.dev-installed
BUILT := $(VENV)/.built
NOTEBOOK_INSTALLED := $(VENV)/.notebook-installed
LLAMA_INSTALLED := $(VENV)/.llama-installed
# requirements.txt and requirements-dev.txt name the direct dependencies with ranges; requirements.lock
# pins every package they pull in (transitive ones included) to the versions the tests passed with.
# torch is left out of the lock: it is TORCH_CPU below, or the CUDA build a GPU machine already has.
LOCK := requirements.lock
PIP_LOCKED := $(PY) -m pip install -q -c $(LOCK)
# The CPU build of torch; override with your platform's CPU wheel if needed.
TORCH_CPU ?= torch==2.13.0

.PHONY: quickstart test build lock notebook llama fuzz

quickstart: $(BUILT)
	$(PY) prepare.py --dataset=bundled --vocab_size=4096
	$(PY) train.py config/quickstart.py
	$(PY) sample.py --start="Once upon a time" --num_samples=2 --max_new_tokens=200

test: $(BUILT) $(DEV_INSTALLED)
	$(PY) -m pytest -q tests

build: $(BUILT)

# The walkthrough in JupyterLab, with the project's venv as its kernel (the notebook itself needs only what
# make test installs; JupyterLab and its own dependencies are pinned in notebooks/requirements-notebook.txt).
notebook: $(BUILT) $(DEV_INSTALLED) $(NOTEBOOK_INSTALLED)
	$(VENV)/bin/jupyter lab notebooks/walkthrough.ipynb

# Without a CUDA GPU, take the CPU build of torch (from local disk here) instead of a multi-GB CUDA one.
$(INSTALLED): requirements.txt $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || command -v nvidia-smi >/dev/null || \
		$(PY) -m pip install -q $(TORCH_CPU)
	$(PIP_LOCKED) -r requirements.txt
	touch $@

# Tests and benchmarks also need pytest and the peers they compare against.
$(DEV_INSTALLED): $(INSTALLED) requirements-dev.txt $(LOCK)
	$(PIP_LOCKED) -r requirements-dev.txt
	touch $@

$(NOTEBOOK_INSTALLED): $(DEV_INSTALLED) notebooks/requirements-notebook.txt $(LOCK)
	$(PIP_LOCKED) -r notebooks/requirements-notebook.txt
	touch $@

# llama.cpp through llama-cpp-python (bench/requirements-llama.txt), for tests/test_gguf.py's check that llama.cpp
# runs our GGUF exports as we do, and for bench/llama_cpp_peer.py. pip builds llama.cpp from source, tuned for
# this CPU (GGML_NATIVE): it takes several minutes. Not part of make test, whose GGUF checks skip without it.
llama: $(LLAMA_INSTALLED)

$(LLAMA_INSTALLED): $(INSTALLED) bench/requirements-llama.txt $(LOCK)
	CMAKE_ARGS="-DGGML_NATIVE=ON" $(PIP_LOCKED) -r bench/requirements-llama.txt
	touch $@

$(BUILT): $(INSTALLED) setup.py $(wildcard csrc/*.cpp csrc/*.h)
	$(PIP_LOCKED) --no-build-isolation -e .
	touch $@

# fuzz/run.sh builds the extension again with AddressSanitizer + UndefinedBehaviorSanitizer (and libFuzzer's
# coverage, with clang) into build/fuzz/, leaving the normal build alone, then runs each atheris harness
# fuzz/fuzz_*.py for FUZZ_SECONDS; it fails on any crash, sanitizer report or hang (inputs: fuzz/findings/).
FUZZ_SECONDS ?= 600
fuzz: $(DEV_INSTALLED)
	FUZZ_SECONDS=$(FUZZ_SECONDS) PY=$(PY) fuzz/run.sh

# A fresh resolution of the ranges in requirements*.txt, in a scratch venv, written as exact pins.
# Review the diff of requirements.lock, run `make test` (it reinstalls), and commit both together.
LOCK_VENV := build/lock-venv
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q $(TORCH_CPU)
	$(LOCK_VENV)/bin/python -m pip install -q -r requirements-dev.txt
	{ echo "# Every package that requirements.txt and requirements-dev.txt pull in, at the versions tested"; \
	  echo "# together (torch aside: the Makefile's TORCH_CPU, or your CUDA build). Used as pip constraints"; \
	  echo "# by the Makefile. Regenerate with 'make lock', never by hand."; \
	  $(LOCK_VENV)/bin/python -m pip freeze --exclude-editable \
	    | grep -v -i -E '^(torch|pip|setuptools|wheel|nvidia-[a-z0-9-]+|cuda-[a-z0-9-]+)==' | LC_ALL=C sort -f; \
	} > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
	rm -rf $(LOCK_VENV)
	rm -f $(INSTALLED) $(DEV_INSTALLED) $(BUILT)
	@echo "wrote $(LOCK); now: make test"
