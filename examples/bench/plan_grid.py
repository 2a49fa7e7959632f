"""How close is `plan` at realistic shapes? Train Llama-shaped models with TRL's SFT script on CPU and compare the
plan's predicted peak (in the run's own `qlora_plugin_report.json`) with the measured one (a benchmark: prints
figures; docs/plan.md has them).

    python examples/bench/plan_grid.py --hidden 1024 --layers 8 --seq 512 --batch 1 2 4 8      # one row per batch
    python examples/bench/plan_grid.py ... --init default --eval      # peft's start; evaluation on (TRL's eval batch, 8)
    python examples/bench/plan_grid.py ... --budget-between 4 8       # --memory_budget set between two batches' peaks
    python examples/bench/plan_grid.py ... --record docs/runs/plan_grid.json --why "..."   # append each row to the record
    python examples/bench/plan_grid.py --table docs/runs/plan_grid.json      # the record as docs/plan.md's table
    python examples/bench/plan_grid.py --replan docs/runs/plan_grid.json     # re-plan its cells with the installed plan

Each run: `qlora-plugin run -- python -m trl.scripts.sft ... --strategy qlora --use_cpu true`, every row longer
than `--max_length` (so each sequence is full; `--varied`: rows of different lengths), 2 steps (batch x 1; `--steps`),
under `nice`. Two peaks are shown: the run's own (peak
RSS from when training starts: what `prediction_error` compares) and the whole process's after loading (polled
every 50 ms from outside: it also holds the calibrated start's transient, which runs before the first step).
Models are cached in $PLAN_GRID_CACHE (default /tmp/plan-grid).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MiB = 2**20
CACHE = Path(os.environ.get("PLAN_GRID_CACHE", "/tmp/plan-grid"))


def word_token(i: int) -> str:
    """The i-th of the vocabulary entries a large-vocabulary grid model's tokenizer adds (`model`)."""
    return f"<w{i:06d}>"


def dataset(added: int = 0, varied: int = 0) -> str:
    """64 rows of 1,500 random words each: longer than any `--max_length` here, so every sequence is full. With
    `added` entries added to the tokenizer (`model`), every other word is one of them, drawn uniformly: the token
    ids then spread over the whole embedding, as a real tokenizer's do (the tiny tokenizer's few hundred ids read
    only the embedding's first rows, and a 16-bit embedding mapped from its file is resident only where read).
    With `varied`, each row has between `varied` / 3 and `varied` words instead: rows of different lengths, as real
    data has (the collator pads each batch to its longest row, so every step's blocks differ in size)."""
    folder = CACHE / ((f"data-added{added}" if added else "data") + (f"-varied{varied}" if varied else ""))
    if not (folder / "train.jsonl").exists():
        words = [w for line in (HERE.parents[1] / "tests" / "data" / "skills" / "train.jsonl").read_text().splitlines()
                 for w in json.loads(line)["prompt"].split()]
        rng = random.Random(0)
        folder.mkdir(parents=True, exist_ok=True)
        for split, rows in (("train", 64), ("test", 8)):
            with open(folder / f"{split}.jsonl", "w", encoding="utf-8") as f:
                for _ in range(rows):
                    length = rng.randrange(varied // 3, varied + 1) if varied else 1500
                    text = (word_token(rng.randrange(added)) if added and i % 2 else rng.choice(words)
                            for i in range(length))
                    f.write(json.dumps({"text": " ".join(text)}) + "\n")
    return str(folder)


def model(hidden: int, layers: int, heads: int, intermediate: int, vocab: int) -> tuple[str, int]:
    """A Llama-shaped model folder and how many entries its tokenizer adds: the tiny BPE tokenizer (a few hundred
    tokens) and a config with `vocab` rows in the embedding and head (`vocab` 0: the tokenizer's own size), random
    weights in bf16 safetensors. With a larger `vocab` the tokenizer gets word entries up to it (`word_token`), which
    the cell's data uses (`dataset`)."""
    folder = CACHE / (f"llama-{hidden}x{layers}-h{heads}-i{intermediate}-v{vocab}" + ("-spread" if vocab else ""))
    if (folder / "config.json").exists():
        return str(folder), json.loads((folder / "added.json").read_text()) if vocab else 0
    import torch
    from transformers import AutoModelForCausalLM

    from qlora_plugin.models.tiny_model import build_tokenizer, model_config

    texts = [json.loads(line)["prompt"] for line in (HERE.parents[1] / "tests" / "data" / "skills" / "train.jsonl").read_text().splitlines()]
    tokenizer = build_tokenizer(texts, 512)
    added = max(0, vocab - len(tokenizer))
    tokenizer.add_tokens([word_token(i) for i in range(added)])
    config = model_config("llama", vocab or len(tokenizer), hidden, layers, intermediate, heads, tokenizer)
    config.max_position_embeddings = 4096
    config.initializer_range = 0.02
    torch.manual_seed(0)
    net = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    tmp = folder.with_name(folder.name + ".tmp")
    net.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "added.json").write_text(json.dumps(added))
    os.replace(tmp, folder)
    return str(folder), added


def poll_peak(proc, result: dict) -> None:
    """The largest VmRSS of `proc` seen after its model is loaded (once it prints the strategy summary)."""
    status = f"/proc/{proc.pid}/status"
    while proc.poll() is None:
        try:
            with open(status) as f:
                rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))
        except (OSError, StopIteration):
            rss = 0
        if result.get("loaded"):
            result["after_load"] = max(result.get("after_load", 0), rss)
        result["overall"] = max(result.get("overall", 0), rss)
        time.sleep(0.05)


def train(path: str, out: str, seq: int, batch: int | None, init: str, evaluate: bool, malloc: bool,
          steps: int, extra=(), probe: bool = False, nice: int = 10, added: int = 0, varied: bool = False) -> dict:
    command = [sys.executable, "-m", "trl.scripts.sft", "--model_name_or_path", path, "--dataset_name",
               dataset(added, seq if varied else 0),
               "--strategy", "qlora", "--use_cpu", "true", "--output_dir", out, "--max_steps", str(steps),
               "--max_length", str(seq), "--report_to", "none", "--save_strategy", "no", "--logging_steps", "1",
               "--disable_tqdm", "true", "--dataset_text_field", "text", "--init_lora_weights", init,
               "--padding_free", "false", *extra]
    if batch is not None:
        command += ["--per_device_train_batch_size", str(batch), "--gradient_accumulation_steps", "1"]
    if evaluate:
        command += ["--eval_strategy", "steps", "--eval_steps", str(steps), "--dataset_test_split", "test"]
    if probe:
        command += ["--qlora_hooks", str(HERE / "memory_probe_hooks.py")]
    if malloc:
        command = [str(Path(sys.executable).with_name("qlora-plugin")), "run", "--", *command]
    if nice:
        command = ["nice", "-n", str(nice), *command]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "QLORA_PLUGIN_CACHE_DIR": os.path.join(out, "cache")}
    started = time.time()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    polled: dict = {}
    watcher = threading.Thread(target=poll_peak, args=(proc, polled), daemon=True)
    watcher.start()
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("[probe]") or "calibrated" in line:
            print("    " + line.rstrip(), flush=True)
        if "qlora-plugin" in line and "strategy" in line:
            polled["loaded"] = True
    proc.wait()
    watcher.join()
    polled["wall_s"] = round(time.time() - started)
    if proc.returncode:
        raise SystemExit("".join(lines[-40:]))
    with open(os.path.join(out, "qlora_plugin_report.json"), encoding="utf-8") as f:
        report = json.load(f)
    report["polled"] = polled
    return report


def row(label: str, report: dict, evaluate: bool = False) -> str:
    """One printed row: the plan's peak (with evaluation on, the larger of it and the evaluation's) against the
    run's own measured peak."""
    memory = report["memory"]
    predicted = max(memory["predicted_peak_bytes"], memory["predicted_eval_peak_bytes"] if evaluate else 0)
    measured = memory["measured_peak_bytes"]
    polled = report["polled"].get("after_load", 0)
    parts = ", ".join(f"{k} {v / MiB:.0f}" for k, v in memory["predicted_components"].items() if v)
    return (f"| {label} | {predicted / MiB:,.0f} | {measured / MiB:,.0f} | {predicted / measured - 1:+.1%} | "
            f"{polled / MiB:,.0f} | {parts} |")


def record(path: str, cell: dict) -> None:
    """Append one measured cell to the JSON record at `path` (a list), with the versions and the machine's load."""
    import importlib.metadata

    cell["versions"] = {name: importlib.metadata.version(name) for name in ("torch", "transformers", "trl", "peft",
                                                                              "bitsandbytes")}
    cell["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)
    cells = json.loads(Path(path).read_text()) if Path(path).exists() else []
    Path(path).write_text(json.dumps(cells + [cell], indent=1) + "\n")


def table(path: str) -> str:
    """The record at `path` as a markdown table (docs/plan.md, "The validation grid"). A cell re-planned after the
    plan changed (`replanned`: today's prediction against the same measurement) shows today's error, the run's own
    after it."""
    lines = ["| cell | shape (hidden x layers, vocab) | batch x seq | start | eval | malloc | predicted MiB | "
             "measured MiB | error | held out | why this cell |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in json.loads(Path(path).read_text()):
        if "budget_mib" in c:  # a --memory_budget run: its own line below the table
            continue
        now = c.get("replanned")
        predicted = f"{now['predicted_mib']:,} (run: {c['predicted_mib']:,})" if now else f"{c['predicted_mib']:,}"
        error = f"{now['error']:+.1%} (run: {c['error']:+.1%})" if now else f"{c['error']:+.1%}"
        held = "no" if now and not now.get("held_out") else ("yes" if c["held_out"] else "no")
        ids = ", ids spread" if c.get("token_ids") == "spread" else ""
        rows = (" (rows varied)" if c.get("rows") == "varied" else "") + \
            (f", {c['steps']} steps" if c.get("steps", 2) != 2 else "")
        lines.append(f"| {c['cell']} | {c['hidden']} x {c['layers']}, {c['vocab']}{ids} | {c['batch']} x {c['seq']}{rows} | "
                     f"{c['init']} | {'on' if c['eval'] else 'off'} | {c.get('malloc', 'tuned')} | {predicted} | "
                     f"{c['measured_mib']:,} | {error} | {held} | {c['why']} |")
    for c in json.loads(Path(path).read_text()):
        if "budget_mib" in c:
            lines.append(f"\n{c['cell']}: `--memory_budget {c['budget_mib']:,}MiB` ({c['hidden']} x {c['layers']}, "
                         f"{c.get('malloc', 'tuned')} malloc, 8 samples per step, seq {c['seq']}, start {c['init']}): "
                         f"chose {c['chosen'][0]} x {c['chosen'][1]} (predicted {c['budget_predicted_peak_mib']:,} MiB); "
                         f"measured peak {c['measured_mib']:,} MiB, {'within' if c['under_budget'] else 'OVER'} the "
                         f"budget ({c['margin']:.1%} of it left)")
    return "\n".join(lines)


def replan(path: str) -> None:
    """Re-plan every recorded cell with the installed plan (`qlora-plugin plan --json`, the run's settings: TRL's
    default eval batch of 8 when evaluating) and keep today's prediction beside the run's own where they differ by
    more than 0.5%, against the same measurement (`replanned`; such a cell no longer counts as held out)."""
    cells = json.loads(Path(path).read_text())
    cli = str(Path(sys.executable).with_name("qlora-plugin"))
    for c in cells:
        if "budget_mib" in c:
            continue
        vocab = 0 if c["vocab"] == "tokenizer" else c["vocab"]
        folder = next(CACHE.glob(f"llama-{c['hidden']}x{c['layers']}-h*-v{vocab}*"))
        command = [cli, "plan", str(folder), "--device", "cpu", "--strategy", "qlora", "--json",
                   "--batch-size", str(c["batch"]), "--seq-len", str(c["seq"]), "--init_lora_weights", c["init"],
                   "--malloc", c.get("malloc", "tuned"), "--per_device_eval_batch_size", "8" if c["eval"] else
                   str(c["batch"])]
        plan = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
        predicted = round(max(plan["total_bytes"], plan["eval_peak_bytes"] if c["eval"] else 0) / MiB)
        # still held out only where the record says so (the change did not come from this cell)
        held_out = c.pop("replanned", {}).get("held_out", False)
        if abs(predicted / c["predicted_mib"] - 1) > 0.005:
            c["replanned"] = {"predicted_mib": predicted, "error": round(predicted / c["measured_mib"] - 1, 4),
                              "held_out": held_out}
        print(f"{c['cell']}: run {c['predicted_mib']:,} MiB, now {predicted:,} MiB, measured {c['measured_mib']:,}")
    Path(path).write_text(json.dumps(cells, indent=1) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--intermediate", type=int, default=None, help="default 3 x hidden")
    parser.add_argument("--vocab", type=int, default=0, help="rows of the embedding and head (0: the tokenizer's)")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, nargs="*", default=[1])
    parser.add_argument("--init", default="auto", help="--init_lora_weights (auto: the calibrated LoftQ start)")
    parser.add_argument("--eval", action="store_true", help="evaluate once, at the last step")
    parser.add_argument("--no-malloc", action="store_true", help="glibc's defaults (no `qlora-plugin run`)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--varied", action="store_true", help="rows of --seq / 3 to --seq words (default: every row "
                        "longer than --seq)")
    parser.add_argument("--probe", action="store_true", help="print where step 2's bytes go (memory_probe_hooks.py)")
    parser.add_argument("--budget-between", type=int, nargs=2, metavar=("LOW", "HIGH"), default=None,
                        help="also run with --memory_budget halfway between the measured peaks of these batches")
    parser.add_argument("--budget", default=None, help="also run with this --memory_budget (e.g. 1700MiB)")
    parser.add_argument("--nice", type=int, default=10, help="niceness of the training run (0: normal priority)")
    parser.add_argument("--record", default=None, help="append each row to this JSON record")
    parser.add_argument("--cell", default="", help="the cell's name in the record")
    parser.add_argument("--why", default="", help="why the cell is in the grid, for the record")
    parser.add_argument("--held-out", action="store_true", help="the model was not tuned on this cell")
    parser.add_argument("--table", default=None, help="print the record at this path as a markdown table, and exit")
    parser.add_argument("--replan", default=None, help="re-plan the record's cells with the installed plan, and exit")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[])
    args = parser.parse_args()
    if args.table:
        print(table(args.table))
        return 0
    if args.replan:
        replan(args.replan)
        return 0
    path, added = model(args.hidden, args.layers, args.heads, args.intermediate or 3 * args.hidden, args.vocab)
    shape = (f"hidden {args.hidden}, {args.layers} layers, vocab {args.vocab or 'tokenizer'}, seq {args.seq}, "
             f"init {args.init}, eval {'on' if args.eval else 'off'}, malloc "
             f"{'glibc defaults' if args.no_malloc else 'qlora-plugin run'}")
    print(f"{shape}\n| batch | predicted MiB | measured MiB | error | polled after load MiB | predicted components MiB |")
    print("|---|---|---|---|---|---|", flush=True)
    measured = {}
    for batch in args.batch:
        out = str(CACHE / "runs" / f"{Path(path).name}-s{args.seq}-b{batch}-{args.init}-{args.eval}-{time.time():.0f}")
        report = train(path, out, args.seq, batch, args.init, args.eval, not args.no_malloc, args.steps, args.extra,
                       args.probe, args.nice, added, args.varied)
        measured[batch] = max(report["memory"]["measured_peak_bytes"], report["polled"].get("after_load", 0))
        print(row(f"{batch}", report, args.eval), flush=True)
        if args.record:
            memory = report["memory"]
            # the whole process after loading (the start included) against the plan's peak (the start included;
            # with evaluation on, the larger of it and the evaluation's)
            predicted = max(memory["predicted_peak_bytes"], memory["predicted_eval_peak_bytes"] if args.eval else 0)
            record(args.record, {
                "cell": args.cell, "why": args.why, "held_out": args.held_out, "hidden": args.hidden,
                "layers": args.layers, "heads": args.heads, "vocab": args.vocab or "tokenizer", "seq": args.seq,
                "batch": batch, "token_ids": "spread" if added else "tokenizer", "rows": "varied" if args.varied else "full",
                "init": args.init, "eval": args.eval, "malloc": "glibc" if args.no_malloc else "tuned",
                "steps": args.steps, "predicted_mib": round(predicted / MiB), "measured_mib": round(measured[batch] / MiB),
                "error": round(predicted / measured[batch] - 1, 4),
                "run_step_peak_mib": round(memory["measured_peak_bytes"] / MiB),
                "predicted_step_peak_mib": round(memory["predicted_step_peak_bytes"] / MiB),
                "predicted_eval_peak_mib": round(memory.get("predicted_eval_peak_bytes", 0) / MiB),
                "predicted_components_mib": {k: round(v / MiB, 1) for k, v in memory["predicted_components"].items()},
                "wall_s": report["polled"].get("wall_s")})
    if args.budget_between or args.budget:
        from qlora_plugin.core.sizes import parse_memory

        budget = parse_memory(args.budget) if args.budget else sum(measured[b] for b in args.budget_between) // 2
        out = str(CACHE / "runs" / f"{Path(path).name}-budget-{time.time():.0f}")
        report = train(path, out, args.seq, None, args.init, args.eval, not args.no_malloc, args.steps,
                       ["--memory_budget", f"{budget}B", *args.extra], nice=args.nice, added=added,
                       varied=args.varied)
        chosen = report["memory_budget"]
        peak = max(report["memory"]["measured_peak_bytes"], report["polled"].get("after_load", 0))
        print(f"budget {budget / MiB:,.0f} MiB -> batch {chosen['per_device_train_batch_size']} x "
              f"{chosen['gradient_accumulation_steps']}; measured peak {peak / MiB:,.0f} MiB "
              f"({(peak / budget - 1):+.1%} of the budget)", flush=True)
        if args.record:
            record(args.record, {
                "cell": args.cell, "why": args.why, "held_out": args.held_out, "hidden": args.hidden,
                "layers": args.layers, "vocab": args.vocab or "tokenizer", "seq": args.seq, "init": args.init,
                "eval": args.eval, "malloc": "glibc" if args.no_malloc else "tuned", "steps": args.steps,
                "budget_mib": round(budget / MiB), "chosen": [chosen["per_device_train_batch_size"],
                                                             chosen["gradient_accumulation_steps"]],
                "budget_predicted_peak_mib": round(chosen["predicted_peak_bytes"] / MiB),
                "measured_mib": round(peak / MiB), "under_budget": peak <= budget,
                "margin": round(1 - peak / budget, 4), "wall_s": report["polled"].get("wall_s")})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
