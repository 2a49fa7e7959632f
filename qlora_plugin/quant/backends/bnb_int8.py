"""bitsandbytes 8-bit (LLM.int8(): int8 codes, one fp32 absmax scale per output row, fp16 outlier columns above
`llm_int8_threshold` at matmul time): LoRA on an 8-bit base, `--strategy lora-int8`.

Twice the memory of a 4-bit base and about a quarter of a 16-bit one; the rounding error of each weight is under
half of its row's absmax / 127. What it does not offer: the quantized-base cache (bitsandbytes quantizes 8-bit
weights as they are moved to the device, so there is no serialised 8-bit layout to reuse safely), and the LoftQ
starts (peft's LoftQ corrects 4-bit NF4/FP4 error only), so `init_lora_weights auto` starts from peft's default
here and says so.

On a CPU (bitsandbytes 0.50), loading, training (forward and backward through `Linear8bitLt`, inputs cast to fp16
for the int8 matmul) and dequantizing all run; tests/test_quant_backends.py covers them.
"""

from __future__ import annotations

from qlora_plugin.quant.backends.base import QuantBackend, bitsandbytes_setting

DEFAULT_THRESHOLD = 6.0  # LLM.int8()'s outlier threshold, transformers' default


def _scale(layer):
    """A `Linear8bitLt`'s row scales: on the weight until the first forward moves them onto the layer's state."""
    scale = getattr(layer.weight, "SCB", None)
    return scale if scale is not None else layer.state.SCB


class BitsAndBytesInt8(QuantBackend):
    name = "bnb_int8"
    label = "8-bit"
    article = "an"
    flag = "load_in_8bit"
    strategy = "lora-int8"
    cacheable = False
    loftq = False

    def quantization_config(self, options, runtime, load_dtype):
        self.require()
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=DEFAULT_THRESHOLD)

    def owns_config(self, config) -> bool:
        return bool(bitsandbytes_setting(config, "load_in_8bit") or bitsandbytes_setting(config, "_load_in_8bit"))

    def quantized_layers(self, model) -> list:
        try:
            from bitsandbytes.nn import Linear8bitLt
        except Exception:
            return []
        return [m for m in model.modules() if isinstance(m, Linear8bitLt)]

    def facts(self, model) -> dict:
        layers = self.quantized_layers(model)
        codes = sum(layer.weight.numel() for layer in layers)
        scales = sum(_scale(layer).numel() * _scale(layer).element_size() for layer in layers)
        config = getattr(getattr(model, "config", None), "quantization_config", None)
        return {
            "layers_quantized": len(layers),
            "quant_type": "int8",
            "bits_per_param": 8 * (codes + scales) / max(codes, 1),
            "threshold": float(getattr(config, "llm_int8_threshold", DEFAULT_THRESHOLD)),
            "compute_dtype": str(model.dtype).replace("torch.", ""),  # of everything but the int8 matmuls
            "matmul_dtype": "float16",  # bitsandbytes casts the inputs of every int8 matmul to fp16
            "embeddings_dtype": str(model.get_input_embeddings().weight.dtype).replace("torch.", ""),
        }

    def summary_line(self, q: dict) -> str:
        return (f"8-bit base : {q['layers_quantized']} linear layers in int8 (LLM.int8(), outlier threshold "
                f"{q['threshold']:g}; {q['bits_per_param']:.3f} bits per 8-bit weight: codes and row scales), "
                f"matmuls in {q['matmul_dtype']}, compute {q['compute_dtype']}, embeddings {q['embeddings_dtype']}")

    def record(self, model) -> dict:
        layers = self.quantized_layers(model)
        config = getattr(getattr(model, "config", None), "quantization_config", None)
        config = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})
        return {
            "load_in_4bit": False,
            "load_in_8bit": True,
            "llm_int8_threshold": float(config.get("llm_int8_threshold", DEFAULT_THRESHOLD)),
            # the dtype the base was loaded in (its other weights stay in it; the 8-bit ones go through fp16)
            "weight_dtype": str(model.get_input_embeddings().weight.dtype).replace("torch.", ""),
            "llm_int8_skip_modules": config.get("llm_int8_skip_modules"),
            "layers_quantized": len(layers),
        }

    def weight_bytes(self, numel: int, rows: int, options) -> dict:
        return {"packed": numel, "constants": 4 * rows}  # int8 codes; an fp32 absmax per output row

    def roundtrip(self, weight, settings: dict, device=None):
        import bitsandbytes.functional as F
        import torch

        loaded = weight.to(getattr(torch, settings["weight_dtype"])) if settings.get("weight_dtype") else weight
        codes, scales, _ = F.int8_vectorwise_quant(loaded.to(device or weight.device, torch.float16).contiguous())
        return F.int8_vectorwise_dequant(codes, scales).float()

    def dequantize(self, layer):
        import bitsandbytes.functional as F

        return F.int8_vectorwise_dequant(layer.weight.data, _scale(layer)).float()

    def reference_config(self, settings: dict):
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_8bit=True,
                                  llm_int8_threshold=settings.get("llm_int8_threshold", DEFAULT_THRESHOLD),
                                  llm_int8_skip_modules=settings.get("llm_int8_skip_modules"))


BACKEND = BitsAndBytesInt8()
