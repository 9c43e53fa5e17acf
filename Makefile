# `make test` and `make demo` set themselves up on a fresh machine (a virtual environment in .venv)
# and then run. Installs are redone only when pyproject.toml or the constraints change.
PYTHON ?= python3
VENV ?= .venv
CONSTRAINTS ?= constraints/cpu-torch.txt
PIP_CONSTRAINT_FLAG = $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)
PY = $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: test demo clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.test-installed: pyproject.toml $(CONSTRAINTS) | $(PY)
	$(PY) -m pip install --quiet $(PIP_CONSTRAINT_FLAG) -e ".[test,examples,docs]"
	touch $@

$(VENV)/.demo-installed: pyproject.toml $(CONSTRAINTS) | $(PY)
	$(PY) -m pip install --quiet $(PIP_CONSTRAINT_FLAG) -e ".[examples]"
	touch $@

LINTED = negtransfer_losses tests examples benchmarks studies

test: $(VENV)/.test-installed
	$(PY) -m ruff check $(LINTED)
	$(PY) -m ruff format --check $(LINTED)
	$(PY) -m mypy
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --quiet --site-dir build/site
	$(PY) -m pytest $(PYTEST_ARGS)

demo: $(VENV)/.demo-installed
	$(PY) studies/demo.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis results
