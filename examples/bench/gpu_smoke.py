"""The GPU check: the CUDA paths of `--strategy qlora` end to end on one GPU, in one command.

On the lent GPU machine (no registry; torch 2.11, transformers 5.17, accelerate 1.15 there), after
`python examples/bench/gpu_wheelhouse.py` here:

    bash examples/bench/gpu_smoke.sh          # device tool: carry [".whl"], timeout_s 560; results in $OUT

or, where the packages are installed: `python examples/bench/gpu_smoke.py --out DIR --budget 480`.

Builds its models from configs (random weights, no Hub), runs TRL's unmodified SFT script in fresh processes
(their logs and outputs under --work, /tmp/gpu-smoke) and writes two files into --out, each rewritten whole after
every check so an interrupted run keeps what it measured: `smoke.json` and `smoke.md` (one table). The checks, in
priority order:

  environment   torch / CUDA / bitsandbytes versions, compute capability, native bf16, the CUDA context's size
  qlora         ~100M Llama, `--strategy qlora`, 10 steps, adapter saved: loss falls; compute, storage and
                embedding dtypes; optimizer state paged; inside the training process: the CUDA context, the
                allocator's reserve over what it allocated, and the plan's prediction against both
  resume        6 steps saving at 3, then resumed from checkpoint-3: steps 4-6 against the straight run, the
                optimizer state paged again; the resumed run loads the 4-bit base from the cache the first run
                made on the GPU
  cache         the quantized-base cache entry: made on `cuda`, loaded by the later runs
  merge         `qlora-plugin merge` of the qlora run, on the GPU machine: its fidelity report
  cache_bytes   the same weights quantized by bitsandbytes on the CPU and on the GPU: equal bytes or not
  fp16          2 steps with fp16 mixed precision: no GradScaler error, fp32 adapters
  fsdp          single-process FSDP (examples/accelerate/fsdp_qlora.yaml, 1 process), 3 steps: the adapter saved
  8b            if time is left: the Llama-3.1-8B shape, batch 2 x 2048 tokens, r=64 on every linear layer
                (examples/bench/benchmark.py), against torchtune's published 7.4 GiB peak (r=8)

A check that fails is recorded with its error and the next one runs; a check that cannot finish within the
budget is skipped and says so.
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
REPO = HERE.parents[1]
DATA = REPO / "tests" / "data" / "skills"
OUT = Path(os.environ.get("OUT") or HERE.parent / "output" / "gpu-smoke")  # the device tool's results folder
WORK = Path("/tmp/gpu-smoke")  # runs, logs, models: everything that does not come back
PROBE = HERE / "gpu_smoke_probe.py"
MIB = 2**20
# Seconds each check needs at most, so that one is not started when the budget cannot hold it.
NEEDS = {"environment": 10, "qlora": 90, "resume": 150, "cache": 1, "merge": 90, "cache_bytes": 20, "fp16": 60,
         "fsdp": 90, "8b": 240}


class Smoke:
    """The run's folders, environment and deadline, shared by the checks."""

    def __init__(self, out: Path, budget: float):
        self.out, self.deadline = out, time.monotonic() + budget  # `out`: the work folder (logs, runs)
        self.cache = out / "quantized-cache"
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                    "PYTHONUNBUFFERED": "1", "QLORA_PLUGIN_CACHE_DIR": str(self.cache)}
        self.model: Path | None = None

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, argv: list[str], name: str, extra_env: dict | None = None, timeout: float | None = None) -> dict:
        """Run a command (a fresh process, as a user would); its output goes to `<out>/<name>.log`."""
        timeout = min(timeout or self.left(), max(self.left(), 1))
        log = self.out / f"{name}.log"
        with open(log, "w", encoding="utf-8") as f:
            try:
                code = subprocess.run(argv, cwd=REPO, env={**self.env, **(extra_env or {})}, stdout=f,
                                      stderr=subprocess.STDOUT, timeout=timeout).returncode
            except subprocess.TimeoutExpired:
                code = "timeout"
        if code != 0:
            raise RuntimeError(f"{name}: exit {code}; last lines:\n{log.read_text()[-1500:]}")
        return {"log": str(log)}

    def sft(self, name: str, *flags: str, launcher: list[str] | None = None, model: Path | None = None) -> dict:
        """TRL's SFT script with `--strategy qlora` and the probe hook; returns the report and the probe."""
        out, probe = self.out / name, self.out / f"{name}-probe.json"
        argv = [*(launcher or [sys.executable, "-m"]), "trl.scripts.sft", "--model_name_or_path",
                str(model or self.model), "--dataset_name", str(DATA), "--strategy", "qlora", "--qlora_hooks",
                str(PROBE), "--output_dir", str(out), "--per_device_train_batch_size", "4", "--max_length", "256",
                "--logging_steps", "1", "--report_to", "none", "--disable_tqdm", "true", "--seed", "0", *flags]
        self.run(argv, name, {"SMOKE_PROBE": str(probe)})
        report = out / "qlora_plugin_report.json"
        return {"report": json.loads(report.read_text()) if report.exists() else None,
                "probe": json.loads(probe.read_text()) if probe.exists() else None, "out": out}


def losses(report: dict) -> dict:
    return {"first_loss": report["measured"]["first_loss"], "final_loss": report["measured"]["final_loss"]}


def check_environment(smoke: Smoke) -> dict:
    import bitsandbytes
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError(f"CUDA is not available to torch {torch.__version__} (a CPU build?): nothing to smoke")
    from qlora_plugin.ecosystem.runtime import cuda_bf16_native

    torch.cuda.init()
    free, total = torch.cuda.mem_get_info()  # nothing allocated yet: what is used is the context (and others')
    capability = torch.cuda.get_device_capability()
    return {"gpu": torch.cuda.get_device_name(), "capability": ".".join(map(str, capability)),
            "bf16_native": cuda_bf16_native(capability), "bf16_supported_with_emulation": torch.cuda.is_bf16_supported(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "bitsandbytes": bitsandbytes.__version__,
            "gpu_memory_mib": round(total / MIB), "context_mib": round((total - free) / MIB)}


def check_qlora(smoke: Smoke) -> dict:
    run = smoke.sft("qlora", "--max_steps", "10", "--save_strategy", "no")
    report, probe = run["report"], run["probe"]
    q, memory = report["quantization"], report["memory"]
    figures = {
        **losses(report), "loss_falls": report["measured"]["final_loss"] < report["measured"]["first_loss"],
        "compute_dtype": q["compute_dtype"], "quant_storage": q["quant_storage"],
        "embeddings_dtype": q["embeddings_dtype"], "adapter_dtype": report["adapter"]["dtype"],
        "mixed_precision": report["runtime"]["mixed_precision"], "cached_base": bool(q.get("cached_base")),
        "optimizer": probe["optimizer"], "paged_state_tensors": f"{probe['paged_state_tensors']}/{probe['state_tensors']}",
        "memory_kind": memory.get("memory_kind"), "measured_reserved_mib": _mib(memory.get("measured_peak_bytes")),
        "measured_allocated_mib": _mib(report["measured"].get("peak_allocated_bytes")),
        "predicted_allocator_mib": _mib(memory.get("predicted_allocator_bytes")),
        "predicted_peak_mib": _mib(memory.get("predicted_peak_bytes")), "prediction_error": memory.get("prediction_error"),
        "steps_per_s": round(report["measured"]["steps"] / report["measured"]["train_runtime_s"], 2),
        # measured inside the training process (gpu_smoke_probe.py): what the plan can only estimate
        "cuda_context_mib": _mib(probe.get("context_bytes")),
        "allocator_reserve_mib": _mib((probe.get("max_memory_reserved") or 0) - (probe.get("max_memory_allocated") or 0)),
        "adapter_saved": (run["out"] / "adapter_model.safetensors").exists(),
    }
    figures["status"] = ("ok" if figures["loss_falls"] and probe["paged_state_tensors"] > 0 and figures["adapter_saved"]
                         else "check")
    return figures


def _mib(value) -> float | None:
    return round(value / MIB, 1) if value else None


def compare_quantized(cpu: dict, gpu: dict) -> dict:
    """Per tensor name, whether bitsandbytes' CPU and GPU results are byte-identical, and the share of packed
    bytes that differ (two 4-bit codes per byte)."""
    import torch

    equal = {name: torch.equal(cpu[name], gpu[name].cpu()) for name in cpu}
    packed = [name for name in cpu if name.endswith("packed")]
    differing = sum(int((cpu[n] != gpu[n].cpu()).sum()) for n in packed)
    total = sum(cpu[n].numel() for n in packed)
    return {"identical": all(equal.values()), "tensors_differing": sorted(n for n, same in equal.items() if not same),
            "packed_bytes_differing": f"{differing}/{total}"}


def quantized_tensors(weights: dict, device: str) -> dict:
    import bitsandbytes.functional as bnbf

    found = {}
    for name, weight in weights.items():
        packed, state = bnbf.quantize_4bit(weight.to(device), blocksize=64, compress_statistics=True, quant_type="nf4")
        found[f"{name}.packed"] = packed
        found.update({f"{name}.{key}": value for key, value in state.as_dict(packed=True).items()
                      if hasattr(value, "device")})
    return found


def check_cache_bytes(smoke: Smoke) -> dict:
    """What the quantized-base cache keys apart (the device kind): is it needed? Real-looking weight shapes."""
    import torch

    torch.manual_seed(0)
    weights = {f"w{i}": (torch.randn(rows, cols) * 0.02).to(torch.bfloat16)
               for i, (rows, cols) in enumerate([(4096, 4096), (14336, 4096), (768, 2048)])}
    return compare_quantized(quantized_tensors(weights, "cpu"), quantized_tensors(weights, "cuda"))


def check_resume(smoke: Smoke) -> dict:
    import shutil

    flags = ["--save_strategy", "steps", "--save_steps", "3", "--max_steps", "6"]
    straight = smoke.sft("resume-straight", *flags)
    resumed_dir = smoke.out / "resume-resumed"
    shutil.rmtree(resumed_dir, ignore_errors=True)
    shutil.copytree(straight["out"] / "checkpoint-3", resumed_dir / "checkpoint-3")
    resumed = smoke.sft("resume-resumed", *flags, "--resume_from_checkpoint", "true")
    later = {e["step"]: e["loss"] for e in json.loads((straight["out"] / "checkpoint-6" / "trainer_state.json")
                                                       .read_text())["log_history"] if "loss" in e and e["step"] > 3}
    again = {e["step"]: e["loss"] for e in json.loads((resumed["out"] / "checkpoint-6" / "trainer_state.json")
                                                      .read_text())["log_history"] if "loss" in e and e["step"] > 3}
    gap = max(abs(later[s] - again[s]) for s in later)
    probe = resumed["probe"]
    from_cache = bool((resumed["report"] or {}).get("quantization", {}).get("cached_base"))
    return {"steps_compared": sorted(later), "max_loss_gap": gap, "paged_after_resume":
            f"{probe['paged_state_tensors']}/{probe['state_tensors']}", "base_from_cache": from_cache,
            "status": "ok" if probe["paged_state_tensors"] > 0 and sorted(later) == sorted(again) and from_cache
            else "check"}


def check_cache(smoke: Smoke) -> dict:
    """The quantized-base cache the first run filled: one entry per base, quantized on the GPU."""
    entries = sorted(smoke.cache.glob("*/qlora_plugin_cache.json"))
    devices = [json.loads(e.read_text())["settings"].get("device") for e in entries]
    return {"entries": len(entries), "quantized_on": sorted(set(devices)),
            "status": "ok" if entries and set(devices) == {"cuda"} else "check"}


def check_fp16(smoke: Smoke) -> dict:
    run = smoke.sft("fp16", "--max_steps", "2", "--save_strategy", "no", "--fp16", "true", "--bf16", "false",
                    "--dtype", "float16")
    report, probe = run["report"], run["probe"]
    return {**losses(report), "mixed_precision": probe["mixed_precision"], "adapter_dtypes": probe["trainable_dtypes"],
            "compute_dtype": report["quantization"]["compute_dtype"],
            "status": "ok" if probe["trainable_dtypes"] == ["float32"] else "check"}


def check_fsdp(smoke: Smoke) -> dict:
    import yaml

    config = yaml.safe_load((HERE.parent / "accelerate" / "fsdp_qlora.yaml").read_text())
    config["num_processes"] = 1
    path = smoke.out / "fsdp-1-process.yaml"
    path.write_text(yaml.safe_dump(config))
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    run = smoke.sft("fsdp", "--max_steps", "3", "--save_strategy", "no",
                    launcher=[accelerate, "launch", "--config_file", str(path), "-m"])
    saved = (run["out"] / "adapter_model.safetensors").exists()
    return {"adapter_saved": saved, "engine": run["report"]["runtime"]["engine"], **losses(run["report"]),
            "status": "ok" if saved else "check"}


def check_merge(smoke: Smoke) -> dict:
    """`qlora-plugin merge` with its defaults (the fidelity check included) on the GPU machine: its report."""
    adapter, merged = smoke.out / "qlora", smoke.out / "qlora-merged"
    if not (adapter / "adapter_model.safetensors").exists():
        raise RuntimeError("the qlora check left no adapter to merge")
    smoke.run([str(Path(sys.executable).with_name("qlora-plugin")), "merge", "--adapter", str(adapter), "--out",
               str(merged), "--force"], "merge")
    report = json.loads((merged / "merge_report.json").read_text())
    figures = {k: v for k, v in report.items() if isinstance(v, (int, float, str, bool))}
    figures["status"] = "ok"
    return figures


def check_8b(smoke: Smoke) -> dict:
    """The Llama-3.1-8B shape (random weights), batch 2 x 2048 tokens, r=64 on every linear layer."""
    budget = max(smoke.left() - 20, 0)
    smoke.run([sys.executable, str(HERE / "benchmark.py"), "--device", "cuda", "--sizes", "8b", "--rounds", "1",
               "--steps", "4", "--seq-len", "2048", "--batch", "2", "--configs", "qlora", "--time-budget",
               str(budget), "--no-write"], "8b")
    result = json.loads((HERE.parent / "output" / "bench" / "results.json").read_text())["sizes"]["8b"]
    summary = result.get("summary", {}).get("qlora", {})
    return {"peak_gpu_reserved_mib": summary.get("peak_gpu_mib", {}).get("median"),
            "peak_gpu_smi_mib": summary.get("peak_gpu_smi_mib", {}).get("median"),
            "step_s": summary.get("step_s", {}).get("median"),
            "published": "torchtune, Llama 3.1 8B QLoRA (r=8) on one RTX 4090: 7.4 GiB peak"}


CHECKS = {"environment": check_environment, "qlora": check_qlora, "resume": check_resume, "cache": check_cache,
          "merge": check_merge, "cache_bytes": check_cache_bytes, "fp16": check_fp16, "fsdp": check_fsdp,
          "8b": check_8b}


def build_100m() -> Path:
    """A Llama of about 100M parameters (hidden 768, 12 layers), from its config, in bf16 (examples/bench/benchmark.py;
    written under examples/output/, which is not carried back)."""
    sys.path.insert(0, str(HERE))
    from benchmark import build_model

    return build_model("100m")


def write(results: dict, out: Path) -> None:
    """`smoke.json` and `smoke.md`, each written whole to a temporary file and renamed."""
    for name, text in (("smoke.json", json.dumps(results, indent=2, default=str)), ("smoke.md", table(results))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text + "\n")
        os.replace(tmp, out / name)


def _value(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return ", ".join(map(str, value)) if len(value) < 6 else f"{len(value)} items"
    return str(value)


def table(results: dict) -> str:
    rows = ["| check | status | figures |", "|---|---|---|"]
    for name, check in results["checks"].items():
        figures = "; ".join(f"{k} {_value(v)}" for k, v in check.items() if k not in ("status", "error", "log",
                                                                                        "published", "seconds"))
        detail = check.get("error", "").splitlines()[0] if check.get("error") else figures
        rows.append(f"| {name} | {check['status']} ({check.get('seconds', 0):.0f} s) | {detail.replace('|', '/')} |")
    return "\n".join([f"GPU smoke run, {results['started']}, budget {results['budget_s']:.0f} s", "", *rows])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=480, help="Seconds for all checks (default 480).")
    parser.add_argument("--no-8b", action="store_true", help="Leave out the 8B-shaped run.")
    parser.add_argument("--out", type=Path, default=OUT, help="Where smoke.json and smoke.md go (default: $OUT).")
    parser.add_argument("--work", type=Path, default=WORK, help="Runs and logs (default: /tmp/gpu-smoke).")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    smoke = Smoke(args.work, args.budget)
    results = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "budget_s": args.budget, "checks": {}}
    for name, check in CHECKS.items():
        if name == "8b" and args.no_8b:
            continue
        if smoke.left() < NEEDS[name]:
            results["checks"][name] = {"status": "skipped", "error": f"{smoke.left():.0f} s left, needs {NEEDS[name]}"}
            write(results, args.out)
            continue
        start = time.monotonic()
        try:
            if smoke.model is None and name != "environment":
                smoke.model = build_100m()
            figures = check(smoke)
            figures.setdefault("status", "ok")
        except Exception as err:  # noqa: BLE001 - recorded; the next check still runs
            figures = {"status": "error", "error": f"{type(err).__name__}: {err}"}
        figures["seconds"] = time.monotonic() - start
        results["checks"][name] = figures
        write(results, args.out)
        print(f"[gpu-smoke] {name}: {figures['status']} ({figures['seconds']:.0f} s)", flush=True)
        if name == "environment" and figures["status"] == "error":
            break  # no GPU: nothing else can run
    print(table(results))
    return 0 if all(c["status"] in ("ok", "skipped") for c in results["checks"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
