"""How well `plan` predicts evaluation memory: the counted transient of one no-grad forward with labels (meta
device) against the resident-memory peak of the same forward run for real on CPU, in a fresh process, through TRL's
fused LM head as TRL 1.16's SFTTrainer evaluates.

    python examples/bench/eval_peak_accuracy.py BATCH SEQ      # e.g. 8 256; docs/plan.md has the figures
"""
import gc
import sys

import torch
from transformers import AutoModelForCausalLM, LlamaConfig
from trl.trainer.utils import add_fused_lm_head

from qlora_plugin.plan.activations import eval_transient_bytes

cfg = LlamaConfig(vocab_size=32000, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=1024)
b, s = int(sys.argv[1]), int(sys.argv[2])
with torch.device("meta"):
    meta = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
predicted = eval_transient_bytes(meta, b, s)
model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))  # as TRL 1.16's SFTTrainer evaluates
ids = torch.randint(0, 32000, (b, s))
with torch.no_grad():
    model(input_ids=ids[:1, :8], labels=ids[:1, :8], fused_lm_head=True, use_cache=False)  # warm up lazy init
gc.collect()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # restart the peak


def rss(field="VmRSS"):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024


before = rss()
with torch.no_grad():
    loss = model(input_ids=ids, labels=ids, fused_lm_head=True, use_cache=False).loss
peak = rss("VmHWM")  # what clear_refs reset; ru_maxrss is not reset by it and keeps exited threads' peaks
print(f"batch {b} x {s}: predicted {predicted / 2**20:.0f} MiB, measured {(peak - before) / 2**20:.0f} MiB, "
      f"logits fp32 {b * s * 32000 * 4 / 2**20:.0f} MiB")
