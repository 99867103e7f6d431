# Every target bootstraps .venv from pyproject.toml itself: a fresh clone needs only python3 and make.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test lint bench demo clean

$(BIN)/python:
	@echo "==> [1/3] creating $(VENV) (first run only)"
	$(PY) -m venv $(VENV)

# Reinstall only when pyproject.toml changes. A first run takes half a minute: say what it is doing,
# one line per step and pip's own lines and progress bars, rather than sit silent.
$(STAMP): pyproject.toml | $(BIN)/python
	@echo "==> [2/3] updating pip"
	$(BIN)/python -m pip install -q --upgrade pip
	@echo "==> [3/3] installing kmsnet and its dependencies into $(VENV) (from pyproject.toml)"
	$(BIN)/python -m pip install --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

# Every package, type-checked strictly (each reaches --strict cleanly; keep it so).
PACKAGES := protocol node relay scenarios kmsnet ca
# The whole tree is in `ruff format` style (Python files; see [tool.ruff.format] in pyproject.toml).
FORMATTED := .

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check $(FORMATTED)
	$(BIN)/mypy --strict $(PACKAGES)

test: lint
	$(BIN)/pytest -q --cov=protocol --cov-branch --cov-report=term-missing:skip-covered --cov-fail-under=95

demo: $(STAMP)
	$(BIN)/kmsnet demo --nodes 3

bench: $(STAMP)
	$(BIN)/python bench/protocol_bench.py
	$(BIN)/python bench/e2e_bench.py
	$(BIN)/python bench/revocation_bench.py
	$(BIN)/python bench/prekey_write_bench.py
	$(BIN)/python bench/cluster_bench.py
	$(BIN)/python bench/flood_bench.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .coverage
