"""Which layers are 4-bit: transformers' rule on a (meta-device) model, and the bitsandbytes layers of a loaded one.

One answer for everything that must agree with a real 4-bit load (`plan`, the quantized-base cache, `merge`), and
the measured storage of a loaded model's 4-bit layers (the summary's bits/param, `plan`'s accuracy checks).
"""

from __future__ import annotations

from qlora_plugin.ecosystem.compat import keep_in_fp32_modules


def four_bit_module_names(model, skip_modules=None) -> list[str]:
    """Names of the layers transformers' bitsandbytes integration turns into `Linear4bit`, by its own rule: every
    `nn.Linear` and GPT-2 `Conv1D` except the output head, tied and fp32-kept modules, and `skip_modules`.

    One answer for everything that must agree with a real 4-bit load: `plan`, the quantized-base cache, `merge`.
    Works on a skeleton on the meta device."""
    import torch
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.base import HfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module

    skip = HfQuantizer.get_modules_to_not_convert(model, skip_modules, keep_in_fp32_modules(model))
    return [name for name, module in model.named_modules()
            if name and should_convert_module(name, skip)
            and (isinstance(module, Conv1D) or type(module) is torch.nn.Linear)]


def four_bit_layers(model) -> list:
    """bitsandbytes 4-bit layers (not peft's LoRA wrappers around them, which share the class name)."""
    try:
        from bitsandbytes.nn import Linear4bit
    except Exception:
        return []
    return [m for m in model.modules() if isinstance(m, Linear4bit)]


def quant_state(layer):
    """A 4-bit layer's quantization state. Read from the weight, else from the layer itself: under FSDP with
    `use_orig_params: false` the weight is a plain view into the flat parameter at save time, without
    `quant_state`, while `Linear4bit` keeps its own copy (what bitsandbytes restores it from in `forward`,
    `fix_4bit_weight_quant_state_from_module`)."""
    state = getattr(layer.weight, "quant_state", None)
    return state if state is not None else getattr(layer, "quant_state", None)


def quantized_bits_per_param(model) -> float | None:
    """Measured storage of the 4-bit layers (packed codes + absmax + nested constants) per original weight."""
    layers = four_bit_layers(model)
    if not layers:
        return None
    bits = params = 0
    for layer in layers:
        state = quant_state(layer)
        bits += layer.weight.numel() * layer.weight.element_size() * 8
        bits += state.absmax.numel() * state.absmax.element_size() * 8
        if getattr(state, "state2", None) is not None:
            bits += state.state2.absmax.numel() * state.state2.absmax.element_size() * 8
        params += state.shape.numel()
    return bits / params


def quant_state_bytes(model) -> int:
    """Measured: bytes of the 4-bit layers' quantization constants in a loaded model, which
    `get_memory_footprint()` does not see (they are neither parameters nor buffers)."""
    total = 0
    for layer in four_bit_layers(model):
        state = quant_state(layer)
        tensors = [state.absmax, state.code]
        if getattr(state, "state2", None) is not None:
            tensors += [state.state2.absmax, state.state2.code, state.offset]
        total += sum(t.numel() * t.element_size() for t in tensors)
    return total


def quantization_facts(model) -> dict | None:
    """The 4-bit base as the summary and report describe it; None for a 16-bit model."""
    layers = four_bit_layers(model)
    if not layers:
        return None
    first = layers[0]
    state = quant_state(first)
    return {
        "layers_4bit": len(layers),
        "quant_type": state.quant_type,
        "double_quant": getattr(state, "nested", False),
        "bits_per_param": quantized_bits_per_param(model),
        "compute_dtype": str(first.compute_dtype).replace("torch.", ""),
        "quant_storage": str(getattr(first.weight, "quant_storage", first.weight.dtype)).replace("torch.", ""),
        "embeddings_dtype": str(model.get_input_embeddings().weight.dtype).replace("torch.", ""),
    }
