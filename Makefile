# Developer and operator entry points. `make test` sets up everything it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PKG := services/ingester

.PHONY: help deps venv test lint format bench clean

help:
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(STAMP): $(PKG)/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '$(PKG)[dev]'
	touch $(STAMP)

venv: $(STAMP) ## Create the virtualenv with the ingester and dev tools

deps: venv ## Install the Debian packages the tests run (when missing)
	./scripts/install-deps.sh

test: deps ## Run the whole test suite against real local services
	$(BIN)/pytest $(PYTEST_ARGS)

lint: venv ## ruff (lint and format check) and mypy (strict on src)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: venv ## Apply ruff's fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: deps ## Benchmarks: throughput and memory of the ingester
	$(BIN)/python -m bench

clean: ## Remove the virtualenv and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
