# The README's two quick-start commands: `make demo` and `make test`.
# Each creates .venv (if missing) and installs what it needs into it.
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin
LOG_DIR ?= runs/demo

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

.PHONY: demo test benchmark
demo: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[demo]"
	$(BIN)/gradmon demo --log-dir $(LOG_DIR)

test: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[test]"
	$(BIN)/python -m pytest -q

benchmark: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[test]"
	$(BIN)/python benchmarks/overhead.py
