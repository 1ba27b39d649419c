# tooti: the two commands. `make run` starts a gateway with an in-process node on the
# embedded llama.cpp backend; `make test` runs the whole test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The gateway's address: `make run LISTEN=HOST:PORT`, or TOOTI_LISTEN from the environment.
LISTEN ?= $(or $(TOOTI_LISTEN),127.0.0.1:8080)
PLUGINS := $(wildcard plugins/*/pyproject.toml)

.PHONY: run test lint bench clean postgres

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed-run: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[local]'
	touch $@

$(VENV)/.installed-test: pyproject.toml $(PLUGINS) | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[local,test]' $(foreach p,$(PLUGINS),-e $(dir $(p)))
	touch $@

run: $(VENV)/.installed-run
	$(BIN)/tooti run --listen $(LISTEN)

postgres:
	bash scripts/install-postgres.sh

test: $(VENV)/.installed-test postgres
	$(BIN)/python -m pytest -q
	$(BIN)/ruff check tooti tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports

lint: $(VENV)/.installed-test
	$(BIN)/ruff check tooti tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports

bench: $(VENV)/.installed-test
	$(BIN)/python bench/overhead.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
