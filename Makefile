# The commands the README shows. `make demo` runs a package-and-verify bake end to end.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install demo test test-unit test-integration lint format

# Creates the venv once; pip skips what is already installed, so a re-run takes seconds.
$(BIN)/bakehouse: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -e '.[dev]'
	touch $@

install: $(BIN)/bakehouse

demo: install
	$(BIN)/bakehouse models pull smollm2-135m-instruct
	$(BIN)/python -m cli.demo

test: install
	$(BIN)/pytest -m "not gpu"

test-unit: install
	$(BIN)/pytest -m "not gpu and not integration and not slow and not e2e"

test-integration: install
	$(BIN)/pytest -m integration

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .
