PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: run test lint unit bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $@

run: $(STAMP)
	exec $(BIN)/hookwire dev

lint: $(STAMP)
	$(BIN)/ruff check services tests bench
	$(BIN)/ruff format --check services tests bench
	$(BIN)/mypy services

test: lint
	$(BIN)/pytest

unit: $(STAMP)
	$(BIN)/pytest tests/unit

# One after another, never together: each measures against a ceiling on the same machine.
bench: $(STAMP)
	$(BIN)/python -m bench.introspect
	$(BIN)/python -m bench.api_auth_check
	$(BIN)/python -m bench.changes
	$(BIN)/python -m bench.publish
	$(BIN)/python -m bench.dispatch

clean:
	rm -rf $(VENV) .hookwire .mypy_cache .pytest_cache .ruff_cache
