"""bitsandbytes 4-bit (NF4 or FP4, optional double quantization): the QLoRA paper's base, `--strategy qlora`.

The layer rules and measurements live in `quant/layers.py` (4-bit `Linear4bit` layers and their quantization
state); this file is what the rest of the plugin sees of them.
"""

from __future__ import annotations

import math

from qlora_plugin.quant.backends.base import QuantBackend, bitsandbytes_setting


def four_bit_bytes(numel: int, double_quant: bool, storage_itemsize: int = 1) -> dict:
    """Bytes bitsandbytes allocates for one 4-bit weight of `numel` elements (blocksize 64).

    packed: two codes per byte, padded to the storage dtype; constants: absmax (fp32 per block, or uint8 per block
    + fp32 per 256 blocks + offset + the 256-entry nested code) + the 16-entry code map.
    """
    packed = math.ceil(math.ceil(numel / 2) / storage_itemsize) * storage_itemsize
    blocks = math.ceil(numel / 64)
    if double_quant:
        constants = blocks + 4 * math.ceil(blocks / 256) + 4 + 256 * 4
    else:
        constants = 4 * blocks
    return {"packed": packed, "constants": constants + 16 * 4}


class BitsAndBytes4bit(QuantBackend):
    name = "bnb_4bit"
    label = "4-bit"
    flag = "load_in_4bit"
    strategy = "qlora"
    cacheable = True
    loftq = True

    def quantization_config(self, options, runtime, load_dtype):
        """NF4 (or FP4) with double quantization, as the paper; compute and storage dtypes per `quant/dtypes.py`."""
        self.require()
        from transformers import BitsAndBytesConfig

        from qlora_plugin.quant.dtypes import compute_dtype, quant_storage

        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=options.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=options.use_bnb_nested_quant,
            bnb_4bit_compute_dtype=compute_dtype(options, runtime, load_dtype),
            bnb_4bit_quant_storage=quant_storage(options, runtime, load_dtype),
        )

    def owns_config(self, config) -> bool:
        return bool(bitsandbytes_setting(config, "load_in_4bit") or bitsandbytes_setting(config, "_load_in_4bit"))

    def quantized_layers(self, model) -> list:
        from qlora_plugin.quant.layers import four_bit_layers

        return four_bit_layers(model)

    def facts(self, model) -> dict:
        from qlora_plugin.quant.layers import quantization_facts

        return quantization_facts(model)

    def summary_line(self, q: dict) -> str:
        return (f"4-bit base : {q['layers_4bit']} linear layers in {q['quant_type']}"
                f"{' + double quant' if q['double_quant'] else ''} ({q['bits_per_param']:.3f} bits per 4-bit weight: "
                f"codes and block scales), compute {q['compute_dtype']}, storage {q['quant_storage']}, "
                f"embeddings {q['embeddings_dtype']}")

    def record(self, model) -> dict:
        from qlora_plugin.quant.cache_origin import quantized_on
        from qlora_plugin.quant.layers import four_bit_layers, quant_state

        layers = four_bit_layers(model)
        state = quant_state(layers[0])  # under FSDP the weight may be a flat view without it
        config = getattr(getattr(model, "config", None), "quantization_config", None)
        config = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})
        return {
            "load_in_4bit": True,
            "bnb_4bit_quant_type": state.quant_type,
            "bnb_4bit_use_double_quant": bool(getattr(state, "nested", False)),
            "blocksize": int(state.blocksize),
            "weight_dtype": str(state.dtype).replace("torch.", ""),  # the weights' dtype when they were quantized
            # bitsandbytes' CPU and CUDA kernels quantize separately: where the bytes were made (a cached base may
            # have been quantized on the CPU and loaded onto a GPU), which `merge` quantizes on again
            "device_type": quantized_on(model) or state.absmax.device.type,
            "llm_int8_skip_modules": config.get("llm_int8_skip_modules"),
            "layers_4bit": len(layers),
        }

    def weight_bytes(self, numel: int, rows: int, options) -> dict:
        import torch

        storage = options.bnb_4bit_quant_storage
        itemsize = 1 if storage in ("auto", "uint8") else torch.empty(0, dtype=getattr(torch, storage)).element_size()
        return four_bit_bytes(numel, options.use_bnb_nested_quant, itemsize)

    def roundtrip(self, weight, settings: dict, device=None):
        import bitsandbytes.functional as F
        import torch

        dtype = getattr(torch, settings["weight_dtype"]) if settings.get("weight_dtype") else weight.dtype
        # On `device` when given (the fidelity check's: the result stays there); else where training quantized (the
        # recorded device; unrecorded: the GPU if there is one), the result on the CPU.
        where = device or ("cuda" if torch.cuda.is_available() and settings.get("device_type", "cuda") == "cuda"
                           else "cpu")
        packed, state = F.quantize_4bit(
            weight.to(device=where, dtype=dtype).contiguous(), blocksize=settings.get("blocksize", 64),
            compress_statistics=settings["bnb_4bit_use_double_quant"], quant_type=settings["bnb_4bit_quant_type"],
        )
        result = F.dequantize_4bit(packed, state).float()
        return result if device is not None else result.cpu()

    def dequantize(self, layer):
        import bitsandbytes.functional as F

        return F.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()

    def reference_config(self, settings: dict):
        import torch
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=settings["bnb_4bit_quant_type"],
                                  bnb_4bit_use_double_quant=settings["bnb_4bit_use_double_quant"],
                                  bnb_4bit_compute_dtype=torch.float32)


BACKEND = BitsAndBytes4bit()
