"""The built-in strategies as presets, `qlora`, `lora-int8` and `lora`, and their registration: a catalog plugin.

Why apart from `builtin.py`: listing strategies and options (`qlora-plugin strategies`, `options`) registers only
the catalog plugins (`plugin/manager.py`, `CATALOG_PLUGINS`), which import no machine-learning library, so a listing
does not load the training stack; `builtin.py`'s hooks do the work in a run.
"""

from __future__ import annotations

from qlora_plugin.core.strategy import Strategy
from qlora_plugin.plugin.specs import hookimpl

QLORA = Strategy(
    "qlora",
    "QLoRA (Dettmers et al. 2023): frozen NF4 base with double quantization, 16-bit LoRA on every linear layer "
    "(r=64, alpha=16), paged AdamW, the paper's training recipe.",
    {"load_in_4bit": True},
)
# Named for what it trains (LoRA) and on what (an int8 base): not "qlora-int8" (QLoRA is the 4-bit NF4 recipe), and
# far enough from `qlora` and `lora` that a typo of either is never offered it.
LORA_INT8 = Strategy(
    "lora-int8",
    "LoRA on an 8-bit base (bitsandbytes LLM.int8()): the qlora recipe with the frozen base in int8 instead of NF4 "
    "(about twice the base memory of qlora, a far smaller rounding error per weight); peft's default start.",
    {"load_in_4bit": False, "quant_backend": "bnb_int8"},
)
LORA = Strategy(
    "lora",
    "16-bit LoRA with the same recipe, no quantization: the side-by-side baseline for qlora.",
    {"load_in_4bit": False},
)


@hookimpl(trylast=True)
def qlora_register_strategies(register):
    register(QLORA)
    register(LORA_INT8)
    register(LORA)
