# Everyday commands. Each target sets up the virtual environment first if needed.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: run test lint ui docs clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

run: $(VENV)/.installed  ## the default experiment (demo BadNet, built on first use)
	$(PY) run.py

test: $(VENV)/.installed  ## lint, then the whole test suite
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest

ui: $(VENV)/.installed  ## the MLflow UI on the default store, http://127.0.0.1:5000
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlruns/mlflow.db --port 5000

docs: $(VENV)/.installed  ## the documentation site from docs/ into site/ (strict: broken links fail)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

clean:
	rm -rf outputs multirun
