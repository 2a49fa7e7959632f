"""How accurate is `qlora-plugin plan --trainer`? Train a small-but-not-toy model with TRL's DPO and GRPO scripts
and compare the measured peak with the plan's prediction for the same shapes.

    python examples/bench/trainer_memory.py [OUT_FOLDER] [dpo|grpo ...]   # each 10-30 minutes on a busy 2-core CPU

The model: Llama-shaped, hidden 768, 6 layers, intermediate 2048, 12 heads (12 KV heads), a BPE vocabulary of the
words below, random weights. DPO: 2 pairs per batch (4 rows) of 256 tokens, 3 steps; GRPO: 4 completions per batch of 96
prompt + 64 completion tokens, 2 steps (`min_new_tokens` keeps every completion full length). Both start with
`qlora-plugin run` (glibc's malloc tuned, as docs/getting-started.md tells CPU users). The figures in docs/plan.md
("Other trainers") come from this script.
"""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORDS = sorted({w for line in (HERE.parents[1] / "tests" / "data" / "skills" / "train.jsonl").read_text().splitlines()
                for w in json.loads(line)["prompt"].split()})
SEQ, BATCH, PROMPT, COMPLETION = 256, 2, 96, 64


def words(rng, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def make_data(folder: Path, tokenizer) -> int:
    """Preference pairs longer than SEQ tokens, and prompts of exactly PROMPT tokens; returns the prompts' length."""
    rng = random.Random(0)
    (folder / "pref").mkdir(parents=True, exist_ok=True)
    (folder / "prompts").mkdir(parents=True, exist_ok=True)
    with open(folder / "pref" / "train.jsonl", "w", encoding="utf-8") as f:
        for _ in range(32):
            f.write(json.dumps({"prompt": words(rng, 60), "chosen": " " + words(rng, 400),
                                "rejected": " " + words(rng, 400)}) + "\n")
    longest = 0
    with open(folder / "prompts" / "train.jsonl", "w", encoding="utf-8") as f:
        for _ in range(32):
            ids = tokenizer(words(rng, 400))["input_ids"][:PROMPT]
            text = tokenizer.decode(ids)
            longest = max(longest, len(tokenizer(text)["input_ids"]))
            f.write(json.dumps({"prompt": text}) + "\n")
    (folder / "reward_len.py").write_text("def reward(completions, **kwargs):\n"
                                          "    return [float(len(c)) for c in completions]\n")
    return longest


def run(kind: str, model: str, data: Path, out: Path, extra: list) -> dict:
    command = [str(Path(sys.executable).with_name("qlora-plugin")), "run", "--",
               sys.executable, "-m", f"trl.scripts.{kind}", "--model_name_or_path", model, "--dataset_name", str(data),
               "--strategy", "qlora", "--output_dir", str(out), "--max_steps", "3" if kind == "dpo" else "2", "--report_to", "none",
               "--save_strategy", "no", "--logging_steps", "1", "--disable_tqdm", "true", "--use_cpu",
               "--per_device_train_batch_size", str(BATCH if kind == "dpo" else 2 * BATCH), *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(data.parent)}
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=data.parent)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    return json.loads((out / "qlora_plugin_report.json").read_text())


def predict(model: str, kind: str, compute: str, **passes) -> object:
    from qlora_plugin.models.model_config import load_config
    from qlora_plugin.core.options import build_options
    from qlora_plugin.plan.estimate import PlanSettings
    from qlora_plugin.plan.trainer_passes import TrainerPasses, plan_trainer
    from qlora_plugin.plugin.manager import get_plugin_manager, get_strategy

    pm = get_plugin_manager()
    strategy = get_strategy(pm, "qlora")
    options = build_options(dict(strategy.option_defaults), {})
    batch = BATCH if kind == "dpo" else 2 * BATCH
    settings = PlanSettings(batch_size=batch, seq_len=SEQ if kind == "dpo" else passes.pop("prompt"), device="cpu",
                            dtype=compute, malloc="tuned")
    return plan_trainer(load_config(model), "qlora", strategy, options, settings, TrainerPasses(kind, **passes), pm)


def main() -> int:
    from transformers import AutoTokenizer

    from qlora_plugin.models.tiny_model import build_tiny_model

    root = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/trainer_memory").resolve()
    model = str(root / "model")
    if not (root / "model" / "config.json").exists():
        build_tiny_model(model, "llama", [str(HERE.parents[1] / "tests" / "data" / "skills" / "train.jsonl")], hidden_size=768, layers=6,
                         intermediate_size=2048, heads=12, vocab_size=4096)
    prompt = make_data(root, AutoTokenizer.from_pretrained(model))
    rows, kinds = [], sys.argv[2:] or ["dpo", "grpo"]
    if "dpo" in kinds:
        dpo = run("dpo", model, root / "pref", root / "out-dpo", ["--max_length", str(SEQ)])
        rows.append(("dpo", dpo, predict(model, "dpo", dpo["quantization"]["compute_dtype"])))
    if "grpo" in kinds:
        grpo = run("grpo", model, root / "prompts", root / "out-grpo",
                   ["--reward_funcs", "reward_len.reward", "--num_generations", "4", "--max_completion_length",
                    str(COMPLETION), "--generation_kwargs", json.dumps({"min_new_tokens": COMPLETION})])
        rows.append(("grpo", grpo, predict(model, "grpo", grpo["quantization"]["compute_dtype"], prompt=prompt,
                                           max_completion_length=COMPLETION, num_generations=4)))
    for kind, report, plan in rows:
        measured = report["measured"]["peak_memory_bytes"]
        predicted = plan.total_bytes - plan.components["start"]
        parts = ", ".join(f"{k} {v / 2**20:,.1f}" for k, v in plan.components.items() if v)
        print(f"{kind}: measured {measured / 2**20:,.0f} MiB, predicted {predicted / 2**20:,.0f} MiB "
              f"({(predicted - measured) / measured:+.1%}); components (MiB): {parts}; "
              f"reference pass {plan.details['reference_pass_bytes'] / 2**20:,.1f} MiB, generation pass "
              f"{plan.details['generation_pass_bytes'] / 2**20:,.1f} MiB; prompt tokens {prompt}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
