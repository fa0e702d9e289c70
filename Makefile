# medstream: two commands on a fresh Debian machine.
#   make demo   run the main job on the embedded simulator
#   make test   run the whole test suite (lint, types, unit, integration, lab hosts)
VENV ?= .venv
PY   := $(VENV)/bin/python
BIN  := $(VENV)/bin

.PHONY: bootstrap demo test lint unit bench-loopback clean
bootstrap:
	@./scripts/bootstrap

demo: bootstrap
	$(BIN)/xenctl up --sim $(DEMO_ARGS)

lint: bootstrap
	$(BIN)/ruff check transfer xenctl xapisim labnet bench tests
	$(BIN)/mypy

test: bootstrap lint
	$(BIN)/pytest

bench-loopback: bootstrap
	$(PY) bench/loopback.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
