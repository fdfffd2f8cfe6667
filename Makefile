# Two commands: `make train` trains the default model, `make test` runs the suite.
# `make train` (and `make venv`) creates .venv from requirements.lock, the runtime
# dependencies; `make test` adds the test and notebook packages of requirements-test.lock
# (torch, transformers, pytest, Jupyter) on top. Python 3.11, no GPU needed.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= experiments/default.yaml
ARGS ?=
# pytest-xdist worker processes for `make test` (auto: one per core)
WORKERS ?= auto

.PHONY: train test venv clean

venv: $(VENV)/.runtime

$(VENV)/.runtime: requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps -e .
	touch $@

$(VENV)/.test: $(VENV)/.runtime requirements-test.lock
	$(BIN)/pip install -q -r requirements-test.lock
	touch $@

train: $(VENV)/.runtime
	$(BIN)/k2jax train $(CONFIG) $(ARGS)

test: $(VENV)/.test
	$(BIN)/python -m pytest -n $(WORKERS) tests

clean:
	rm -rf $(VENV) runs
