"""The dtypes a strategy loads and computes in: the compute dtype (bf16 where native, fp16 on older GPUs, else
fp32) and the 4-bit storage dtype FSDP / ZeRO-3 need."""

from __future__ import annotations

from qlora_plugin.core.errors import QLoRAPluginError
from qlora_plugin.core.options import StrategyOptions
from qlora_plugin.ecosystem.runtime import Runtime


def _dtype(name):
    import torch

    if isinstance(name, torch.dtype):
        return name
    if name not in ("bfloat16", "float16", "float32"):
        raise QLoRAPluginError(f"`dtype` must be one of auto, bfloat16, float16, float32; got {name!r}.")
    return getattr(torch, name)


def compute_dtype(options: StrategyOptions, runtime: Runtime, load_dtype=None):
    """bf16 where the device runs it natively, fp16 on CUDA GPUs without it (T4, V100), else fp32; an explicit
    choice (option or `--dtype`) wins."""
    if options.bnb_4bit_compute_dtype != "auto":
        return _dtype(options.bnb_4bit_compute_dtype)
    if load_dtype is not None and load_dtype != "auto":
        return _dtype(load_dtype)
    return _dtype(runtime.half_dtype or "float32")


def quant_storage(options: StrategyOptions, runtime: Runtime, load_dtype):
    """uint8 normally; FSDP / ZeRO-3 need the 4-bit storage dtype to equal the model's dtype."""
    import torch

    if options.bnb_4bit_quant_storage != "auto":
        return _dtype(options.bnb_4bit_quant_storage)
    return load_dtype if runtime.shards_parameters else torch.uint8
