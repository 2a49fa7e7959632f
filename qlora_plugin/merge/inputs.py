"""The two inputs of `qlora-plugin merge`, checked before anything is written: the LoRA adapter folder and the
base model's safetensors files (a local folder, or a Hub id where the machine reaches a hub).

Every problem becomes a `QLoRAPluginError` that says what was wrong and how to fix it. Only safetensors are read:
pickled `.bin` weights are refused, never unpickled.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from qlora_plugin.core.errors import QLoRAPluginError
from qlora_plugin.quant.backends import NONE, registered

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja",
                   "chat_template.json")
HUB_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json",
                *TOKENIZER_FILES]

# LoraConfig features whose merge is not plain `W + scale * B @ A`, and what to do instead.
UNSUPPORTED = {
    "lora_bias": "LoRA with `lora_bias=True`",
    "layer_replication": "`layer_replication`",
    "target_parameters": "`target_parameters` (LoRA on raw parameters)",
    "trainable_token_indices": "`trainable_token_indices`",
    "use_qalora": "QALoRA",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "use_bdlora": "BD-LoRA",
}


@dataclass
class Adapter:
    """A LoRA adapter as saved by peft: its config and tensors, keyed by the base model's names."""

    folder: str
    config: dict
    lora: dict = field(default_factory=dict)  # module name -> {"A", "B", "magnitude", "embedding": bool}
    replacements: dict = field(default_factory=dict)  # full tensors (modules_to_save, biases) by parameter name

    @property
    def base_name(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    def scaling(self, module: str) -> float:
        """peft's scale for one module: alpha / r (alpha / sqrt(r) with rslora), honouring rank/alpha patterns."""
        from peft.utils.other import get_pattern_key

        c = self.config
        r = (c.get("rank_pattern") or {}).get(get_pattern_key((c.get("rank_pattern") or {}).keys(), module), c["r"])
        alpha_pattern = c.get("alpha_pattern") or {}
        alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), c["lora_alpha"])
        return alpha / r**0.5 if c.get("use_rslora") else alpha / r


def _check_config(config: dict, path: str) -> None:
    if config.get("peft_type") != "LORA":
        raise QLoRAPluginError(
            f"{path} describes a {config.get('peft_type')!r} adapter; merge handles LoRA adapters (peft_type LORA)."
        )
    for key, what in UNSUPPORTED.items():
        if config.get(key) not in (None, False, {}, []):
            raise QLoRAPluginError(
                f"The adapter uses {what}, which `qlora-plugin merge` does not merge. Load it with peft instead "
                "(`PeftModel.from_pretrained`), or retrain without it."
            )
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)) or config[key] <= 0:
            raise QLoRAPluginError(f"{path}: `{key}` must be a positive number; got {config.get(key)!r}.")


def load_adapter(folder: str) -> Adapter:
    """Read and check an adapter folder (adapter_config.json + adapter_model.safetensors)."""
    if not os.path.isdir(folder):
        raise QLoRAPluginError(
            f"Adapter folder {folder!r} does not exist. Pass the `output_dir` (or a `checkpoint-N` folder inside "
            "it) of a training run with --adapter."
        )
    config_path = os.path.join(folder, ADAPTER_CONFIG)
    weights_path = os.path.join(folder, ADAPTER_WEIGHTS)
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise QLoRAPluginError(
                f"{folder!r} is not a LoRA adapter folder: {os.path.basename(path)} is missing. Pass the folder "
                "that peft's `save_pretrained` wrote (it holds adapter_config.json and adapter_model.safetensors)."
            )
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as err:
        raise QLoRAPluginError(f"{config_path} is not readable JSON ({err}); the adapter folder is damaged.") from None
    if not isinstance(config, dict):
        raise QLoRAPluginError(f"{config_path} is not a peft adapter config (a JSON object).")
    _check_config(config, config_path)
    try:
        from safetensors.torch import load_file

        tensors = load_file(weights_path)
    except Exception as err:  # safetensors raises its own error type for a truncated or garbled file
        raise QLoRAPluginError(
            f"{weights_path} is corrupt or truncated ({err}). Copy it again from the training run, or use a "
            "`checkpoint-N` folder saved earlier."
        ) from None
    return _sort_tensors(Adapter(folder, config), tensors)


def _sort_tensors(adapter: Adapter, tensors: dict) -> Adapter:
    parts = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_embedding_A": "A", ".lora_embedding_B": "B",
             ".lora_magnitude_vector": "magnitude"}
    for key, tensor in tensors.items():
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        suffix = next((s for s in parts if name.endswith(s)), None)
        if suffix is None:
            if ".lora_" in name:
                raise QLoRAPluginError(f"Adapter tensor {key!r} is of a LoRA kind merge does not handle.")
            adapter.replacements[name] = tensor
            continue
        entry = adapter.lora.setdefault(name[: -len(suffix)], {"embedding": False})
        entry[parts[suffix]] = tensor
        entry["embedding"] |= "embedding" in suffix
    for module, entry in adapter.lora.items():
        if "A" not in entry or "B" not in entry:
            raise QLoRAPluginError(f"The adapter has only half of the LoRA pair for {module!r}; it is damaged.")
        if entry.get("magnitude") is not None and entry["embedding"]:
            raise QLoRAPluginError(
                f"DoRA on the embedding {module!r} is not supported by merge (DoRA on linear layers is)."
            )
    return adapter


@dataclass
class BaseCheckpoint:
    """A base model folder: its safetensors files and which file holds each tensor."""

    folder: str
    files: dict  # tensor name -> file name (relative to folder)


def resolve_base(name: str) -> BaseCheckpoint:
    """A local folder as is; anything else is tried as a Hub id (safetensors, config and tokenizer only)."""
    folder = name if os.path.isdir(name) else _download(name)
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise QLoRAPluginError(f"Base model folder {folder!r} has no config.json; pass a transformers model folder.")
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            return BaseCheckpoint(folder, dict(json.load(f)["weight_map"]))
    shards = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
    if not shards:
        pickled = [n for n in os.listdir(folder) if n.endswith((".bin", ".pt", ".pth"))]
        hint = (
            f" It has only pickled PyTorch weights ({', '.join(pickled)}), which merge never unpickles. Convert "
            "them once with transformers (it loads them with weights_only=True): `AutoModelForCausalLM."
            "from_pretrained(BASE).save_pretrained(NEW_FOLDER)` writes safetensors; then pass --base NEW_FOLDER."
            if pickled else ""
        )
        raise QLoRAPluginError(f"Base model folder {folder!r} has no .safetensors weights.{hint}")
    files = {}
    for shard in shards:
        with _open(os.path.join(folder, shard)) as f:
            files.update({key: shard for key in f.keys()})
    return BaseCheckpoint(folder, files)


def _open(path):
    from safetensors import safe_open

    try:
        return safe_open(path, framework="pt")
    except Exception as err:
        raise QLoRAPluginError(f"Base weights {path} are corrupt or truncated ({err}).") from None


def open_base_file(base: BaseCheckpoint, file: str):
    return _open(os.path.join(base.folder, file))


def _download(name: str) -> str:
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name, allow_patterns=HUB_PATTERNS)
    except Exception as err:
        raise QLoRAPluginError(
            f"Base model {name!r} is not a local folder and could not be fetched from the Hub "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). Pass --base with the "
            "folder of the model the adapter was trained on."
        ) from None


RECORD_VALUES = {  # what a `qlora_plugin_quantization.json` may hold, key by key (None: absent or null is fine)
    "load_in_4bit": ((True, False), "true or false"),
    "bnb_4bit_quant_type": (("nf4", "fp4"), "nf4 or fp4"),
    "bnb_4bit_use_double_quant": ((True, False), "true or false"),
    "blocksize": ((32, 64, 128, 256, 512, 1024, 2048, 4096), "a power of two from 32 to 4096 (bitsandbytes' blocks)"),
    "weight_dtype": ((None, "float32", "float16", "bfloat16"), "float32, float16, bfloat16 or null"),
    "device_type": ((None, "cuda", "cpu", "xpu", "mps", "hpu", "npu"), "the device type it was quantized on"),
}


def check_record(record: dict, path: str) -> None:
    """Refuse a quantization record merge could not rebuild the base from (hand-edited or written by something
    else), naming the key, before anything is written."""
    backend = record.get("quant_backend")
    if backend is not None and backend not in (*registered(), NONE):
        raise QLoRAPluginError(
            f"{path}: `quant_backend` is {backend!r}, which merge cannot rebuild a base from; it must be one of "
            f"{', '.join([*registered(), NONE])}. Restore the file from the training run."
        )
    if record.get("load_in_4bit") is False and backend in (None, NONE):
        return  # a 16-bit base: no setting to rebuild
    for key, (allowed, what) in RECORD_VALUES.items() if record.get("load_in_4bit") is not False else ():
        value = record.get(key)
        if (key not in ("weight_dtype", "device_type") or value is not None) and not any(
                value is a or (type(value) is type(a) and value == a) for a in allowed):
            raise QLoRAPluginError(
                f"{path}: `{key}` is {value!r}, which merge cannot rebuild a base from; it must be {what}. Restore "
                "the file from the training run, or delete it and pass --trained_on with the settings training used."
            )
    for key in ("layers_4bit", "layers_quantized"):
        layers = record.get(key)
        if layers is not None and (type(layers) is not int or layers < 0):
            raise QLoRAPluginError(f"{path}: `{key}` is {layers!r}; it must be a whole number of layers.")
    skip = record.get("llm_int8_skip_modules")
    if skip is not None and not (isinstance(skip, list) and all(isinstance(m, str) for m in skip)):
        raise QLoRAPluginError(f"{path}: `llm_int8_skip_modules` is {skip!r}; it must be a list of module names.")
