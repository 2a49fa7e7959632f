"""Benchmark: peak memory and time of `qlora-plugin merge` on a larger local model, against the output's size.

    python examples/bench/merge_memory.py            # ~1 minute on a laptop CPU, offline; writes under examples/output
    python examples/bench/merge_memory.py --check    # the fidelity check alone, whole model vs block by block (~10 min)

Builds a ~100M-parameter Llama-shaped model (fp32, ~400 MB), a LoRA adapter on all its linear layers, then
runs `qlora-plugin merge` in a fresh process with 100 MB shards and prints its peak resident memory next to
the size of the merged model and the memory of a process that only imports the same libraries.

With `--check`: models of a ~1B Llama's width (hidden 2048, intermediate 5632, 16 heads: one block is 44M
parameters, 176 MB in float32) at two depths, merged to bf16 unchecked, then the fidelity check alone in a fresh
process each way (`fidelity.check`, whole model and block by block), its peak resident memory above the imports
and its time. The block check's peak should not grow with depth; the whole-model check's does.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE.parent / "output" / "merge-bench"
PEAK = "import resource, runpy, sys; {body}; print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"


def peak_of(body: str, *argv) -> int:
    code = PEAK.format(body=body)
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, check=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return int(proc.stdout.strip().splitlines()[-1].split()[1]) * 1024


def check_peaks(depths=(2, 6), hidden=2048, intermediate=5632, heads=16) -> dict:
    """Peak memory and time of the fidelity check alone, whole model vs block by block, at each depth."""
    from qlora_plugin.models.tiny_model import build_tiny_model

    figures = {"imports_only_peak_rss_MiB": peak_of(IMPORTS) / 2**20}
    for depth in depths:
        root = OUT / f"check-{hidden}x{depth}"
        base, adapter, merged = root / "base", root / "adapter", root / "merged"
        if not (base / "config.json").exists():
            build_tiny_model(str(base), "llama", hidden_size=hidden, layers=depth, intermediate_size=intermediate,
                             heads=heads)
        if not (adapter / "adapter_config.json").exists():
            make_adapter(base, adapter)
        if not (merged / "config.json").exists():
            peak_of("sys.argv = ['qlora-plugin'] + sys.argv[1:]; from qlora_plugin.cli import main; "
                    "assert main() == 0", "merge", "--adapter", str(adapter), "--out", str(merged), "--no_check",
                    "--dtype", "bfloat16", "--bnb_4bit_quant_type", "nf4", "--use_bnb_nested_quant", "true")
        for way, blocks in (("whole_model", None), ("block_by_block", "measured")):
            start = time.perf_counter()
            peak = peak_of(CHECK.format(blocks=repr(blocks)), str(adapter), str(merged), str(base))
            figures[f"{depth}_layers_{way}"] = {"peak_above_imports_MiB": (peak - figures["imports_only_peak_rss_MiB"]
                                                                            * 2**20) / 2**20,
                                                "wall_s": time.perf_counter() - start}
    return figures


IMPORTS = "import torch, transformers, bitsandbytes, safetensors, peft; from transformers import AutoModelForCausalLM"
CHECK = ("from qlora_plugin.merge import fidelity, merging; from qlora_plugin.merge.inputs import load_adapter; "
         "a, m, b = sys.argv[1:4]; settings = merging.quant_settings(load_adapter(a), 'nf4', True); "
         "r = fidelity.check(a, m, b, settings, 'bfloat16', None, {blocks}); assert r['passed'], r; "
         "print('KL', r['merge']['mean_kl'], r['rounding_floor']['mean_kl'])")


def make_adapter(base, adapter) -> None:
    """LoRA r=16 on every linear layer, every factor perturbed so the merge changes every adapted weight."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    for param in model.parameters():
        if param.requires_grad:
            param.data += 0.01 * torch.randn_like(param)
    model.save_pretrained(adapter)


def main() -> int:
    if "--check" in sys.argv[1:]:
        print(json.dumps(check_peaks(), indent=2))
        return 0
    from qlora_plugin.models.tiny_model import build_tiny_model

    base, adapter, merged = OUT / "base", OUT / "adapter", OUT / "merged"
    if not (base / "config.json").exists():
        build_tiny_model(str(base), "llama", hidden_size=1024, layers=8, intermediate_size=2816, heads=8)
    if not (adapter / "adapter_config.json").exists():
        make_adapter(base, adapter)
    base_bytes = os.path.getsize(base / "model.safetensors")
    start = time.perf_counter()
    merge_peak = peak_of("sys.argv = ['qlora-plugin'] + sys.argv[1:]; "
                         "from qlora_plugin.cli import main; assert main() == 0",
                         "merge", "--adapter", str(adapter), "--out", str(merged), "--force",
                         "--max_shard_size", "100MB", "--bnb_4bit_quant_type", "nf4",
                         "--use_bnb_nested_quant", "true")
    seconds = time.perf_counter() - start
    imports_peak = peak_of(IMPORTS)
    out_bytes = sum(p.stat().st_size for p in merged.glob("*.safetensors"))
    figures = {"base_MiB": base_bytes / 2**20, "merged_MiB": out_bytes / 2**20, "merge_peak_rss_MiB": merge_peak / 2**20,
               "imports_only_peak_rss_MiB": imports_peak / 2**20,
               "merge_peak_above_imports_MiB": (merge_peak - imports_peak) / 2**20, "merge_wall_s": seconds,
               "shards": len(list(merged.glob("*.safetensors")))}
    print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in figures.items()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
