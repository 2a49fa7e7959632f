"""Reuse each 4-bit weight's dequantization between a checkpointed block's recomputation and its backward.

Why: under gradient checkpointing a 4-bit linear layer dequantizes its weight three times per step: in the
forward pass, again when the backward pass recomputes the block, and a third time inside bitsandbytes' backward
(`MatMul4Bit` keeps only the packed weight). The recomputation's dequantized weight is needed moments later by
that backward, so keeping it removes the third dequantization for the price of one block's weights, in the
compute dtype, held at a time.

When it applies: `reuse_dequantized_weights` (off by default), to 4-bit layers inside a transformers
`GradientCheckpointingLayer` whose checkpointing is on, while training with grad enabled. The first forward keeps
nothing (checkpointing drops what it saves); the recomputation keeps one block's weights until its backward has
used them. Other calls (outside a checkpointed block, or outside training) take the other paths of
`linear4bit_forward` (the CPU buffer, or bitsandbytes' own forward), so the option can never hold a dequantized
copy of the whole model.

Results are bit-identical to bitsandbytes' path: the same dequantization ops feed the same matmuls
(`tests/test_dequant_reuse.py` compares losses, gradients and trained adapters with `torch.equal`).

CPU only. It was measured on CPU alone (docs/benchmarks.md), where a dequantization costs milliseconds of
memory traffic. On a GPU it would hold one block's dequantized weights in GPU memory (1.7 GB in bf16 for a
70B-shaped block) to save a dequantization kernel, and it is not measured there, so on other devices it stays
off and the summary says so. (It does not displace bitsandbytes' fused `gemm_4bit` kernel in training: that
runs only when no gradient is needed, bitsandbytes/autograd/_functions.py `matmul_4bit`, and this path only
where one is: grad enabled inside a checkpointed block, whose inputs require grad under TRL's PEFT set-up.)
"""

from __future__ import annotations

import weakref

import torch

from qlora_plugin.cpu.linear4bit_forward import input_and_bias_grads, route
from qlora_plugin.plugin.specs import hookimpl

PRIORITY = 0  # before the dequantization buffer: a checkpointed block's weights are reused, not re-dequantized


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
        grad_x, grad_bias = input_and_bias_grads(ctx, grad_output, lambda: weight)
        return grad_x, None, None, grad_bias


def applies(layer) -> bool:
    """Whether this call of `layer` runs inside the recomputation or forward of a block being checkpointed."""
    ref = getattr(layer, "_qlora_checkpointed_block", None)
    block = ref() if ref is not None else None
    return block is not None and block.gradient_checkpointing and block.training and torch.is_grad_enabled()


def matmul(x, packed, quant_state, bias):
    return _ReusedDequantMatMul4Bit.apply(x, packed, quant_state, bias)


def _path(layer, x, compute_dtype):
    return matmul if applies(layer) else None


def install(model) -> int:
    """Route the 4-bit layers inside checkpointable blocks through the reusing path; returns how many."""
    from bitsandbytes.nn import Linear4bit
    from transformers.modeling_layers import GradientCheckpointingLayer

    count = 0
    for block in model.modules():
        if not isinstance(block, GradientCheckpointingLayer):
            continue
        for layer in block.modules():
            if isinstance(layer, Linear4bit):
                # A weak reference: an attribute holding a module would register it as a submodule (a cycle).
                layer._qlora_checkpointed_block = weakref.ref(block)
                route(layer, _path, PRIORITY)
                count += 1
    return count


@hookimpl(wrapper=True)
def qlora_wrap_model(options, runtime):
    """After whichever plugin wrapped the model: install the reuse when the option asks for it, on CPU."""
    model = yield
    if model is not None and getattr(options, "reuse_dequantized_weights", False) and runtime.device_type == "cpu":
        install(model)
    return model


def inactive_note(options, gradient_checkpointing: bool, device_type: str = "cpu") -> str | None:
    """What the summary says when the option is on and this run cannot use it (never silently)."""
    if not options.reuse_dequantized_weights:
        return None
    if device_type != "cpu":
        return (f"reuse_dequantized_weights acts on CPU only (not measured on {device_type}, where it would hold "
                "a block's dequantized weights in device memory): no effect")
    if not gradient_checkpointing:
        return "reuse_dequantized_weights acts under gradient checkpointing only, which is off: no effect"
    return None


@hookimpl
def qlora_run_facts(options, training_args, runtime):
    note = inactive_note(options, bool(training_args.gradient_checkpointing), runtime.device_type)
    return {"fallbacks": [note] if note else []}
