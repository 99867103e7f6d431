# Every target bootstraps .venv from pyproject.toml itself: a fresh clone needs only python3 and make.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test lint bench demo clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# Reinstall only when pyproject.toml changes.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy --strict protocol

test: lint
	$(BIN)/pytest -q --cov=protocol --cov-branch --cov-report=term-missing:skip-covered --cov-fail-under=95

demo: $(STAMP)
	$(BIN)/kmsnet demo --nodes 3

bench: $(STAMP)
	$(BIN)/python bench/protocol_bench.py
	$(BIN)/python bench/e2e_bench.py
	$(BIN)/python bench/revocation_bench.py
	$(BIN)/python bench/cluster_bench.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .coverage
