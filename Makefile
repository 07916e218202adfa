# Everyday commands. Each target sets up the virtual environment first if needed.
# The newest of python3.13, python3.12, python3.11 on PATH that runs (a pyenv shim is on
# PATH for every installed version but runs only the selected ones); PYTHON=... picks one.
# After changing it, remove .venv to rebuild it with the new interpreter.
SUPPORTED := python3.13 python3.12 python3.11
ifeq ($(origin PYTHON),undefined)
PYTHON := $(firstword $(foreach p,$(SUPPORTED),$(shell $(p) -c '' >/dev/null 2>&1 && echo $(p))))
endif
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: run test test-fast lint ui docs clean

$(VENV)/.installed: pyproject.toml
	@test -n "$(PYTHON)" || { echo "none of $(SUPPORTED) runs here: install one or set PYTHON=" >&2; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(not (3, 11) <= sys.version_info[:2] < (3, 14))' \
		|| { echo "$(PYTHON) is not Python 3.11, 3.12 or 3.13" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

run: $(VENV)/.installed  ## the default experiment (demo BadNet, built on first use)
	$(PY) run.py

# The tests run on two workers (a whole module at a time, the longest first: LONGEST_FIRST in
# tests/conftest.py), each process (and every run.py it starts) with one TensorFlow thread
# per op: two workers of two threads each contend on 2 cores (2026-12-04: 711 s and 714 s
# of pytest against 702-787 s with TensorFlow's default).
TEST_THREADS := TF_NUM_INTRAOP_THREADS=1 TF_NUM_INTEROP_THREADS=1 OMP_NUM_THREADS=1

test: $(VENV)/.installed  ## lint, then the whole test suite on two workers (one per module)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(TEST_THREADS) $(PY) -m pytest -n 2 --dist loadfile --no-loadscope-reorder

test-fast: $(VENV)/.installed  ## the tests not marked slow, run as `make test` runs them (no lint)
	$(TEST_THREADS) $(PY) -m pytest -m "not slow" -n 2 --dist loadfile --no-loadscope-reorder

ui: $(VENV)/.installed  ## the MLflow UI on the default store, http://127.0.0.1:5000
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlruns/mlflow.db --port 5000

docs: $(VENV)/.installed  ## the documentation site from docs/ into site/ (strict: broken links fail)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

clean:
	rm -rf outputs multirun
