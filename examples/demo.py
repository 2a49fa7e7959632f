"""The main job on an embedded default: build a small local model, fine-tune it with `--strategy qlora`
through TRL's own, unmodified SFT script, and show what happened.

    python examples/demo.py            # ~1-3 minutes on a laptop CPU, offline

It runs exactly what a user would type on a CPU, started by `qlora-plugin run` so glibc's malloc is tuned for
training (docs/troubleshooting.md, problem 11):

    qlora-plugin run -- python -m trl.scripts.sft --model_name_or_path examples/output/tiny-llama \
        --dataset_name examples/data/skills --strategy qlora --output_dir examples/output/qlora-demo ...
"""

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "output"
MODEL = OUT / "tiny-llama"
RUN = OUT / "qlora-demo"


def main() -> int:
    from qlora_plugin.tiny_model import build_tiny_model

    if not (MODEL / "config.json").exists():
        build_tiny_model(str(MODEL), "llama", [str(HERE / "data" / "skills" / "train.jsonl")], hidden_size=128,
                         layers=2, intermediate_size=256)
        print(f"built a small Llama-shaped model and BPE tokenizer in {MODEL}")
    command = [
        str(Path(sys.executable).with_name("qlora-plugin")), "run", "--", sys.executable, "-m", "trl.scripts.sft",
        "--model_name_or_path", str(MODEL),
        "--dataset_name", str(HERE / "data" / "skills"),
        "--strategy", "qlora",
        "--learning_rate", "3e-3",  # a random tiny base needs more than the recipe's 2e-4; yours always wins
        "--max_steps", "80", "--per_device_train_batch_size", "8", "--logging_steps", "10",
        "--max_length", "64", "--save_strategy", "no", "--report_to", "none", "--use_cpu",
        "--disable_tqdm", "true",
        "--output_dir", str(RUN),
    ]
    print("$ qlora-plugin run -- python " + " ".join(command[4:]), flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    code = subprocess.call(command, env=env)
    if code != 0:
        return code
    report = json.loads((RUN / "qlora_plugin_report.json").read_text())
    measured = report["measured"]
    print("\n=== qlora demo finished ===")
    print(f"loss: {measured['first_loss']:.3f} at the first log -> {measured['final_loss']:.3f} after "
          f"{measured['steps']} steps")
    print(f"4-bit layers: {report['quantization']['layers_4bit']} at "
          f"{report['quantization']['bits_per_param']:.3f} bits/param; trainable params: "
          f"{report['adapter']['trainable_params']:,}")
    print(f"peak memory: {measured['peak_memory_bytes'] / 2**20:.0f} MiB ({measured['memory_kind']})")
    print(f"adapter: {RUN / 'adapter_model.safetensors'}")
    print(f"report : {RUN / 'qlora_plugin_report.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
