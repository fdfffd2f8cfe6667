# Two commands: `make train` trains the default model, `make test` runs the suite.
# Each creates .venv from requirements.lock first (Python 3.11, no GPU needed).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= experiments/default.yaml
ARGS ?=
# pytest-xdist worker processes for `make test` (auto: one per core)
WORKERS ?= auto

.PHONY: train test venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps -e .
	touch $@

train: venv
	$(BIN)/k2jax train $(CONFIG) $(ARGS)

test: venv
	$(BIN)/python -m pytest -n $(WORKERS) tests

clean:
	rm -rf $(VENV) runs
