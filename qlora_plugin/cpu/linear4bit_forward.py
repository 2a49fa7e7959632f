"""The one replacement `Linear4bit.forward` behind the plugin's optional 4-bit matmul paths.

Why one: `reuse_dequantized_weights` and `cpu_dequant_buffer` each change how a 4-bit layer's matmul runs, and a
layer has one forward. Each option routes the layers it applies to here with its own path (`route`), so this
module knows none of them. At every call this forward prepares the input exactly as bitsandbytes'
`Linear4bit.forward` does, then asks the layer's paths in priority order (the reuse path while the layer's block
is being checkpointed, then the buffered path for a large CPU weight) and falls back to bitsandbytes' own
forward. Outside training every call goes to bitsandbytes (which may repack weights for its CPU inference
kernel; a repacked layer also stays on bitsandbytes' path afterwards).
"""

from __future__ import annotations

import types

import torch

from qlora_plugin.ecosystem.compat import prepare_4bit_call


def route(layer, path, priority: int) -> None:
    """Send `layer`'s calls through `_forward` (once; a forward someone else set on the instance is left alone),
    which tries `path(layer, x, compute_dtype)` (a matmul, or None to pass) before paths of a higher `priority`."""
    paths = getattr(layer, "_qlora_paths", None)
    if paths is None:
        paths = layer._qlora_paths = []
    if all(existing is not path for _, existing in paths):
        paths.append((priority, path))
        paths.sort(key=lambda entry: entry[0])
    if "forward" not in vars(layer):
        layer.forward = types.MethodType(_forward, layer)


def routed(layer) -> bool:
    """Whether `layer`'s calls go through `_forward` (not when something else replaced its forward first)."""
    return getattr(vars(layer).get("forward"), "__func__", None) is _forward


def _forward(self, x: torch.Tensor):
    if not self.training or x.numel() == 0:
        return type(self).forward(self, x)
    prepared = prepare_4bit_call(self, x)
    if prepared is None:
        return type(self).forward(self, x)
    quant_state, compute_dtype = prepared
    matmul = _pick(self, x, compute_dtype)
    if matmul is None:
        return type(self).forward(self, x)
    inp_dtype = x.dtype
    x = x.to(compute_dtype)
    bias = self.bias
    if bias is not None:  # as bitsandbytes does
        if bias.dtype != x.dtype:
            bias.data = bias.data.to(x.dtype)
        bias = bias.to(compute_dtype)
    return matmul(x, self.weight, quant_state, bias).to(inp_dtype)


def _pick(layer, x: torch.Tensor, compute_dtype: torch.dtype):
    """The matmul for this call, or None for bitsandbytes' own."""
    for _, path in getattr(layer, "_qlora_paths", ()):
        matmul = path(layer, x, compute_dtype)
        if matmul is not None:
            return matmul
    return None


def input_and_bias_grads(ctx, grad_output, weight):
    """The backward of `linear(x, W, b)` for a frozen `W`, as bitsandbytes' `MatMul4Bit` computes it.

    `weight()` gives the dequantized `W` and is called only when `x` needs a gradient.
    """
    grad_x = grad_bias = None
    if ctx.needs_input_grad[3]:
        grad_bias = grad_output.sum(0, dtype=ctx.bias_dtype)
    if ctx.needs_input_grad[0]:
        grad_x = torch.matmul(grad_output, weight().to(grad_output.dtype))
    return grad_x, grad_bias


