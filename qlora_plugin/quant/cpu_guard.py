"""Keep bitsandbytes' CPU inference path away from shapes it cannot handle.

On CPUs with AVX512-BF16, `bnb.nn.Linear4bit.forward` repacks its weight in place the first time it runs in eval
mode without grad (evaluation, `generate()`), for a faster gemv kernel. That repacking needs out_features % 32 == 0
and in_features % 64 == 0: any other width raises ("N must be divisible by block_n", "shape ... is invalid",
"K must be even"), some after half-modifying the quantization state. A repacked weight also has no backward
(training after evaluation silently gets wrong gradients) and no longer dequantizes correctly (merging breaks).
We turn the repacking off on every 4-bit layer, and undo it where it already happened. The generic
dequantize-then-matmul path it falls back to is correct for every shape.
"""

from __future__ import annotations

from qlora_plugin.ecosystem.compat import undo_cpu_weight_packing
from qlora_plugin.plugin.specs import hookimpl
from qlora_plugin.quant.layers import four_bit_layers


def make_cpu_inference_safe(model):
    """Disable (and undo) bitsandbytes' AVX512-BF16 weight repacking on every 4-bit layer of `model`.

    Runs for every loaded base, GPU ones included, and across bitsandbytes releases: the flag is a plain
    attribute (releases without the repacking ignore it), and the private inverse is imported only for a layer
    that was really repacked, which only a release that has it can do."""
    repacked = []
    for layer in four_bit_layers(model):
        layer.support_avx512bf16_for_cpu = False  # forward() checks this before repacking
        state = getattr(layer.weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            repacked.append(layer)
    for layer in repacked:
        undo_cpu_weight_packing(layer)
    return model


@hookimpl
def qlora_model_loaded(model):
    """Every loaded base, whoever loaded it (the strategy, or a script that passed its own model object)."""
    make_cpu_inference_safe(model)
