"""Turns `examples/bench/benchmark.py`'s results into docs/benchmarks.md and docs/benchmarks.png."""

from __future__ import annotations

from pathlib import Path

METRICS = [
    ("first_step_s", "start → first step (s)"),
    ("step_s", "step time (s)"),
    ("peak_rss_mib", "peak RSS (MiB)"),
    ("peak_anon_mib", "peak anon (MiB)"),
    ("peak_gpu_mib", "peak GPU (MiB)"),  # --device cuda only: max_memory_reserved, measured in the process
    ("peak_gpu_smi_mib", "nvidia-smi (MiB)"),  # --device cuda, where nvidia-smi sees the process
    ("final_loss", "final loss"),
]
# Published peer figures for 7-8B QLoRA on one GPU (../shared/REFERENCE.md), printed beside a GPU run's own.
PUBLISHED = [
    "torchtune, Llama 3.1 8B QLoRA on one RTX 4090: 7.4 GiB peak, 2413 tokens/s; Llama-2-7B peak LoRA 15.57 GB "
    "against QLoRA 9.29 GB",
    "litgpt, Llama-2-7B on an A100: 16-bit LoRA 21.30 GB / 2.36 min against NF4 with double quantization "
    "13.84 GB / 3.83 min",
    "Unsloth, Mistral 7B on an A100: 19.4 GB with HF + FlashAttention-2 against 12.4 GB with Unsloth",
]
LABELS = {
    "qlora": "(a) `--strategy qlora`",
    "trl-recipe": "(b) TRL flags, paper recipe by hand",
    "trl-default": "(c) TRL `--load_in_4bit --use_peft`",
    "lora": "(d) `--strategy lora` (16-bit)",
    "qlora-reuse": "(a') (a) + `--reuse_dequantized_weights true`",
    "qlora-buffer": "(a'') (a) + `--cpu_dequant_buffer true`",
    "qlora-glibc": "(a-) (a) under glibc's default malloc (not started with `qlora-plugin run`)",
    "qlora-torch-dropout": "(a*) (a) + `--cpu_fast_dropout false`",
    "qlora-peft-init": "(a^) (a) + `--init_lora_weights default`",
}


def _cell(stats: dict, key: str) -> str:
    if key not in stats:
        return "–"  # not measured in this configuration (failed runs, or nvidia-smi could not see it)
    s = stats[key]
    digits = 3 if key == "final_loss" else (0 if "mib" in key else 1)
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}–{s['max']:.{digits}f})"


def _measured(size_result: dict) -> list[tuple[str, str]]:
    """The metrics this run has in any configuration (peak GPU memory only where it ran on a GPU)."""
    found = {key for stats in size_result["summary"].values() for key in stats}
    return [(key, label) for key, label in METRICS if key in found]


def table(size_result: dict) -> str:
    metrics = _measured(size_result)
    rows = ["| configuration | " + " | ".join(label for _, label in metrics) + " |",
            "|---|" + "---|" * len(metrics)]
    for config, stats in size_result["summary"].items():
        rows.append(f"| {LABELS[config]} | " + " | ".join(_cell(stats, key) for key, _ in metrics) + " |")
    return "\n".join(rows)


def published_beside(size_result: dict, settings: dict) -> str:
    """A GPU run's (a) and (d) beside the peers' published 7-8B figures (different GPUs, batches and lengths:
    a reference point, not a like-for-like comparison)."""
    summary = size_result["summary"]
    tokens = settings["batch"] * settings["seq_len"]
    lines = ["Published figures, beside this run's (different GPUs, batch sizes and sequence lengths: a reference "
             "point, not a like-for-like comparison):", ""]
    lines += [f"- {figure}" for figure in PUBLISHED]
    for config in ("qlora", "lora"):
        stats = summary.get(config, {})
        if "peak_gpu_mib" in stats and "step_s" in stats:
            lines.append(f"- this run, {LABELS[config]}: {stats['peak_gpu_mib']['median'] / 1024:.2f} GiB peak "
                         f"(allocator reserved, CUDA context not included), "
                         f"{tokens / stats['step_s']['median']:.0f} tokens/s at batch {settings['batch']} x "
                         f"{settings['seq_len']}")
    return "\n".join(lines)


def ratio_table(size_result: dict) -> str:
    found = {key for values in size_result["ratios"].values() for key in values}
    keys = [k for k in ("first_step_s", "step_s", "peak_rss_mib", "peak_anon_mib", "peak_gpu_mib") if k in found]
    rows = ["| pair | " + " | ".join(dict(METRICS)[k] for k in keys) + " |", "|---|" + "---|" * len(keys)]
    for pair, values in size_result["ratios"].items():
        rows.append(f"| {pair} | " + " | ".join(f"{values[k]:.2f}x" if k in values else "–" for k in keys) + " |")
    return "\n".join(rows)


TARGET_SIZE = "1b"
# The targets: (pair, metric, limit, how the limit reads). Ratios are (a) over the other configuration.
TARGETS = [
    ("qlora/lora", "peak_rss_mib", 0.6, "(a) vs (d): peak process memory ≤ 0.6x"),
    ("qlora/lora", "step_s", 1.2, "(a) vs (d): step time ≤ 1.2x"),
    ("qlora/trl-recipe", "first_step_s", 0.5, "(a) vs (b): time to first step ≤ 0.5x, from the second run on"),
    ("qlora/trl-recipe", "step_s", 1.02, "(a) vs (b): step time within 2% (or faster)"),
    ("qlora/trl-recipe", "peak_rss_mib", 1.02, "(a) vs (b): peak process memory within 2% (or lower)"),
    ("qlora/trl-default", "step_s", 1.0, "(a) vs (c): not slower"),
    ("qlora-reuse/trl-default", "step_s", 1.0, "(a') vs (c): not slower"),
]


def targets_table(size_result: dict) -> str:
    """Each target beside the measured median ratio, met or not; and (a)'s final loss against (c)'s."""
    rows = ["| target | measured | met |", "|---|---|---|"]
    for pair, key, limit, text in TARGETS:
        value = size_result["ratios"].get(pair, {}).get(key)
        if value is not None:
            rows.append(f"| {text} | {value:.3f}x | {'yes' if value <= limit else '**no**'} |")
    summary = size_result["summary"]
    if "qlora" in summary and "trl-default" in summary:
        ours, theirs = summary["qlora"]["final_loss"]["median"], summary["trl-default"]["final_loss"]["median"]
        rows.append(f"| (a) vs (c): final loss no worse | {ours:.3f} against {theirs:.3f} | "
                    f"{'yes' if ours <= theirs else '**no**'} |")
    return "\n".join(rows)


def plot(everything: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(everything["sizes"])
    panels = [("peak_rss_mib", "peak RSS (MiB)"), ("step_s", "step time (s)"), ("first_step_s", "start → first step (s)")]
    fig, axes = plt.subplots(len(sizes), len(panels), figsize=(4.2 * len(panels), 3.2 * len(sizes)), squeeze=False)
    for row, size in enumerate(sizes):
        summary = everything["sizes"][size]["summary"]
        for col, (key, title) in enumerate(panels):
            ax = axes[row][col]
            configs = [c for c in summary if key in summary[c]]
            medians = [summary[c][key]["median"] for c in configs]
            errors = [[m - summary[c][key]["min"] for c, m in zip(configs, medians)],
                      [summary[c][key]["max"] - m for c, m in zip(configs, medians)]]
            ax.bar(configs, medians, yerr=errors, capsize=3, color=["#2a7", "#59c", "#aab", "#d84", "#7c5"][: len(configs)])
            ax.set_title(f"{size}: {title}", fontsize=9)
            ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_report(everything: dict, docs: Path) -> None:
    settings = everything["settings"]
    parts = [
        "# Benchmarks: `--strategy qlora` against TRL's own QLoRA and 16-bit LoRA",
        "",
        "Generated by `examples/bench/benchmark.py` (do not edit by hand). Every configuration runs TRL's unmodified "
        "SFT script in a fresh process; configurations alternate within each round. Figures are medians over "
        f"{settings['rounds']} rounds with the range in brackets; ratios are computed round by round (run *i* "
        "of one configuration over run *i* of the other), then the median taken — for start-up, from the "
        "second round on (the first round of (a) fills the quantized-base cache).",
        "",
        f"- Machine: {everything['machine']}",
        f"- Command: `{everything['command']}`",
        f"- Per step: batch {settings['batch']} × {settings['seq_len']} tokens (packed), {settings['steps']} "
        "steps per run, `--use_cpu`.",
        "- Memory: peak RSS is the kernel's high-water mark (anonymous + file-backed pages such as memory-mapped "
        "safetensors); peak anon is the largest anonymous RSS seen, sampled every 20 ms.",
        "",
        "![benchmarks](benchmarks.png)",
        "",
    ]
    if everything.get("stopped"):
        parts += [f"The run stopped early ({everything['stopped']}); what it measured is below.", ""]
    for size, result in everything["sizes"].items():
        footprint = result.get("four_bit_mib")
        failed = {c: len([r for r in runs if "error" in r]) for c, runs in result.get("runs", {}).items()}
        parts += [
            f"## {size} model",
            "",
            table(result),
            "",
            ratio_table(result),
            "",
        ]
        if size == TARGET_SIZE:
            parts += ["Against the issue's targets (set for the ~1B model):", "", targets_table(result), ""]
        if any(n for n in failed.values()):
            parts += ["Failed runs (left out above; errors in results.json): " + ", ".join(
                f"{LABELS[c]} {n}" for c, n in failed.items() if n) + ".", ""]
        if any("peak_gpu_mib" in stats for stats in result["summary"].values()):
            parts += [published_beside(result, settings), ""]
        if footprint:
            parts += [
                f"4-bit linear layers as stored: {footprint['nf4+dq']:.1f} MiB with double quantization (a, b), "
                f"{footprint['nf4']:.1f} MiB without (c).",
                "",
            ]
    notes = Path(__file__).with_name("benchmark_notes.md")
    if notes.exists():
        parts.append(notes.read_text())
    (docs / "benchmarks.md").write_text("\n".join(parts) + "\n")
    plot(everything, docs / "benchmarks.png")
