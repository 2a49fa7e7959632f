"""The reference a merge is judged against, and the output dtype's own rounding floor.

The reference is what training computed: the adapter (peft) on the base rebuilt as training held it, every 4-bit
layer evaluated in exact float32 on bitsandbytes' own dequantized weight. The floor is how far that same model
moves when each weight it holds is off by the rounding error of the output dtype: a uniform error within half a
unit in the last place, which is what rounding a generic value to that dtype does. A merge written in bfloat16
cannot be closer to the reference than the reference is to its own rounded self, so the gate in `fidelity.py`
compares the merge with this floor rather than with a fixed number.

(Casting the reference to the output dtype would not measure it: a base quantized from bf16 dequantizes to values
bf16 holds exactly, while the merged weight `dequant + scale * B @ A` is generic and rounds.)
"""

from __future__ import annotations

import types

# Significant bits (implicit one included) and the smallest normal exponent as torch.frexp gives it.
_PRECISION = {"bfloat16": (8, -125), "float16": (11, -13), "float32": (24, -125)}


def rounding_error(tensor, dtype: str, seed: int):
    """A draw of the error that rounding `tensor` to `dtype` makes: uniform within +-1/2 ulp, float32."""
    import torch

    bits, min_exponent = _PRECISION[dtype]
    values = tensor.float()
    # In place where it can be: at most three temporaries of the tensor's size (the check's peak at a large
    # embedding); 2.0 ** e is what torch.ldexp(1, e) computes, the same values.
    ulp = torch.pow(2.0, torch.frexp(values).exponent.clamp_(min=min_exponent).sub_(bits))
    generator = torch.Generator(device=values.device).manual_seed(seed)
    return torch.rand(values.shape, generator=generator, device=values.device).sub_(0.5).mul_(ulp)


def _exact_forward(self, x):
    """A quantized layer as exact float32 arithmetic on bitsandbytes' own dequantized weight (its CPU kernels round
    through bf16 on some CPUs, int8 matmuls quantize their inputs; the check is about the merged weights, not about
    a kernel), plus the floor's rounding error once `add_rounding_error` has set it."""
    import torch

    weight = self.exact_weight(self)
    if self.rounding is not None:
        weight = weight + rounding_error(weight, *self.rounding)
    bias = None if self.bias is None else self.bias.float()
    return torch.nn.functional.linear(x.float(), weight, bias).to(x.dtype)


def _dequantize_4bit(layer):
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()


def exact_four_bit(model, layers, dequantize=None) -> None:
    """Evaluate the given quantized layers of `model` in exact float32 (see `_exact_forward`) on the weight
    `dequantize(layer)` gives (the backend's, `QuantBackend.dequantize`; default bitsandbytes 4-bit)."""
    for layer in layers:
        layer.rounding = None
        layer.exact_weight = dequantize or _dequantize_4bit
        layer.forward = types.MethodType(_exact_forward, layer)


def add_rounding_error(model, layers, dtype: str, seed: int = 0) -> None:
    """Give every weight the merge writes a rounding error of `dtype` (the LoRA factors excepted: the merge rounds
    the sum `W + scale * B @ A`, whose error the base weight's already stands for). Deterministic per seed."""
    for i, layer in enumerate(layers):
        layer.rounding = (dtype, seed * 1_000_003 + i)
    for i, (name, param) in enumerate(model.named_parameters()):
        if param.is_floating_point() and ".lora_" not in name:
            param.data += rounding_error(param.data, dtype, seed * 1_000_003 + len(layers) + i).to(param.dtype)
