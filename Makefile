# The two set-up-complete entry points (see README):
#   make quickstart   # venv + requirements + native build, then the pipeline on the bundled corpus
#   make test         # venv + requirements + native build, then the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
DEV_INSTALLED := $(VENV)/.dev-installed
BUILT := $(VENV)/.built
# The CPU build of torch; override with your platform's CPU wheel if needed.
TORCH_CPU ?= torch==2.13.0

.PHONY: quickstart test build

quickstart: $(BUILT)
	$(PY) prepare.py --dataset=bundled --vocab_size=4096
	$(PY) train.py config/quickstart.py
	$(PY) sample.py --start="Once upon a time" --num_samples=2 --max_new_tokens=200

test: $(BUILT) $(DEV_INSTALLED)
	$(PY) -m pytest -q tests

build: $(BUILT)

# Without a CUDA GPU, take the CPU build of torch (from local disk here) instead of a multi-GB CUDA one.
$(INSTALLED): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || command -v nvidia-smi >/dev/null || \
		$(PY) -m pip install -q $(TORCH_CPU)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

# Tests and benchmarks also need pytest and the peers they compare against.
$(DEV_INSTALLED): $(INSTALLED) requirements-dev.txt
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

$(BUILT): $(INSTALLED) setup.py $(wildcard csrc/*.cpp csrc/*.h)
	$(PY) -m pip install -q --no-build-isolation -e .
	touch $@
