"""Does `--memory_budget` pick well? For a few model/sequence configurations: the budget is set between the
predicted peaks of per-device batch 4 and 5, the run picks its batch (TRL's default 8 samples per step: 1, 2, 4
or 8),
and then the chosen batch and twice it are trained with the batch fixed, measuring each peak.

    python examples/bench/budget_accuracy.py            # prints one line per configuration; docs/plan.md has the figures

A pick is good when the measured peak at the chosen batch is within the budget and the next batch up either
exceeds it or is the largest that fits (within one step of the largest batch that fits, found by trying).
"""

import dataclasses
import json
import os
import subprocess
import sys
import tempfile

from qlora_plugin.models.model_config import load_config
from qlora_plugin.core.options import StrategyOptions
from qlora_plugin.plan.budget import peaks
from qlora_plugin.plan.estimate import PlanSettings
from qlora_plugin.ecosystem.runtime import cpu_has_native_bf16
from qlora_plugin.strategies.builtin import QLORA
from qlora_plugin.models.tiny_model import build_tiny_model

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, os.pardir, os.pardir, "tests", "data", "skills")
CONFIGS = [(256, 2, 256), (512, 2, 256), (256, 2, 1024)]  # hidden size, layers, sequence length
MiB = 2**20


def train(model, out, seq, extra):
    cmd = [sys.executable, "-m", "trl.scripts.sft", "--model_name_or_path", model, "--dataset_name", DATA,
           "--output_dir", out, "--strategy", "qlora", "--max_steps", "2", "--report_to", "none", "--use_cpu",
           "--save_strategy", "no", "--max_length", str(seq), "--padding_free", "false", "--pad_to_multiple_of",
           str(seq), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return json.load(open(os.path.join(out, "qlora_plugin_report.json")))


def main():
    compute = "bfloat16" if cpu_has_native_bf16() else "float32"
    for hidden, layers, seq in CONFIGS:
        root = tempfile.mkdtemp()
        model = build_tiny_model(os.path.join(root, "model"), "llama", [os.path.join(DATA, "train.jsonl")], hidden,
                                 layers, hidden * 4)
        settings = PlanSettings(seq_len=seq, device="cpu", dtype=compute)
        p = peaks(load_config(model), "qlora", QLORA, StrategyOptions(), settings)
        budget = (p.train(4) + p.train(5)) // 2
        chosen = train(model, os.path.join(root, "budget"), seq, ["--memory_budget", f"{budget}B"])["memory_budget"]
        batch = chosen["per_device_train_batch_size"]
        measured = {b: train(model, os.path.join(root, f"b{b}"), seq, ["--per_device_train_batch_size", str(b)])
                    ["measured"]["peak_memory_bytes"] for b in (batch, batch * 2)}
        print(f"hidden {hidden}, {layers} layers, seq {seq}: budget {budget / MiB:.0f} MiB -> batch {batch} "
              f"(accumulation {chosen['gradient_accumulation_steps']}); measured peak at {batch}: "
              f"{measured[batch] / MiB:.0f} MiB ({'within' if measured[batch] <= budget else 'OVER'}), at "
              f"{batch * 2}: {measured[batch * 2] / MiB:.0f} MiB ({'fits' if measured[batch * 2] <= budget else 'over'})",
              flush=True)


if __name__ == "__main__":
    main()
