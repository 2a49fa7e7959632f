"""Quantization backends, one file each: `base.py` is the interface (start there), `registry.py` picks one."""

from qlora_plugin.quant.backends.base import NONE, QuantBackend
from qlora_plugin.quant.backends.registry import (backend_for, backend_named, backend_of_config, backend_of_model,
                                                  check_asked_quantization, check_options_apply, describe, register,
                                                  registered)

__all__ = ["NONE", "QuantBackend", "backend_for", "backend_named", "backend_of_config", "backend_of_model",
           "check_asked_quantization", "check_options_apply", "describe", "model_facts", "register", "registered"]


def model_facts(model) -> dict | None:
    """The quantized base of a loaded model as the summary and report describe it; None for a 16-bit model."""
    backend = backend_of_model(model)
    return None if backend is None else {"backend": backend.name, **backend.facts(model)}
