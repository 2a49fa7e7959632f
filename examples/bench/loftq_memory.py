"""The LoftQ start's transient memory on CPU, per layer, at a 1B model's layer shapes (TinyLlama-1.1B: hidden 2048,
intermediate 5632, 32 heads, 4 key-value heads), against what `plan` counts for it (`plan/start.py`).

    python examples/bench/loftq_memory.py            # about a minute; prints one table

Builds one decoder layer of that shape (random weights, saved in bf16), loads it in 4-bit, adds LoRA r=64 on every
linear layer, then computes the plain LoftQ start while a thread samples the process's resident memory every 2 ms.
The start's transient is the peak above the resident memory just before it; its finished factors wait on the CPU,
so on a CPU they are part of it (on a GPU they are host memory, not the device's).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MIB = 2**20


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


class PeakSampler(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.running = resident_bytes(), True

    def run(self):
        while self.running:
            self.peak = max(self.peak, resident_bytes())
            time.sleep(0.002)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--rank", type=int, default=64)
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from qlora_plugin.core.options import StrategyOptions
    from qlora_plugin.plan.start import PER_ELEMENT
    from qlora_plugin.ecosystem.runtime import Runtime
    from qlora_plugin.strategies.adapters import wrap_with_lora
    from qlora_plugin.strategies.loftq import loftq_initialise
    from qlora_plugin.models.tiny_model import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_model(str(Path(tmp) / "layer"), arch="llama", hidden_size=args.hidden, layers=1,
                                intermediate_size=args.intermediate, heads=32,
                                data_files=[str(HERE.parents[1] / "tests" / "data" / "skills" / "train.jsonl")])
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16))
        model = wrap_with_lora(model, StrategyOptions(init_lora_weights="default", lora_r=args.rank),
                               Runtime("cpu", True, "none"))
        largest = max(m.quant_state.shape.numel() for m in model.modules()  # weights, not packed bytes
                      if type(m).__name__ == "Linear4bit" and getattr(m, "quant_state", None) is not None)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        adapter_bytes = next(p.element_size() for p in model.parameters() if p.requires_grad)
        before = resident_bytes()
        sampler = PeakSampler()
        sampler.start()
        facts = loftq_initialise(model)
        sampler.running = False
        sampler.join()
    transient = sampler.peak - before
    planned_layer = PER_ELEMENT * largest
    print(f"one decoder layer, hidden {args.hidden}, intermediate {args.intermediate}, r={args.rank}: "
          f"{facts['layers']} adapted layers, largest {largest:,} weights, {trainable:,} LoRA parameters "
          f"({adapter_bytes} bytes each), {facts['seconds']:.1f} s")
    print(f"measured transient (peak resident above the start) : {transient / MIB:8.1f} MiB "
          f"= {transient / largest:5.1f} bytes per element of the largest layer")
    print(f"planned: one layer's temporaries ({PER_ELEMENT} B x largest) : {planned_layer / MIB:8.1f} MiB; "
          f"finished factors on the CPU: {adapter_bytes * trainable / MIB:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
