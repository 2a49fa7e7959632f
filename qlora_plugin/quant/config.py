"""Model loading: the `BitsAndBytesConfig` (NF4, double quantization), the compute dtype and the device map."""

from __future__ import annotations

from qlora_plugin.errors import QLoRAPluginError
from qlora_plugin.options import StrategyOptions
from qlora_plugin.runtime import Runtime


def require_bitsandbytes() -> None:
    """bitsandbytes must import and have a backend for this machine; otherwise say how to fix it."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception as err:  # ImportError, or a broken native library
        raise QLoRAPluginError(
            f"The qlora strategy needs bitsandbytes, which could not be imported ({type(err).__name__}: {err}). "
            "Install it with `pip install 'bitsandbytes>=0.50'` (CPU and CUDA wheels on PyPI), or use "
            "`--strategy lora` for 16-bit LoRA without it."
        ) from None


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


def bnb_config(options: StrategyOptions, runtime: Runtime, load_dtype):
    require_bitsandbytes()
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=options.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=options.use_bnb_nested_quant,
        bnb_4bit_compute_dtype=compute_dtype(options, runtime, load_dtype),
        bnb_4bit_quant_storage=quant_storage(options, runtime, load_dtype),
    )


def model_init_kwargs(options: StrategyOptions, init_kwargs: dict, runtime: Runtime) -> dict:
    """`from_pretrained` kwargs for the strategy: the user's, plus dtype, quantization config and device map."""
    kwargs = dict(init_kwargs)
    asked = kwargs.pop("torch_dtype", None) or kwargs.get("dtype")
    if asked is None or asked == "auto":
        kwargs["dtype"] = compute_dtype(options, runtime, None)
    else:
        kwargs["dtype"] = _dtype(asked)
    if options.load_in_4bit and "quantization_config" not in kwargs:  # a config the user passed wins
        kwargs["quantization_config"] = bnb_config(options, runtime, kwargs["dtype"])
    if runtime.engine == "ddp" and runtime.device_type != "cpu":
        kwargs["device_map"] = {"": runtime.device_index}  # one full copy per rank on its own GPU, never "auto"
    elif runtime.engine in ("fsdp", "deepspeed_zero3", "deepspeed"):
        kwargs["device_map"] = None
    return kwargs


