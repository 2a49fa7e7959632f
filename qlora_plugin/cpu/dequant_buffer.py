"""Dequantize large 4-bit weights on CPU into one reused buffer instead of fresh memory at every call.

Why: on CPU, bitsandbytes' 4-bit matmul dequantizes the whole weight into a new tensor, multiplies, and frees it,
three times per layer per step under gradient checkpointing. glibc serves blocks above its mmap ceiling (32 MiB on
64-bit Linux) with fresh pages from the kernel and returns them at `free`, so each call page-faults the whole
weight in again; dequantizing into memory already touched is about three times faster (`docs/benchmarks.md`,
note 10, has the measurements).

What: `cpu_dequant_buffer` (opt-in) gives each model one buffer per compute dtype, grown to its largest
4-bit weight. Layers whose dequantized weight reaches `MIN_BYTES` fill it in row blocks of about 4 MiB (small
temporaries the heap reuses) and run the same `linear`/`matmul` bitsandbytes runs, on the same values, so results
are bit-identical (`tests/test_dequant_buffer.py`). Smaller weights already come from reused heap memory and keep
bitsandbytes' own path, as do GPU layers and calls outside training. The buffer is never saved for backward: the
backward refills it, so at most one layer's weight is held, which bitsandbytes' path allocates anyway; and it is
freed before every optimizer step (where the first step allocates the optimizer state), then re-made by the next
forward: one fresh allocation per step instead of one per dequantization.

Why opt-in: the dequantizations themselves get much cheaper, yet whole training steps in the benchmark harness
were not measurably faster (`docs/benchmarks.md`, note 10). It stays an option until a machine shows the gain end
to end.
"""

from __future__ import annotations

import math

import torch
from transformers import TrainerCallback

from qlora_plugin.cpu.linear4bit_forward import input_and_bias_grads, route, routed
from qlora_plugin.cpu.options import DEQUANT_BUFFER
from qlora_plugin.plugin.specs import hookimpl
from qlora_plugin.quant.layers import four_bit_layers

MIN_BYTES = 32 * 1024 * 1024  # glibc's largest mmap threshold on 64-bit: bigger blocks are never reused
PRIORITY = 1  # after the reuse path (`dequant_reuse`)
_BLOCK_BYTES = 4 * 1024 * 1024  # row blocks of this size stay below the heap's mmap threshold and are reused


def _absmax(quant_state) -> torch.Tensor:
    """The per-block scales in float32, computed as `bitsandbytes.functional.dequantize_4bit` computes them."""
    import bitsandbytes.functional as bnbf

    if not quant_state.nested:
        return quant_state.absmax.float()
    absmax = bnbf.dequantize_blockwise(quant_state.absmax, quant_state.state2)
    absmax += quant_state.offset
    return absmax.float()


class DequantBuffer:
    """One model's reusable dequantization memory, a flat tensor per dtype grown to the largest weight asked for."""

    def __init__(self):
        self._flat: dict[torch.dtype, torch.Tensor] = {}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._flat.values())

    def release(self) -> None:
        """Free the memory until the next dequantization (the optimizer step needs none of it)."""
        self._flat.clear()

    def dequantize(self, packed: torch.Tensor, quant_state, dtype: torch.dtype) -> torch.Tensor:
        """`dequantize_4bit(packed, quant_state)` in `dtype`, written into the buffer (valid until the next call)."""
        rows, cols = quant_state.shape
        flat = self._flat.get(dtype)
        if flat is None or flat.numel() < rows * cols:
            self._flat.pop(dtype, None)  # free the smaller one before allocating the larger
            flat = self._flat[dtype] = torch.empty(rows * cols, dtype=dtype, device=packed.device)
        out = flat[: rows * cols].view(rows, cols)
        blocksize, absmax = quant_state.blocksize, _absmax(quant_state)
        packed = packed.view(torch.uint8).reshape(-1)
        step = _rows_per_block(cols, blocksize, flat.element_size())
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            first, last = r0 * cols, r1 * cols  # element range; `first` is a multiple of blocksize and of 2
            block = torch.ops.bitsandbytes.dequantize_4bit.default(
                packed[first // 2 : math.ceil(last / 2)], absmax[first // blocksize : math.ceil(last / blocksize)],
                blocksize, quant_state.quant_type, (r1 - r0, cols), dtype,
            )
            out[r0:r1].copy_(block)
        return out

    def matmul(self, x, packed, quant_state, bias):
        return _BufferedMatMul4Bit.apply(x, packed, quant_state, bias, self)


def _rows_per_block(cols: int, blocksize: int, element_size: int) -> int:
    """Rows per block: about `_BLOCK_BYTES`, and a whole number of quantization blocks so each starts aligned."""
    align = blocksize // math.gcd(cols, blocksize)
    rows = max(1, _BLOCK_BYTES // (cols * element_size))
    return max(align, rows - rows % align)


class _BufferedMatMul4Bit(torch.autograd.Function):
    """`x @ W.T + b` for a 4-bit `W`, as bitsandbytes' `MatMul4Bit`, dequantizing into the model's buffer."""

    @staticmethod
    def forward(ctx, x, packed, quant_state, bias, buffer):
        weight = buffer.dequantize(packed, quant_state, x.dtype)  # bitsandbytes dequantizes straight to x.dtype
        ctx.quant_state, ctx.buffer = quant_state, buffer
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(packed)
        return torch.nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        (packed,) = ctx.saved_tensors
        # bitsandbytes' backward dequantizes to the stored dtype, then casts: so does this.
        grad_x, grad_bias = input_and_bias_grads(
            ctx, grad_output, lambda: ctx.buffer.dequantize(packed, ctx.quant_state, ctx.quant_state.dtype))
        return grad_x, None, None, grad_bias, None


def _large(layer, dtype: torch.dtype) -> bool:
    rows, cols = layer.weight.quant_state.shape
    return cols % 2 == 0 and rows * cols * dtype.itemsize >= MIN_BYTES


def buffer_for(layer, x: torch.Tensor, compute_dtype: torch.dtype) -> DequantBuffer | None:
    """The buffer this training call of `layer` dequantizes into, or None for bitsandbytes' own path."""
    buffer = getattr(layer, "_qlora_dequant_buffer", None)
    if buffer is None or x.device.type != "cpu" or not _large(layer, compute_dtype):
        return None
    return buffer


def _path(layer, x, compute_dtype):
    buffer = buffer_for(layer, x, compute_dtype)
    return None if buffer is None else buffer.matmul


def install(model) -> DequantBuffer:
    """Give every CPU 4-bit layer of `model` the model's one buffer (it is allocated on first use)."""
    from bitsandbytes.nn import Linear4bit

    buffer = DequantBuffer()
    for layer in model.modules():
        if isinstance(layer, Linear4bit) and layer.weight.device.type == "cpu":
            layer._qlora_dequant_buffer = buffer
            route(layer, _path, PRIORITY)
    return buffer


def buffered_layers(model) -> int:
    """How many of `model`'s 4-bit layers dequantize into the buffer when training (for the strategy report)."""
    count = 0
    for layer in model.modules():
        if getattr(layer, "_qlora_dequant_buffer", None) is not None and routed(layer):
            count += _large(layer, layer.compute_dtype or torch.float32)
    return count


class ReleaseDequantBuffer(TrainerCallback):
    """Frees the model's buffer before each optimizer step, so it never adds to the step's peak."""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        buffers = {id(b): b for m in model.modules() if (b := getattr(m, "_qlora_dequant_buffer", None)) is not None}
        for buffer in buffers.values():
            buffer.release()


OPTION = DEQUANT_BUFFER  # registered by `cpu/options.py` (a catalog plugin)


@hookimpl
def qlora_summary_lines(facts):
    layers = (facts.get("quantization") or {}).get("dequant_buffer_layers")
    return [("dequantize", f"{layers} large 4-bit layers into one reused buffer ({OPTION})")] if layers else None


@hookimpl
def qlora_trainer_callbacks(options):
    return [ReleaseDequantBuffer()] if getattr(options, OPTION, False) else []


@hookimpl(wrapper=True)
def qlora_wrap_model(options):
    """After whichever plugin wrapped the model: give its CPU 4-bit layers the buffer unless the option is off."""
    model = yield
    if model is not None and getattr(options, OPTION, False):
        install(model)
    return model


def inactive_note(explicit_options: dict, device_type: str) -> str | None:
    """What the summary says when the option was asked for and this run cannot use it (never silently)."""
    if explicit_options.get("cpu_dequant_buffer") and device_type != "cpu":
        return f"cpu_dequant_buffer acts on CPU 4-bit layers only; this run is on {device_type}: no effect"
    return None


@hookimpl
def qlora_run_facts(explicit_options, model, runtime):
    note = inactive_note(explicit_options, runtime.device_type)
    facts = {"fallbacks": [note] if note else []}
    if four_bit_layers(model):
        facts["quantization"] = {"dequant_buffer_layers": buffered_layers(model)}
    return facts
