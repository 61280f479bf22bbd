# The README's two quick-start commands: `make demo` and `make test`.
# Each creates .venv (if missing) and installs what it needs into it.
#
# TensorFlow: an environment that already has one (tensorflow, tensorflow-cpu, a GPU
# build) keeps it; otherwise the extra TF names is installed: cpu (the default:
# tensorflow-cpu), and-cuda (Linux with an NVIDIA GPU) or tensorflow.
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
LOG_DIR ?= runs/demo
TF ?= cpu
HAS_TF = $(BIN)/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('tensorflow') is None)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# $(call install,EXTRAS): the package in editable mode with EXTRAS, and TensorFlow when missing.
define install
	@if $(HAS_TF); then extras="$(1)"; else extras="$(TF),$(1)"; fi; \
	echo "pip install -e .[$$extras]"; \
	$(BIN)/python -m pip install --quiet -e ".[$$extras]"
endef

.PHONY: demo test install benchmark docs
demo: $(BIN)/python
	$(call install,demo)
	$(BIN)/gradmon demo --log-dir $(LOG_DIR)

install: $(BIN)/python
	$(call install,test)

test: install
	$(BIN)/python -m pytest -q

benchmark: install
	$(BIN)/python benchmarks/overhead.py

# The documentation site (mkdocs.yml) into build/site. The API reference is read from the
# source, not imported, so this installs no TensorFlow; --strict fails on a broken link,
# anchor or reference.
docs: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[docs]"
	$(BIN)/python -m mkdocs build --strict
