# Every target builds what it needs itself; nothing is installed by hand.
#   make demo        .venv + examples/quickstart.py
#   make test        .venv + pytest (the CI test command)
#   make test-xla    torch_xla environment + the tests marked `xla`
#   make test-torchless  exported example models run in an environment without torch
#   make bench       .venv + benchmarks/
#   make coverage    regenerate docs/ops.md from the OpInfo sweep
#   make conformance the OpInfo sweep over every float32 sample (hours; BRIDGE_CONFORMANCE=full: every dtype)
#   make models      torchvision, timm and torch.nn models through the bridge (.venv-models; about an hour)
#   make test-models the fast subset of make models (make test runs it too)
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
PIP_QUIET ?= -q
# The torch_xla environment is ~8 GB (torch 2.9 brings its CUDA libraries):
# build it once per machine under ~/.cache, keyed by the constraints' hash,
# and link it as .venv-xla.
XLA_CACHE ?= $(HOME)/.cache/torch-jax-bridge
XLA_KEY = $(shell sha256sum constraints-xla.txt | cut -c1-16)
XLA_VENV = $(XLA_CACHE)/venv-xla-$(XLA_KEY)
PYTEST_ARGS ?=
# pytest-xdist workers for make test (the machines have 2 cores)
TEST_WORKERS ?= 2
# OpInfo samples per entry in make test's float32 sweep (its time budget);
# make conformance BRIDGE_CONFORMANCE=full runs every sample and dtype.
OPINFO_SAMPLES ?= 1

.PHONY: demo test test-xla bench coverage conformance lint clean venv venv-xla

$(VENV)/.installed: constraints.txt pyproject.toml
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(PIP_QUIET) --upgrade "pip==25.3"
	# torch first and pinned: pip takes the CPU wheel on disk, never a CUDA build.
	$(PY) -m pip install $(PIP_QUIET) "torch==2.13.0"
	$(PY) -m pip install $(PIP_QUIET) -c constraints.txt -e ".[test,examples]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) examples/quickstart.py

test: venv venv-models
	# Includes the float32 OpInfo sweep (tests/test_opinfo.py), OPINFO_SAMPLES samples per entry.
	BRIDGE_OPINFO_SAMPLES=$(OPINFO_SAMPLES) $(PY) -m pytest -n $(TEST_WORKERS) $(PYTEST_ARGS)
	# The model-library subset runs where torchvision and timm are installed.
	$(MODELS_TEST)

bench: venv
	$(PY) benchmarks/run.py

coverage: venv
	BRIDGE_OPINFO_SAMPLES=$(OPINFO_SAMPLES) $(PY) tools/coverage.py

conformance: venv
	# Every float32 sample of every entry (hours on 2 cores: run it in the background);
	# writes its totals and failures into docs/ops.md. BRIDGE_CONFORMANCE=full adds every dtype.
	BRIDGE_OPINFO_SAMPLES=all $(PY) tools/coverage.py --conformance -- $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check bridge adapters tests examples benchmarks

venv-xla:
	@if [ ! -f "$(XLA_VENV)/.complete" ]; then \
	  set -e; rm -rf "$(XLA_VENV)"; mkdir -p "$(XLA_CACHE)"; \
	  $(PYTHON) -m venv "$(XLA_VENV)"; \
	  "$(XLA_VENV)/bin/python" -m pip install $(PIP_QUIET) --upgrade "pip==25.3"; \
	  "$(XLA_VENV)/bin/python" -m pip install $(PIP_QUIET) -c constraints-xla.txt \
	    torch torch_xla jax jaxlib torchax numpy ml_dtypes pytest hypothesis expecttest psutil setuptools; \
	  touch "$(XLA_VENV)/.complete"; \
	fi
	ln -sfn "$(XLA_VENV)" .venv-xla
	# Re-point the editable install at this checkout (cheap; the venv is shared).
	.venv-xla/bin/python -m pip install $(PIP_QUIET) --no-deps --no-build-isolation -e .

test-xla: venv-xla
	PJRT_DEVICE=CPU .venv-xla/bin/python -m pytest -m xla -p no:cacheprovider $(PYTEST_ARGS)

# The torch-free environment (jax, numpy, safetensors, optax; no torch): built once per
# machine under ~/.cache, keyed by the constraints' hash, and linked as .venv-torchless.
TORCHLESS_KEY = $(shell sha256sum constraints-torchless.txt | cut -c1-16)
TORCHLESS_VENV = $(XLA_CACHE)/venv-torchless-$(TORCHLESS_KEY)

.PHONY: venv-torchless test-torchless

$(TORCHLESS_VENV)/.complete: constraints-torchless.txt
	rm -rf "$(TORCHLESS_VENV)" && mkdir -p "$(XLA_CACHE)" && $(PYTHON) -m venv "$(TORCHLESS_VENV)"
	"$(TORCHLESS_VENV)/bin/python" -m pip install $(PIP_QUIET) --upgrade "pip==25.3"
	"$(TORCHLESS_VENV)/bin/python" -m pip install $(PIP_QUIET) -c constraints-torchless.txt \
	  jax jaxlib numpy ml_dtypes safetensors flatbuffers optax
	touch "$@"

venv-torchless: $(TORCHLESS_VENV)/.complete
	ln -sfn "$(TORCHLESS_VENV)" .venv-torchless
	# The point of this environment: torch must not be importable there.
	@! .venv-torchless/bin/python -c "import torch" 2>/dev/null || { echo "torch is importable in .venv-torchless"; exit 1; }

test-torchless: venv venv-torchless
	# .venv exports the example models (tools/export_examples.py) with torch's outputs and
	# gradients; .venv-torchless loads and checks them (parity, a gradient, optax steps).
	set -e; dir=$$(mktemp -d); trap 'rm -rf "$$dir"' EXIT; \
	  $(PY) tools/export_examples.py "$$dir"; \
	  .venv-torchless/bin/python tools/check_exports.py "$$dir" --optax

# The model-sweep environment: .venv's pins plus torchvision and timm (constraints-models.txt).
# They stay out of .venv: PyPI's torchvision is a CUDA build whose import breaks transformers
# there. Built once per machine under ~/.cache, keyed by the constraints' and pyproject's hash.
MODELS_KEY = $(shell cat constraints.txt constraints-models.txt pyproject.toml | sha256sum | cut -c1-16)
MODELS_VENV = $(XLA_CACHE)/venv-models-$(MODELS_KEY)
MODELS_PY = .venv-models/bin/python
MODELS_TEST = $(MODELS_PY) -m pytest -n $(TEST_WORKERS) -p no:cacheprovider tests/test_model_zoo.py

.PHONY: venv-models models test-models

$(MODELS_VENV)/.complete: constraints.txt constraints-models.txt pyproject.toml
	rm -rf "$(MODELS_VENV)" && mkdir -p "$(XLA_CACHE)" && $(PYTHON) -m venv "$(MODELS_VENV)"
	"$(MODELS_VENV)/bin/python" -m pip install $(PIP_QUIET) --upgrade "pip==25.3"
	# torch first and pinned: the CPU wheel on disk (torchvision's pin would take a CUDA build).
	"$(MODELS_VENV)/bin/python" -m pip install $(PIP_QUIET) "torch==2.13.0"
	"$(MODELS_VENV)/bin/python" -m pip install $(PIP_QUIET) -c constraints.txt -c constraints-models.txt \
	  -e ".[test]" torchvision timm
	touch "$@"

venv-models: $(MODELS_VENV)/.complete
	ln -sfn "$(MODELS_VENV)" .venv-models
	# Re-point the editable install at this checkout (cheap; the venv is shared).
	$(MODELS_PY) -m pip install $(PIP_QUIET) --no-deps --no-build-isolation -e .

models: venv-models
	# Every case (about an hour on 2 cores); writes docs/models.md. MODELS_ARGS="-k resnet" for some.
	$(MODELS_PY) tools/models.py --jobs $(TEST_WORKERS) $(MODELS_ARGS)

test-models: venv-models
	$(MODELS_TEST) $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .venv-xla .venv-torchless .venv-models build *.egg-info .pytest_cache .hypothesis
