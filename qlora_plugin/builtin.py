"""The built-in strategies, `qlora` and `lora`, registered through the same hooks as any third-party plugin.

Every implementation here is `trylast`, so a plugin can answer any hook first, for its own strategy or for all.
"""

from __future__ import annotations

from .hookspecs import hookimpl
from .strategy import Strategy

QLORA = Strategy(
    "qlora",
    "QLoRA (Dettmers et al. 2023): frozen NF4 base with double quantization, 16-bit LoRA on every linear layer "
    "(r=64, alpha=16), paged AdamW, the paper's training recipe.",
    {"load_in_4bit": True},
)
LORA = Strategy(
    "lora",
    "16-bit LoRA with the same recipe, no quantization: the side-by-side baseline for qlora.",
    {"load_in_4bit": False},
)


@hookimpl(trylast=True)
def qlora_register_strategies(register):
    register(QLORA)
    register(LORA)


@hookimpl(trylast=True)
def qlora_model_init_kwargs(options, init_kwargs, runtime):
    from .quantization import model_init_kwargs

    return model_init_kwargs(options, init_kwargs, runtime)


@hookimpl(trylast=True)
def qlora_wrap_model(options, model, runtime):
    from .adapters import wrap_with_lora

    return wrap_with_lora(model, options, runtime)


@hookimpl(trylast=True)
def qlora_create_optimizer(training_args):
    from .optimizer import bitsandbytes_optimizer

    return bitsandbytes_optimizer(training_args)
