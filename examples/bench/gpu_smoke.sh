#!/usr/bin/env bash
# The GPU check, as one command on the lent GPU machine (no registry there; torch 2.11, transformers 5.17,
# accelerate 1.15 preinstalled). Build the wheels here first:  python examples/bench/gpu_wheelhouse.py
# Then, with the device tool:  run(command="bash examples/bench/gpu_smoke.sh", carry=[".whl"], timeout_s=560)
# Results: $OUT/smoke.json and $OUT/smoke.md, rewritten after every check (docs/benchmarks.md, "GPU check").
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-examples/output/gpu-smoke}"
VENV="${GPU_SMOKE_VENV:-/tmp/qlora-gpu-venv}"
BUDGET="${GPU_SMOKE_BUDGET:-480}"  # seconds for the checks; set-up takes about 30 s of the 9 minutes
mkdir -p "$OUT"
# A venv over the image's own torch, transformers and accelerate; only what it lacks comes from the wheelhouse.
python3 -m venv --system-site-packages "$VENV"
"$VENV/bin/python" -m pip install -q --no-index --no-cache-dir --find-links .whl .whl/*.whl \
    2>&1 | tee "$OUT/install.log"
"$VENV/bin/python" -m pip list 2>/dev/null \
    | grep -iE "^(torch|transformers|accelerate|peft|trl|datasets|bitsandbytes|pluggy|qlora-plugin) " >> "$OUT/install.log"
PYTHONUNBUFFERED=1 "$VENV/bin/python" examples/bench/gpu_smoke.py --out "$OUT" --budget "$BUDGET"
