"""What the base looked like during training, saved beside every adapter: `qlora_plugin_quantization.json`.

Quantization is deterministic given the weight, its dtype and the backend's settings (NF4: the quant type, double
quantization and the blocksize; int8: the fp16 cast), so `qlora-plugin merge` can rebuild exactly the dequantized
weights the adapter was trained against, provided it knows those settings. Training writes them on every
checkpoint save (`checkpoint-N/`) and at the end of training (`output_dir`, where the final adapter goes); `merge` reads them back with `read_record`.
"""

from __future__ import annotations

import json
import os

from transformers import TrainerCallback

from qlora_plugin.core.errors import QLoRAPluginError
from qlora_plugin.core.files import write_json_atomic
from qlora_plugin.plugin.specs import hookimpl
from qlora_plugin.quant.backends import NONE, backend_of_model

RECORD_FILE = "qlora_plugin_quantization.json"
RECORD_VERSION = 1


def quantization_record(model) -> dict:
    """The quantization facts of a loaded (possibly PEFT-wrapped) model, as its backend records them
    (`quant/backends/`): `load_in_4bit` false and `quant_backend` none for a 16-bit base."""
    backend = backend_of_model(model)
    if backend is None:
        return {"version": RECORD_VERSION, "load_in_4bit": False, "quant_backend": NONE}
    return {"version": RECORD_VERSION, **backend.record(model), "quant_backend": backend.name}


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
