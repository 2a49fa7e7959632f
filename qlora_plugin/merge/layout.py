"""The model as training built it, in its parameter names: which weights were quantized, stored transposed or tied.

Its own module because both the merge (`merging`) and the block-by-block fidelity check (`block_check`) read it, and
the check runs inside the merge.
"""

from __future__ import annotations

from dataclasses import dataclass

from qlora_plugin.core.errors import QLoRAPluginError
from qlora_plugin.merge.classifier import model_class
from qlora_plugin.quant.backends import backend_named


@dataclass
class Layout:
    """The model as training built it, in the model's parameter names."""

    params: set  # every parameter name
    quantized: set  # weights training held in 4-bit
    conv1d: set  # weights stored (in, out): GPT-2's Conv1D
    tied: dict  # tied parameter -> the parameter it shares
    prefix: str  # base_model_prefix (checkpoints may omit it)

    def name(self, key: str) -> str:
        """A checkpoint key as the model's parameter name."""
        if key in self.params or not self.prefix or f"{self.prefix}.{key}" not in self.params:
            return key
        return f"{self.prefix}.{key}"


def model_layout(config, settings: dict | None) -> Layout:
    """Build an empty copy of the model; the 4-bit layers are the ones transformers' bitsandbytes rule picks."""
    import torch
    from transformers.pytorch_utils import Conv1D

    try:
        with torch.device("meta"):
            model = model_class(config).from_config(config)  # a causal LM, or a reward model's classifier
    except (ValueError, KeyError) as err:
        raise QLoRAPluginError(f"transformers cannot build a causal LM from this config ({err}).") from None
    conv1d = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, Conv1D)}
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    quantized = set()
    if settings is not None:
        quantized = {f"{n}.weight" for n in backend_named(settings.get("quant_backend") or "bnb_4bit").quantized_module_names(
            model, settings.get("llm_int8_skip_modules"))}
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    return Layout(params, quantized, conv1d, tied, getattr(model, "base_model_prefix", ""))
