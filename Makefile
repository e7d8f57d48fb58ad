# The two commands of the README. Each does its own set-up on a fresh machine.
#   make demo   train + evaluate the embedded demo end to end (CPU, a few minutes)
#   make test   run the whole test suite on CPU under the Triton interpreter
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0

.PHONY: setup test demo clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the local CPU wheel first: a bare `torch` requirement would pull GBs of CUDA packages
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed

test: setup
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) *.egg-info
