"""What the base looked like during training, saved beside every adapter: `qlora_plugin_quantization.json`.

NF4 quantization is deterministic given the weight, its dtype, the quant type, double quantization and the
blocksize, so `qlora-plugin merge` can rebuild exactly the dequantized weights the adapter was trained against,
provided it knows those settings. Training writes them on every checkpoint save (`checkpoint-N/`) and at the
end of training (`output_dir`, where the final adapter goes); `merge` reads them back with `read_record`.
"""

from __future__ import annotations

import json
import os

from transformers import TrainerCallback

from qlora_plugin.errors import QLoRAPluginError
from qlora_plugin.files import write_json_atomic
from qlora_plugin.plugin.specs import hookimpl
from qlora_plugin.quant.cache import quantized_on
from qlora_plugin.quant.layers import four_bit_layers, quant_state

RECORD_FILE = "qlora_plugin_quantization.json"
RECORD_VERSION = 1


def quantization_record(model) -> dict:
    """The quantization facts of a loaded (possibly PEFT-wrapped) model: `load_in_4bit` false for a 16-bit base."""
    layers = four_bit_layers(model)
    if not layers:
        return {"version": RECORD_VERSION, "load_in_4bit": False}
    state = quant_state(layers[0])  # under FSDP the weight may be a flat view without it
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    config = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})
    return {
        "version": RECORD_VERSION,
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


def read_record(adapter_dir: str) -> dict | None:
    """The record saved beside an adapter, or None when the adapter was not trained with this plugin."""
    path = os.path.join(adapter_dir, RECORD_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError) as err:
        raise QLoRAPluginError(
            f"{path} is not readable JSON ({err}). Delete it to merge with the strategy defaults "
            "(or pass --bnb_4bit_quant_type / --use_bnb_nested_quant), or restore it from the training run."
        ) from None
    if not isinstance(record, dict) or "load_in_4bit" not in record:
        raise QLoRAPluginError(f"{path} has no `load_in_4bit` entry: it was not written by qlora-plugin.")
    return record


class QuantizationRecordCallback(TrainerCallback):
    """Writes `RECORD_FILE` into each `checkpoint-N` folder and into `output_dir` when training ends."""

    def _write(self, folder, state, model):
        if state.is_world_process_zero and model is not None:
            write_json_atomic(os.path.join(folder, RECORD_FILE), quantization_record(model))

    def on_save(self, args, state, control, model=None, **kwargs):
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if os.path.isdir(folder):
            self._write(folder, state, model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._write(args.output_dir, state, model)


@hookimpl
def qlora_trainer_callbacks():
    return [QuantizationRecordCallback()]
