"""Side-by-side benchmark: `--strategy qlora` against TRL's own QLoRA and 16-bit LoRA, through TRL's unmodified
SFT script, on models built locally from a config (no Hub).

    python examples/bench/benchmark.py                       # small + ~1B model, 3 rounds; writes docs/benchmarks.md
    python examples/bench/benchmark.py --sizes small --rounds 2 --steps 4 --no-write   # a quick look
    python examples/bench/benchmark.py --device cuda --sizes 8b --rounds 1 --steps 6 --seq-len 1024 \
        --configs qlora lora trl-default                    # on one GPU: beside the published figures

The configurations, run alternately in every round so that drift on the machine hits all of them alike:

  (a) qlora       --strategy qlora
  (b) trl-recipe  TRL's flags wired by hand to the same recipe (NF4, double quant, all-linear r=64 alpha=16,
                  dropout 0.1, paged AdamW 32-bit, lr 2e-4, constant schedule + 3% warmup, max_grad_norm 0.3,
                  gradient checkpointing, the compute dtype the strategy picks on this machine)
  (c) trl-default TRL's own QLoRA switch and nothing else: --load_in_4bit --use_peft
  (d) lora        --strategy lora (16-bit base + LoRA, same recipe)
  (a') qlora-reuse --strategy qlora --reuse_dequantized_weights true (the opt-in dequantization reuse)
  (a'') qlora-buffer --strategy qlora --cpu_dequant_buffer true (the opt-in dequantization buffer)
  (a-) qlora-glibc --strategy qlora under glibc's default malloc settings; on CPU every other `--strategy` run is
                  started with `qlora-plugin run --` (small-block caches off, 512 MiB kept at the heap top), as
                  docs/getting-started.md tells CPU users to
  (a*) qlora-torch-dropout --strategy qlora --cpu_fast_dropout false (torch's own dropout masks, as before the
                  strategy drew them with a faster generator on CPU)
  (a^) qlora-peft-init --strategy qlora --init_lora_weights default (peft's adapter start, as before the
                  strategy started from the calibrated LoftQ correction: what that correction costs at start)

Each run is a fresh process. Measured from outside, the same way for all four: time from process start to the
end of the first optimizer step (first loss log line), median step time (gaps between successive loss logs,
first step excluded), peak resident memory (VmHWM: anonymous + file-backed pages, e.g. memory-mapped
safetensors), peak anonymous memory (RssAnon, sampled every 20 ms), final loss. The 4-bit weight footprint is
`get_memory_footprint()` of the quantized linear layers, loaded once per quantization setting.

On a GPU the peak is measured inside each run (`examples/bench/cuda_peak.py`: `torch.cuda.max_memory_reserved()`),
since `nvidia-smi` cannot see processes in containers or MIG instances; its figure (CUDA context included) is
added where it can. Every finished run is written to `examples/output/bench/results.json` at once, a failed run
is recorded with its error and the benchmark goes on, and `--time-budget` stops starting runs once spent: a
benchmark never loses what it already measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
OUT = HERE.parent / "output" / "bench"
DATA = REPO / "tests" / "data" / "skills"

SIZES = {
    # TinyLlama-1.1B's shape: 22 layers, hidden 2048, GQA 32/4 heads, vocab 32000; stored in bf16 as on the Hub.
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),
    # Llama 3.1 8B's shape, for the GPU run beside torchtune's and litgpt's published 7-8B figures.
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
    "small": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=8, vocab_size=32000),
    # About 100M parameters (134M with its untied 32k-vocabulary head): examples/bench/gpu_smoke.py's model.
    "100m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=12, vocab_size=32000),
}

RECIPE_BY_HAND = [
    "--load_in_4bit", "--use_peft", "--bnb_4bit_quant_type", "nf4", "--use_bnb_nested_quant",
    "--lora_target_modules", "all-linear", "--lora_r", "64", "--lora_alpha", "16", "--lora_dropout", "0.1",
    "--optim", "paged_adamw_32bit", "--learning_rate", "2e-4", "--lr_scheduler_type", "constant_with_warmup",
    "--warmup_steps", "0.03", "--max_grad_norm", "0.3", "--gradient_checkpointing",
]
CONFIGS = {
    "qlora": ["--strategy", "qlora"],
    "trl-recipe": RECIPE_BY_HAND,
    "trl-default": ["--load_in_4bit", "--use_peft"],
    "lora": ["--strategy", "lora"],
    "qlora-reuse": ["--strategy", "qlora", "--reuse_dequantized_weights", "true"],
    "qlora-buffer": ["--strategy", "qlora", "--cpu_dequant_buffer", "true"],
    "qlora-glibc": ["--strategy", "qlora"],
    "qlora-torch-dropout": ["--strategy", "qlora", "--cpu_fast_dropout", "false"],
    "qlora-peft-init": ["--strategy", "qlora", "--init_lora_weights", "default"],
}
PAIRS = [("qlora", "trl-recipe"), ("qlora", "lora"), ("qlora", "trl-default"), ("qlora-reuse", "qlora"),
         ("qlora-reuse", "trl-default"), ("qlora-buffer", "qlora"),
         ("qlora", "qlora-glibc"), ("qlora", "qlora-torch-dropout"), ("qlora-torch-dropout", "trl-default"),
         ("qlora", "qlora-peft-init")]


def build_model(size: str) -> Path:
    """A randomly initialised Llama of the given shape, saved in bf16 shards with a BPE tokenizer (once)."""
    path = OUT / f"llama-{size}"
    if (path / "config.json").exists():
        return path
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from qlora_plugin.models.tiny_model import _corpus, build_tokenizer

    tokenizer = build_tokenizer(_corpus([str(DATA / "train.jsonl")]), 512)
    config = LlamaConfig(**SIZES[size], max_position_embeddings=2048, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp, max_shard_size="1GB")
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, path)
    print(f"built {path} ({sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters)", flush=True)
    return path


def _proc_kib(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class MemorySampler(threading.Thread):
    """Polls /proc/PID/status: the kernel's resident high-water mark and the largest anonymous RSS seen."""

    def __init__(self, pid: int, interval: float = 0.02):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_rss_kib = self.peak_anon_kib = 0
        self.stopped = threading.Event()

    def run(self):
        while not self.stopped.is_set():
            self.peak_rss_kib = max(self.peak_rss_kib, _proc_kib(self.pid, "VmHWM"))
            self.peak_anon_kib = max(self.peak_anon_kib, _proc_kib(self.pid, "RssAnon"))
            time.sleep(self.interval)


LOSS = re.compile(r"'loss': '?([0-9.eE+-]+)")


def gpu_mib_of(pid: int, query_output: str) -> float:
    """MiB of GPU memory `pid` holds, from `nvidia-smi --query-compute-apps=pid,used_memory` CSV output."""
    total = 0.0
    for line in query_output.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) == 2 and fields[0] == str(pid) and fields[1].replace(".", "", 1).isdigit():
            total += float(fields[1])
    return total


class GpuSampler(threading.Thread):
    """Polls nvidia-smi for the GPU memory a process holds (its CUDA context included), keeping the peak."""

    QUERY = ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"]

    def __init__(self, pid: int, interval: float = 0.25):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_mib = 0.0
        self.stopped = threading.Event()

    def run(self):
        while not self.stopped.is_set():
            try:
                output = subprocess.run(self.QUERY, capture_output=True, text=True, timeout=10).stdout
            except (OSError, subprocess.TimeoutExpired):
                output = ""
            self.peak_mib = max(self.peak_mib, gpu_mib_of(self.pid, output))
            self.stopped.wait(self.interval)


def sft_command(config: str, model: Path, steps: int, seq_len: int, batch: int, out_dir: Path,
                device: str = "cpu") -> list[str]:
    """TRL's SFT script with one configuration's flags; on CPU without native bf16, fp32 as the strategy picks;
    on a GPU through `cuda_peak.py`, which writes the run's allocator peaks when it ends."""
    launcher = [str(HERE / "cuda_peak.py")] if device == "cuda" else ["-m"]
    command = [
        sys.executable, *launcher, "trl.scripts.sft", "--model_name_or_path", str(model), "--dataset_name", str(DATA),
        *CONFIGS[config],
        "--max_steps", str(steps), "--per_device_train_batch_size", str(batch), "--max_length", str(seq_len),
        "--packing", "--packing_strategy", "wrapped", "--logging_steps", "1", "--save_strategy", "no",
        "--report_to", "none", "--disable_tqdm", "true", "--seed", "0", "--output_dir", str(out_dir),
    ]
    if device == "cpu":
        command.append("--use_cpu")
        if config.startswith("trl-") and not _bf16_native():
            command += ["--dtype", "float32", "--bf16", "false"]  # what the strategy picks here; TRL would emulate
        if "--strategy" in command and config != "qlora-glibc":  # glibc's malloc settings, as a CPU user starts it
            command = [str(Path(sys.executable).with_name("qlora-plugin")), "run", "--", *command]
    return command


def run_once(config: str, model: Path, steps: int, seq_len: int, batch: int, cache_dir: Path,
             device: str = "cpu") -> dict:
    out_dir = OUT / "runs" / f"{model.name}-{config}"
    command = sft_command(config, model, steps, seq_len, batch, out_dir, device)
    peak_file = out_dir.with_name(out_dir.name + "-cuda-peak.json")
    peak_file.unlink(missing_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONUNBUFFERED": "1", "QLORA_PLUGIN_CACHE_DIR": str(cache_dir), "QLORA_BENCH_PEAK_FILE": str(peak_file)}
    peak_file.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = MemorySampler(proc.pid)
    sampler.start()
    gpu = GpuSampler(proc.pid) if device == "cuda" else None
    if gpu:
        gpu.start()
    stamps, losses, tail = [], [], []
    for line in proc.stdout:
        tail = (tail + [line])[-40:]
        match = LOSS.search(line)
        if match:
            stamps.append(time.perf_counter() - start)
            losses.append(float(match.group(1)))
    code = proc.wait()
    sampler.stopped.set()
    sampler.join()
    if gpu:
        gpu.stopped.set()
        gpu.join()
    if code != 0 or not stamps:
        raise RuntimeError(f"{config} on {model.name} failed (exit {code}):\n{''.join(tail)}")
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    result = {
        "first_step_s": stamps[0],
        "step_s": statistics.median(gaps) if gaps else None,
        "peak_rss_mib": sampler.peak_rss_kib / 1024,
        "peak_anon_mib": sampler.peak_anon_kib / 1024,
        "final_loss": losses[-1],
    }
    if gpu:
        result.update(gpu_peaks(peak_file, gpu.peak_mib))
    return result


def gpu_peaks(peak_file: Path, smi_mib: float) -> dict:
    """A GPU run's peaks in MiB: the allocator's reserved peak measured in the process (`cuda_peak.py`), and
    nvidia-smi's (CUDA context included), None where it could not see the process."""
    try:
        reserved = json.loads(peak_file.read_text()).get("max_memory_reserved")
    except (OSError, ValueError):
        reserved = None
    return {"peak_gpu_mib": reserved / 2**20 if reserved else None, "peak_gpu_smi_mib": smi_mib or None}


def _bf16_native() -> bool:
    from qlora_plugin.ecosystem.runtime import cpu_has_native_bf16

    return cpu_has_native_bf16()


def four_bit_footprint_mib(model: Path, double_quant: bool, device: str = "cpu") -> float:
    """MiB of the 4-bit linear layers as loaded: packed codes + absmax (+ nested constants)."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from qlora_plugin.quant.layers import four_bit_layers

    from qlora_plugin.quant.cache import cached_base

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=torch.float32)
    os.environ["QLORA_PLUGIN_CACHE_DIR"] = str(OUT / "quantized-cache")  # bit-identical to load-time quantization
    entry = cached_base(str(model), {"quantization_config": config, "dtype": torch.float32}, device)
    loaded = AutoModelForCausalLM.from_pretrained(entry, dtype=torch.float32)
    quantized = sum(layer.weight.numel() * layer.weight.element_size() for layer in four_bit_layers(loaded))
    constants = 0
    for layer in four_bit_layers(loaded):
        state = layer.weight.quant_state
        constants += state.absmax.numel() * state.absmax.element_size()
        if state.state2 is not None:
            constants += state.state2.absmax.numel() * state.state2.absmax.element_size()
    return (quantized + constants) / 2**20


def _measured_runs(runs: list) -> list:
    return [r for r in runs if "error" not in r]


def summarise(results: dict) -> dict:
    """Median and spread (min..max) of every metric, per configuration; failed runs and missing values (None)
    left out, and a metric no run measured left out too."""
    summary = {}
    for config, runs in results.items():
        runs = _measured_runs(runs)
        if not runs:
            continue
        summary[config] = {}
        for key in runs[0]:
            values = [r[key] for r in runs if r.get(key) is not None]
            if values:
                summary[config][key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    return summary


def ratios(results: dict) -> dict:
    """Pairwise ratios, round by round (run i of a over run i of b), then the median over rounds."""
    table = {}
    for a, b in PAIRS:
        if a not in results or b not in results:
            continue
        ratios_ab = {}
        for key in ("first_step_s", "step_s", "peak_rss_mib", "peak_anon_mib", "peak_gpu_mib"):
            per_round = [ra[key] / rb[key] for ra, rb in zip(results[a], results[b]) if ra.get(key) and rb.get(key)]
            later = per_round[1:] if key == "first_step_s" and len(per_round) > 1 else per_round
            if later:  # a round where either run failed or did not measure this counts for nothing
                ratios_ab[key] = statistics.median(later)
        if ratios_ab:
            table[f"{a}/{b}"] = ratios_ab
    return table


def save_results(everything: dict) -> None:
    """`OUT/results.json`, replaced whole after every run (a crash later loses nothing measured before it)."""
    OUT.mkdir(parents=True, exist_ok=True)
    tmp = OUT / "results.json.tmp"
    tmp.write_text(json.dumps(everything, indent=2))
    os.replace(tmp, OUT / "results.json")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import torch

    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} cores{gpu}, torch {torch.__version__}, bf16 native (CPU): {_bf16_native()}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["small", "1b"], choices=list(SIZES))
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cpu: every run gets --use_cpu. cuda: runs on the GPU; peak GPU memory is sampled too.")
    parser.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                        help="Start no run after this many seconds (what was measured is kept and reported).")
    parser.add_argument("--no-write", action="store_true", help="Print the figures; leave docs/ alone.")
    args = parser.parse_args(argv)

    everything = {"machine": machine(), "command": "python examples/bench/benchmark.py " + " ".join(argv or sys.argv[1:]),
                  "settings": vars(args), "sizes": {}}
    started = time.perf_counter()
    for size in args.sizes:
        model = build_model(size)
        cache_dir = OUT / "quantized-cache"
        results = {config: [] for config in args.configs}
        everything["sizes"][size] = {"runs": results}
        for round_index in range(args.rounds):
            for config in args.configs:
                if args.time_budget is not None and time.perf_counter() - started > args.time_budget:
                    everything["stopped"] = f"time budget of {args.time_budget:.0f} s spent"
                    break
                try:
                    result = run_once(config, model, args.steps, args.seq_len, args.batch, cache_dir, args.device)
                except RuntimeError as err:  # recorded; the runs already measured and the next ones still count
                    result = {"error": str(err)[-2000:]}
                results[config].append(result)
                save_results(everything)
                print(f"[{size} round {round_index + 1}] {config:12s} " + "  ".join(
                    f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()
                    if v is not None), flush=True)
        device = "cuda:0" if args.device == "cuda" else "cpu"
        footprint = None if everything.get("stopped") else {
            "nf4+dq": four_bit_footprint_mib(model, True, device), "nf4": four_bit_footprint_mib(model, False, device)}
        everything["sizes"][size].update(summary=summarise(results), ratios=ratios(results), four_bit_mib=footprint)
        save_results(everything)
        print(json.dumps(everything["sizes"][size]["ratios"], indent=2), flush=True)
    if not args.no_write:
        from benchmark_report import write_report

        write_report(everything, REPO / "docs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
