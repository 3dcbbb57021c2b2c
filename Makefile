# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)
# The strict editable install links each module and data file: it needs refreshing only when
# the set of files changes (a module added, moved or removed), not when one is edited.
SOURCES := $(shell find . \( -path ./.venv -o -path ./build -o -path ./.git -o -path ./runs \) -prune \
  -o -type f \( -name '*.py' -o -path './examples/*' -o -path './serve/templates/*' -o -path './serve/static/*' \) \
  -print 2>/dev/null | LC_ALL=C sort | cksum | cut -d' ' -f1)
LINKS := $(VENV)/.links-$(SOURCES)-$(notdir $(STAMP))
PIP := $(BIN)/python -m pip install -q -c constraints.txt
# setuptools' notice that a strict editable install uses build/ (expected; not a problem).
export PYTHONWARNINGS := ignore:Editable installation

.PHONY: demo test check lint typecheck unit fast install clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(PIP) torch==2.13.0
	$(PIP) --config-settings editable_mode=strict -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

# The strict editable install is a link tree: refresh it so new modules are seen
# (only when the set of files changed, or setup.py or a C source of the optional kernel;
# `make install` with nothing new does nothing).
install: $(LINKS)

$(LINKS): $(STAMP) $(wildcard setup.py) $(wildcard layers/*.c)
	flock $(VENV)/.lock $(PIP) --no-deps --no-build-isolation --config-settings editable_mode=strict -e .
	rm -f $(VENV)/.links-*
	touch $(LINKS)

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
