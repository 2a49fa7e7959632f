# Two commands on a fresh machine:  `make demo`  then  `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python

.PHONY: setup demo test clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch first: an unpinned `torch` would pull a multi-GB CUDA build.
	$(PY) -m pip install -q "torch==2.13.0" || $(PY) -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
	$(PY) -m pip install -q -e ".[test,plot]"

setup: $(PY)

demo: $(PY)
	$(PY) examples/demo.py

test: $(PY)
	$(PY) -m pytest -q tests

clean:
	rm -rf examples/output
