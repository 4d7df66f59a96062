# Two commands on a fresh machine: `make up` (the demo pipeline) and `make test`.
# Each creates .venv and installs what it needs on first use.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
MAX_STEPS ?= 50
CONFIG ?= configs/demo.yaml
BIN := $(VENV)/bin

.PHONY: up test venv clean

$(BIN)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

venv: $(BIN)/.installed

up: venv
	$(BIN)/reliev3r up --config $(CONFIG) --max-steps $(MAX_STEPS) $(ARGS)

test: venv
	$(BIN)/python -m pytest -q -ra $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
