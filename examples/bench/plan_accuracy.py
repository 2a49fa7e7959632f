"""How accurate is `qlora-plugin plan`? Train small local models for a few steps and compare.

    python examples/bench/plan_accuracy.py            # a few minutes on a 2-core CPU, offline

For each setting it runs TRL's unmodified SFT script with `--strategy`, which writes the plan's predicted peak
for the run's actual settings beside the measured one (training's peak RSS on CPU, the allocator's peak on CUDA)
into `qlora_plugin_report.json`. It also loads each model in 4-bit and compares the plan's `weights` with what
the loaded model holds. The figures in docs/plan.md come from this script.
"""

import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORDS = [w for line in (HERE.parents[1] / "tests" / "data" / "skills" / "train.jsonl").read_text().splitlines()
         for w in json.loads(line)["prompt"].split()]


def long_text_dataset(folder: str, rows: int = 64) -> str:
    """Rows far longer than any max_length used here, so every sequence is exactly max_length tokens."""
    os.makedirs(folder, exist_ok=True)
    rng = random.Random(0)
    with open(os.path.join(folder, "train.jsonl"), "w", encoding="utf-8") as f:
        for _ in range(rows):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(1500))}) + "\n")
    return folder


def train_and_compare(model: str, data: str, out: str, strategy: str, batch: int, seq: int, checkpointing: bool,
                      steps: int = 3, extra=()) -> dict:
    command = [  # started as docs/getting-started.md tells CPU users to: glibc's malloc tuned for training
        str(Path(sys.executable).with_name("qlora-plugin")), "run", "--",
        sys.executable, "-m", "trl.scripts.sft", "--model_name_or_path", model, "--dataset_name", data,
        "--strategy", strategy, "--output_dir", out, "--max_steps", str(steps),
        "--per_device_train_batch_size", str(batch), "--max_length", str(seq),
        "--activation_checkpointing", str(checkpointing).lower(), "--report_to", "none", "--save_strategy", "no",
        "--logging_steps", "1", "--disable_tqdm", "true", "--dataset_text_field", "text", *extra,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    with open(os.path.join(out, "qlora_plugin_report.json"), encoding="utf-8") as f:
        return json.load(f)["memory"]


def weights_vs_loaded(model: str) -> tuple[int, int]:
    """(plan's 4-bit `weights` as loaded, bytes the loaded model holds: footprint + quantization constants)."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from qlora_plugin.plan.estimate import qlora_base_bytes
    from qlora_plugin.quant.layers import quant_state_bytes

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    loaded = AutoModelForCausalLM.from_pretrained(model, quantization_config=config, dtype=torch.float32)
    return qlora_base_bytes(model), loaded.get_memory_footprint() + quant_state_bytes(loaded)


def main() -> int:
    from qlora_plugin.models.tiny_model import build_tiny_model

    root = tempfile.mkdtemp(prefix="plan-accuracy-")
    data = long_text_dataset(os.path.join(root, "data"))
    models = {
        "llama-256x4": dict(arch="llama", hidden_size=256, layers=4, intermediate_size=688),
        "gpt2-256x4": dict(arch="gpt2", hidden_size=256, layers=4, intermediate_size=1024),
    }
    paths = {name: build_tiny_model(os.path.join(root, name), data_files=[str(HERE.parents[1] / "tests" / "data" / "skills" /
                                                                              "train.jsonl")], **spec)
             for name, spec in models.items()}
    print("| model | weights predicted | loaded (footprint + constants) | error |")
    print("|---|---|---|---|")
    for name, path in paths.items():
        predicted, measured = weights_vs_loaded(path)
        print(f"| {name} | {predicted:,} | {measured:,} | {predicted / measured - 1:+.2%} |")
    baseline = build_tiny_model(os.path.join(root, "baseline"), data_files=[str(HERE.parents[1] / "tests" / "data" / "skills" /
                                                                               "train.jsonl")],
                                arch="llama", hidden_size=64, layers=1, intermediate_size=128)
    for run in range(2):  # the `runtime` term: a run whose model terms are about 1 MiB
        memory = train_and_compare(baseline, data, os.path.join(root, f"baseline-{run}"), "qlora", 1, 16, False,
                                   extra=["--use_cpu"])
        model_terms = sum(v for k, v in memory["predicted_components"].items() if k != "runtime")
        print(f"runtime baseline: measured {memory['measured_peak_bytes'] / 2**20:,.0f} MiB with "
              f"{model_terms / 2**20:.1f} MiB of predicted model terms", flush=True)
    print("\n| model | strategy | batch x seq | checkpointing | predicted MiB | measured MiB | error |")
    print("|---|---|---|---|---|---|---|")
    runs = [("llama-256x4", "qlora", 8, 256, False), ("llama-256x4", "qlora", 8, 256, True),
            ("llama-256x4", "lora", 8, 256, False)]
    for name, strategy, batch, seq, ckpt in runs:
        out = os.path.join(root, f"run-{name}-{strategy}-{ckpt}")
        memory = train_and_compare(paths[name], data, out, strategy, batch, seq, ckpt, extra=["--use_cpu"])
        predicted, measured = memory["predicted_peak_bytes"], memory["measured_peak_bytes"]
        print(f"| {name} | {strategy} | {batch} x {seq} | {ckpt} | {predicted / 2**20:,.0f} | "
              f"{measured / 2**20:,.0f} | {predicted / measured - 1:+.1%} |", flush=True)
        print("    components MiB: " + ", ".join(f"{k} {v / 2**20:.1f}"
                                                 for k, v in memory["predicted_components"].items()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
