"""The CPU paths' options, `cpu_dequant_buffer` and `cpu_fast_dropout`, registered as any plugin's options are
(`qlora_register_options`): a catalog plugin.

Why apart from `dequant_buffer.py` and `cpu_dropout.py`, which act on them: listing strategies and options
(`qlora-plugin strategies`, `options`) registers only the catalog plugins (`plugin/manager.py`, `CATALOG_PLUGINS`),
which import no machine-learning library, so a listing does not load the training stack.
"""

from __future__ import annotations

from qlora_plugin.plugin.specs import hookimpl

DEQUANT_BUFFER = "cpu_dequant_buffer"
FAST_DROPOUT = "cpu_fast_dropout"
FAST_DROPOUT_DEFAULT = True  # also for options built without the plugins' options (a bare `StrategyOptions()`)


@hookimpl
def qlora_register_options(register):
    register(DEQUANT_BUFFER, bool, False,
             "On CPU, dequantize 4-bit weights of 32 MiB and more into one reused buffer instead of fresh memory at "
             "every matmul (bit-identical; faster dequantization, but whole steps were not measurably faster in "
             "docs/benchmarks.md). Costs one buffer the size of the largest weight, freed before each optimizer "
             "step.")
    register(FAST_DROPOUT, bool, FAST_DROPOUT_DEFAULT,
             "On CPU, draw LoRA dropout masks with numpy's SFC64 generator, seeded from torch's (one 32-bit draw per "
             "element), instead of torch's bernoulli_: the same drop rate (to within 2^-32) and 1/(1-p) scaling, a "
             "bool mask kept for the backward (measured in docs/benchmarks.md). Same seed, same masks, but not "
             "torch's masks: false keeps torch's dropout, as stock peft draws it.")
