"""Model loading: the `from_pretrained` kwargs of a strategy: the quantization config (the run's backend's,
`quant/backends/`), the compute dtype (`quant/dtypes.py`) and the device map."""

from __future__ import annotations

from qlora_plugin.core.errors import QLoRAPluginError
from qlora_plugin.core.options import StrategyOptions
from qlora_plugin.quant.backends import backend_for
from qlora_plugin.quant.dtypes import _dtype, compute_dtype, quant_storage  # noqa: F401 - also found here
from qlora_plugin.ecosystem.runtime import Runtime


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


def model_init_kwargs(options: StrategyOptions, init_kwargs: dict, runtime: Runtime) -> dict:
    """`from_pretrained` kwargs for the strategy: the user's, plus dtype, quantization config and device map."""
    kwargs = dict(init_kwargs)
    asked = kwargs.pop("torch_dtype", None) or kwargs.get("dtype")
    if asked is None or asked == "auto":
        kwargs["dtype"] = compute_dtype(options, runtime, None)
    else:
        kwargs["dtype"] = _dtype(asked)
    backend = backend_for(options)
    if backend is not None and "quantization_config" not in kwargs:  # a config the user passed wins
        kwargs["quantization_config"] = backend.quantization_config(options, runtime, kwargs["dtype"])
    if runtime.engine == "ddp" and runtime.device_type != "cpu":
        kwargs["device_map"] = {"": runtime.device_index}  # one full copy per rank on its own GPU, never "auto"
    elif runtime.engine in ("fsdp", "deepspeed_zero3", "deepspeed"):
        kwargs["device_map"] = None
    return kwargs


