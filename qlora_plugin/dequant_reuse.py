"""Reuse each 4-bit weight's dequantization between a checkpointed block's recomputation and its backward.

Why: under gradient checkpointing a 4-bit linear layer dequantizes its weight three times per step: in the
forward pass, again when the backward pass recomputes the block, and a third time inside bitsandbytes' backward
(`MatMul4Bit` keeps only the packed weight). The recomputation's dequantized weight is needed moments later by
that backward, so keeping it removes the third dequantization for the price of one block's weights, in the
compute dtype, held at a time.

When it applies: `reuse_dequantized_weights` (off by default), to 4-bit layers inside a transformers
`GradientCheckpointingLayer` whose checkpointing is on, while training with grad enabled. The first forward keeps
nothing (checkpointing drops what it saves); the recomputation keeps one block's weights until its backward has
used them. Layers outside a checkpointed block, and all layers outside training, run bitsandbytes' own forward,
so the option can never hold a dequantized copy of the whole model.

Results are bit-identical to bitsandbytes' path: the same dequantization ops feed the same matmuls
(`tests/test_dequant_reuse.py` compares losses, gradients and trained adapters with `torch.equal`).
"""

from __future__ import annotations

import types
import weakref

import torch

from .hookspecs import hookimpl


class _ReusedDequantMatMul4Bit(torch.autograd.Function):
    """`x @ W.T + b` for a 4-bit `W`, as bitsandbytes' `MatMul4Bit`, saving the dequantized `W` for the backward."""

    @staticmethod
    def forward(ctx, x, packed, quant_state, bias):
        import bitsandbytes.functional as bnbf

        weight = bnbf.dequantize_4bit(packed.view(-1, 1), quant_state).to(x.dtype)
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(weight)
        return torch.nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        (weight,) = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[3]:
            grad_bias = grad_output.sum(0, dtype=ctx.bias_dtype)
        if ctx.needs_input_grad[0]:
            grad_x = torch.matmul(grad_output, weight.to(grad_output.dtype))
        return grad_x, None, None, grad_bias


def _checkpointed(layer) -> bool:
    block = layer._qlora_checkpointed_block()
    return block is not None and block.gradient_checkpointing and block.training and torch.is_grad_enabled()


def _forward_reusing_dequant(self, x: torch.Tensor):
    """`Linear4bit.forward`, through `_ReusedDequantMatMul4Bit` while its block is being checkpointed."""
    if not _checkpointed(self) or x.numel() == 0:
        return type(self).forward(self, x)
    from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

    fix_4bit_weight_quant_state_from_module(self)
    if not self.compute_type_is_set:
        self.set_compute_type(x)
        self.compute_type_is_set = True
    inp_dtype = x.dtype
    if self.compute_dtype is not None:
        x = x.to(self.compute_dtype)
    bias = self.bias
    if bias is not None:  # as bitsandbytes does
        if bias.dtype != x.dtype:
            bias.data = bias.data.to(x.dtype)
        bias = bias.to(self.compute_dtype)
    return _ReusedDequantMatMul4Bit.apply(x, self.weight, self.weight.quant_state, bias).to(inp_dtype)


def install(model) -> int:
    """Route the 4-bit layers inside checkpointable blocks through the reusing forward; returns how many."""
    from bitsandbytes.nn import Linear4bit
    from transformers.modeling_layers import GradientCheckpointingLayer

    count = 0
    for block in model.modules():
        if not isinstance(block, GradientCheckpointingLayer):
            continue
        for layer in block.modules():
            if isinstance(layer, Linear4bit) and "forward" not in vars(layer):
                # A weak reference: an attribute holding a module would register it as a submodule (a cycle).
                layer._qlora_checkpointed_block = weakref.ref(block)
                layer.forward = types.MethodType(_forward_reusing_dequant, layer)
                count += 1
    return count


@hookimpl(wrapper=True)
def qlora_wrap_model(options):
    """After whichever plugin wrapped the model: install the reuse when the option asks for it."""
    model = yield
    if model is not None and getattr(options, "reuse_dequantized_weights", False):
        install(model)
    return model
