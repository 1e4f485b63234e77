# The commands the README shows. `make demo` bakes examples/fleet-assistant.yaml end to end
# (profile quick; `make demo PROFILE=standard` for the full preset).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PROFILE ?= $(or $(BAKEHOUSE_DEMO_PROFILE),quick)

.PHONY: install chromium demo test test-unit test-integration test-e2e lint format

# Creates the venv once; pip skips what is already installed, so a re-run takes seconds.
$(BIN)/bakehouse: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -e '.[dev]'
	touch $@

install: $(BIN)/bakehouse chromium

# Headless Chromium renders the HTML compliance report (tests/integration/test_report_html.py).
# Installed with apt-get when missing and we are root; otherwise a hint (that test skips locally).
chromium:
	@test -x /usr/bin/chromium || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "install: /usr/bin/chromium missing; installing it with apt-get (about a minute)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "install: /usr/bin/chromium missing; run: sudo apt-get install -y chromium"; fi; }

demo: install
	$(BIN)/bakehouse models pull smollm2-135m-instruct
	BAKEHOUSE_DEMO_PROFILE=$(PROFILE) $(BIN)/python -m cli.demo

test: install
	$(BIN)/pytest -m "not gpu"

test-unit: install
	$(BIN)/pytest -m "not gpu and not integration and not slow and not e2e"

test-integration: install
	$(BIN)/pytest -m integration

test-e2e: install
	$(BIN)/pytest -m e2e

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .
