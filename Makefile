# The README's two quick-start commands: `make demo` and `make test` (`make demo BACKEND=jax`
# or `torch`: the demo without TensorFlow).
# Each creates .venv (if missing) and installs what it needs into it.
#
# TensorFlow: an environment that already has one (tensorflow, tensorflow-cpu, a GPU
# build) keeps it; otherwise the extra TF names is installed: cpu (the default:
# tensorflow-cpu), and-cuda (Linux with an NVIDIA GPU) or tensorflow.
#
# `make test` runs the suite on every Keras backend, one environment each, made on demand:
#   tensorflow  .venv        the package with [test] (and TensorFlow, as above)
#   jax         .venv-jax    keras 3.15, jax/jaxlib (CPU) and the package with [jax,test]
#   torch       .venv-torch  keras 3.15, torch (CPU build) and the package with [torch,test]
# The JAX and PyTorch environments hold no TensorFlow (checked after each install); there
# the suite skips the test modules marked TensorFlow-only (tests/conftest.py).
# `make test BACKEND=jax` (or torch, tensorflow) runs one backend's suite.
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
LOG_DIR ?= runs/demo
TF ?= cpu
HAS_TF = $(BIN)/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('tensorflow') is None)"

BACKEND ?= all
VENV_JAX ?= .venv-jax
VENV_TORCH ?= .venv-torch
KERAS_PIN ?= keras==3.15.*
# This exact version: a bare `torch` from the index is the multi-GB CUDA build; the CPU
# wheel of 2.13.0 is what pip finds on the machines this project runs on.
TORCH_PIN ?= torch==2.13.0
# No TensorFlow in the JAX and PyTorch environments: their suites check gradmon without it.
NO_TF = python -c "import importlib.util, sys; sys.exit('TensorFlow was installed into a TensorFlow-free environment' if importlib.util.find_spec('tensorflow') else 0)"
# Each suite's cross-backend checks run the other backends' interpreters (tests/test_hessian_backends.py;
# they skip a missing one).
OTHER_PYTHONS = GRADMON_TENSORFLOW_PYTHON=$(abspath $(BIN))/python GRADMON_JAX_PYTHON=$(abspath $(VENV_JAX))/bin/python \
	GRADMON_TORCH_PYTHON=$(abspath $(VENV_TORCH))/bin/python

# With all three suites, the TensorFlow one does not re-run whole modules under JAX / PyTorch
# (tests/helpers.py start_module_on_backends): their own suites run them next.
EVERY_BACKEND = $(if $(filter all,$(BACKEND)),GRADMON_EVERY_BACKEND=1)

ifeq ($(BACKEND),all)
TEST_BACKENDS = tensorflow jax torch
else ifneq ($(filter $(BACKEND),tensorflow jax torch),)
TEST_BACKENDS = $(BACKEND)
else
$(error Invalid value for argument `BACKEND`. Expected one of tensorflow, jax, torch or all. Received: BACKEND=$(BACKEND))
endif

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV_JAX)/bin/python:
	$(PYTHON) -m venv $(VENV_JAX)
	$(VENV_JAX)/bin/python -m pip install --quiet --upgrade pip

$(VENV_TORCH)/bin/python:
	$(PYTHON) -m venv $(VENV_TORCH)
	$(VENV_TORCH)/bin/python -m pip install --quiet --upgrade pip

# $(call install,EXTRAS): the package in editable mode with EXTRAS, and TensorFlow when missing.
define install
	@if $(HAS_TF); then extras="$(1)"; else extras="$(TF),$(1)"; fi; \
	echo "pip install -e .[$$extras]"; \
	$(BIN)/python -m pip install --quiet -e ".[$$extras]"
endef

.PHONY: demo demo-tensorflow demo-jax demo-torch test install install-jax install-torch test-tensorflow test-jax test-torch benchmark docs
# `make demo` runs on TensorFlow in .venv; `make demo BACKEND=jax` (or torch) runs it in that
# backend's TensorFlow-free environment (.venv-jax / .venv-torch, made on demand).
demo: demo-$(if $(filter jax torch,$(BACKEND)),$(BACKEND),tensorflow)

demo-tensorflow: $(BIN)/python
	$(call install,demo)
	$(BIN)/gradmon demo --log-dir $(LOG_DIR)

demo-jax: $(VENV_JAX)/bin/python
	$(VENV_JAX)/bin/python -m pip install --quiet "$(KERAS_PIN)" jax jaxlib -e ".[jax,demo]"
	$(VENV_JAX)/bin/$(NO_TF)
	KERAS_BACKEND=jax $(VENV_JAX)/bin/gradmon demo --log-dir $(LOG_DIR)

demo-torch: $(VENV_TORCH)/bin/python
	$(VENV_TORCH)/bin/python -m pip install --quiet "$(KERAS_PIN)" "$(TORCH_PIN)" -e ".[torch,demo]"
	$(VENV_TORCH)/bin/$(NO_TF)
	KERAS_BACKEND=torch $(VENV_TORCH)/bin/gradmon demo --log-dir $(LOG_DIR)

install: $(BIN)/python
	$(call install,test)

install-jax: $(VENV_JAX)/bin/python
	$(VENV_JAX)/bin/python -m pip install --quiet "$(KERAS_PIN)" jax jaxlib -e ".[jax,test]"
	$(VENV_JAX)/bin/$(NO_TF)

install-torch: $(VENV_TORCH)/bin/python
	$(VENV_TORCH)/bin/python -m pip install --quiet "$(KERAS_PIN)" "$(TORCH_PIN)" -e ".[torch,test]"
	$(VENV_TORCH)/bin/$(NO_TF)

test: $(addprefix test-,$(TEST_BACKENDS))

# With BACKEND=all the other two environments are installed first, so the TensorFlow
# suite's cross-backend checks run in them (alone, those checks skip when they are missing).
test-tensorflow: install $(if $(filter all,$(BACKEND)),install-jax install-torch)
	KERAS_BACKEND=tensorflow $(OTHER_PYTHONS) $(EVERY_BACKEND) $(BIN)/python -m pytest -q

test-jax: install-jax
	KERAS_BACKEND=jax $(OTHER_PYTHONS) $(VENV_JAX)/bin/python -m pytest -q

test-torch: install-torch
	KERAS_BACKEND=torch $(OTHER_PYTHONS) $(VENV_TORCH)/bin/python -m pytest -q

benchmark: install
	$(BIN)/python benchmarks/overhead.py

# The documentation site (mkdocs.yml) into build/site. The API reference is read from the
# source, not imported, so this installs no TensorFlow; --strict fails on a broken link,
# anchor or reference.
docs: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[docs]"
	$(BIN)/python -m mkdocs build --strict
