# Shortcuts for developers. The README's two commands are scripts/demo and scripts/test (a fresh
# Debian has no make); these targets call them.
#   make demo   run the main job on the embedded simulator (DEMO_ARGS="--nodes 30")
#   make test   run the whole test suite (lint, types, unit, integration, lab hosts)
#   make test-vms  real VMs (qemu/libvirt/Vagrant, minutes each; see vagrant/README.md)
VENV ?= .venv
PY   := $(VENV)/bin/python
BIN  := $(VENV)/bin

.PHONY: bootstrap demo test test-vms lint bench-loopback clean
bootstrap:
	@./scripts/bootstrap

demo:
	./scripts/demo $(DEMO_ARGS)

lint: bootstrap
	$(BIN)/ruff check
	$(BIN)/mypy

test:
	./scripts/test

# Each module under its own hold of the machine's CPU lock (VMs are exclusive users of the cores).
test-vms:
	./scripts/test-vms

bench-loopback: bootstrap
	$(PY) bench/loopback.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
