# Quick start: `make serve` serves the bundled model, `make test` runs the whole suite.
# Every target creates .venv when it is missing and installs the project into it (idempotent: the
# install re-runs only when pyproject.toml changed since the last one).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
EXTRAS ?= serve,train,export,dev
# `make serve` needs only these (the service, and mt-export with torch to make the ONNX graphs once).
SERVE_EXTRAS := serve,export
SERVE_STAMP := $(VENV)/.installed-serve
MODEL ?= models/multi30k-de-en
# Several models: make serve MODELS="models/multi30k-de-en models/other" (each exported first if needed).
MODELS ?= $(MODEL)
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install test serve lint format clean system-tools

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	@echo "$(EXTRAS)" > $(STAMP)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# The serving extras only; an up-to-date full install (make install) already has them.
$(SERVE_STAMP): pyproject.toml | $(BIN)/python
	@if [ -f "$(STAMP)" ] && [ "$(STAMP)" -nt pyproject.toml ]; then :; \
	else $(BIN)/python -m pip install --quiet -e ".[$(SERVE_EXTRAS)]"; fi
	@touch $(SERVE_STAMP)

serve: $(SERVE_STAMP)
	@for model in $(MODELS); do \
		if [ ! -f "$$model/model.json" ]; then \
			echo "error: no model at $$model (no model.json)."; \
			echo "Train one with: $(BIN)/mt-train --config training/configs/multi30k_de_en.yaml --set data.dir=PATH/TO/multi30k --set output_dir=$$model"; \
			exit 1; \
		fi; \
		if [ ! -f "$$model/onnx/manifest.json" ]; then $(BIN)/mt-export "$$model" || exit 1; fi; \
	done
	$(BIN)/mt-serve $(foreach model,$(MODELS),--model $(model)) --host $(HOST) --port $(PORT)

# System tools some tests use (Debian/Ubuntu, as root): a compose parser for docker/compose.yaml,
# Chromium for the browser test of the demo page and kubectl (`kubectl kustomize`) for docker/k8s/. Without
# them those tests skip and say why.
system-tools:
	@command -v docker-compose >/dev/null && command -v chromium >/dev/null || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose chromium >/dev/null)
	@command -v kubectl >/dev/null || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq kubernetes-client >/dev/null)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
