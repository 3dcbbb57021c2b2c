# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)
PIP := $(BIN)/python -m pip install -q -c constraints.txt

.PHONY: demo test check lint typecheck unit fast install clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(PIP) torch==2.13.0
	$(PIP) --config-settings editable_mode=strict -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

# The strict editable install is a link tree: refresh it so new modules are seen.
install: $(STAMP)
	flock $(VENV)/.lock $(PIP) --no-deps --no-build-isolation --config-settings editable_mode=strict -e .

demo: install
	rm -rf runs/demo
	$(BIN)/layerfed simulate --out runs/demo

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache  # a stale cache after moved modules reported false breaks; uncached takes < 1 s

typecheck: install
	$(BIN)/mypy --strict -p layerfed

unit: install
	$(BIN)/pytest

# Everything: lint, import contracts, types, every test (slow ones too). CI runs this.
test: lint typecheck unit

# Quick loop while editing: the tests not marked slow (tests/conftest.py: fewer Hypothesis
# examples where a property does not fix its own count, a few long tests left to `make test`).
fast: install
	LAYERFED_FAST=1 $(BIN)/pytest -q -m "not slow" -p no:randomly

# Before each commit (<= 3 min on 2 cores): lint, import contracts, types and the fast
# tests, the three side by side (make -j3); `make test` runs everything.
check:
	$(MAKE) --no-print-directory -j3 --output-sync=target lint typecheck fast

clean:
	rm -rf $(VENV) build *.egg-info
