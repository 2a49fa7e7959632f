"""Run a module as `python -m MODULE ARGS` would, then write its CUDA allocator peaks to a JSON file at exit.

    QLORA_BENCH_PEAK_FILE=peak.json python examples/bench/cuda_peak.py trl.scripts.sft --model_name_or_path ...

Why: `nvidia-smi` cannot see a container's or a MIG instance's processes, so a benchmark that samples it gets
nothing there. This measures inside the process: `torch.cuda.max_memory_reserved()` (what the caching allocator
held, paged optimizer state aside: it lives in CUDA unified memory) and `max_memory_allocated()`. The file is
written however the run ends (normal exit, SystemExit, an exception); the values are null when CUDA was never
used. The CUDA context itself (a few hundred MiB) is outside both.
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import sys

PEAK_FILE_ENV = "QLORA_BENCH_PEAK_FILE"


def peaks() -> dict:
    import torch

    used = torch.cuda.is_available() and torch.cuda.is_initialized()
    return {"max_memory_reserved": int(torch.cuda.max_memory_reserved()) if used else None,
            "max_memory_allocated": int(torch.cuda.max_memory_allocated()) if used else None}


def write_peaks(path: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(peaks(), f)
    os.replace(tmp, path)


def main() -> None:
    module, args = sys.argv[1], sys.argv[2:]
    atexit.register(write_peaks, os.environ[PEAK_FILE_ENV])
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
