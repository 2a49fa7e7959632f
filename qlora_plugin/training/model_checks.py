"""Before a strategy loads a model: refuse folders that cannot work, in plain words, before any weights are read.

Also the security rule: a config with `auto_map` needs custom code (`trust_remote_code`), which only the user
may allow. The plugin never turns it on; it refuses such a model unless the user passed `--trust_remote_code`.
`load_error` turns transformers' loading errors for Hub ids (where nothing can be checked beforehand) into the
same kind of message.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from qlora_plugin.core.errors import QLoRAPluginError
from qlora_plugin.quant.backends import backend_of_config

FOLDER_HINT = "Pass a folder written by `save_pretrained` (config.json + *.safetensors), or a Hub model id."


def check_model_argument(model) -> None:
    """`SFTTrainer(model=...)` under a strategy: a model id or folder (a string), or an already loaded model."""
    if isinstance(model, str) or hasattr(model, "config"):
        return
    raise QLoRAPluginError(
        f"`model` must be a model id or folder (a string) for the strategy to load, or a loaded transformers model; "
        f"got {model!r}."
    )


def looks_like_path(model_id: str) -> bool:
    """A Hub id is `name` or `org/name`; anything else that does not exist was meant as a local folder."""
    return (os.path.isabs(model_id) or model_id.startswith((".", "~")) or model_id.count("/") > 1
            or "\\" in model_id)


def check_model_source(model_id: str, backend, trust_remote_code: bool) -> None:
    """Check a local model folder's config.json; a Hub id is left to transformers (see `load_error`)."""
    path = Path(model_id).expanduser()
    if not path.exists():
        if looks_like_path(model_id):
            raise QLoRAPluginError(f"Model folder {model_id!r} does not exist. {FOLDER_HINT}")
        return
    if not path.is_dir():
        raise QLoRAPluginError(f"Model {model_id!r} is a file, not a model folder. {FOLDER_HINT}")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise QLoRAPluginError(f"Model folder {model_id!r} has no config.json. {FOLDER_HINT}")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise QLoRAPluginError(f"{config_file} is not valid JSON ({err}). {FOLDER_HINT}") from None
    if not isinstance(config, dict):
        raise QLoRAPluginError(f"{config_file} must hold a JSON object. {FOLDER_HINT}")
    check_config(config, model_id, backend, trust_remote_code)


def check_config(config: dict, model_id: str, backend, trust_remote_code: bool) -> None:
    """Custom code, unknown architectures and checkpoints quantized in a way the strategy cannot train."""
    auto_map = config.get("auto_map")
    if auto_map and not trust_remote_code:
        code = sorted({str(v).split(".")[0] + ".py" for v in (auto_map.values() if isinstance(auto_map, dict) else [])
                       if isinstance(v, str)})
        raise QLoRAPluginError(
            f"The model {model_id!r} needs custom code to load (config.json has `auto_map`: {', '.join(code)}). "
            "qlora-plugin never turns on `trust_remote_code`. Read that code; if you trust it, pass "
            "`--trust_remote_code` yourself (`SFTConfig(trust_remote_code=True)` in Python)."
        )
    if not auto_map:
        from transformers import CONFIG_MAPPING

        model_type = config.get("model_type")
        if model_type is not None and model_type not in CONFIG_MAPPING:  # missing: transformers guesses from the path
            import transformers

            raise QLoRAPluginError(
                f"The model {model_id!r} has model_type {model_type!r}, which transformers {transformers.__version__} "
                "does not know. Upgrade transformers, or fix `model_type` in config.json (e.g. llama, mistral, qwen2)."
            )
    quant = config.get("quantization_config")
    if not quant:
        return
    method = quant.get("quant_method", "unknown") if isinstance(quant, dict) else "unknown"
    theirs = backend_of_config(quant) if isinstance(quant, dict) else None
    if theirs is not None and theirs is backend:
        return  # a checkpoint pre-quantized by the run's own backend: transformers loads it as it is
    kind = f"{theirs.library} {theirs.label}" if theirs else method
    wanted = (f"quantizes a 16/32-bit checkpoint to {backend.label} itself" if backend
              else "trains a 16-bit base; use `--strategy qlora` for a 4-bit checkpoint")
    raise QLoRAPluginError(
        f"The model {model_id!r} is already quantized ({kind}, see `quantization_config` in config.json); the "
        f"strategy {wanted}. Pass the original, unquantized checkpoint."
    )


def check_causal_lm(model_id: str) -> None:
    """Refuse, before any weight is read, a model SFT's causal path cannot train: a sequence-to-sequence
    (encoder-decoder) model or a masked (encoder-only) one. TRL loads `config.architectures[0]`, so such a model
    would be loaded and quantized, and training would fail at its first step.

    The config is read with `AutoConfig` (never running custom code: a config that needs it, or a Hub id that
    cannot be reached, is left to the loader, which says what is wrong)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_id, trust_remote_code=False)
    except (OSError, ValueError, KeyError):
        return
    architecture = (getattr(config, "architectures", None) or ["?"])[0]
    kind = f"{architecture}, model_type {getattr(config, 'model_type', '?')!r}"
    if getattr(config, "is_encoder_decoder", False):
        raise QLoRAPluginError(
            f"The model {model_id!r} is a sequence-to-sequence (encoder-decoder) model ({kind}). SFTTrainer trains "
            "causal (decoder-only) language models; this one would be quantized and then fail at the first step. "
            "Fine-tune it with transformers' Seq2SeqTrainer and a peft LoraConfig(task_type='SEQ_2_SEQ_LM') "
            "(BitsAndBytesConfig for a 4-bit base), or pick a causal model for SFT."
        )
    if architecture.endswith("ForMaskedLM"):
        raise QLoRAPluginError(
            f"The model {model_id!r} is a masked (encoder-only) language model ({kind}), which cannot generate text. "
            "SFTTrainer trains causal (decoder-only) language models: pick one (e.g. Llama, Qwen, SmolLM2), or train "
            "this one with transformers' Trainer for its own task."
        )


def load_error(model_id: str, err: Exception) -> QLoRAPluginError | None:
    """A user-facing error for what transformers raised while loading `model_id`, or None if it is not one."""
    if isinstance(err, QLoRAPluginError):
        return None
    text = str(err)
    if "trust_remote_code" in text:
        return QLoRAPluginError(
            f"The model {model_id!r} needs custom code to load. qlora-plugin never turns on `trust_remote_code`. "
            "Read that code; if you trust it, pass `--trust_remote_code` yourself."
        )
    if isinstance(err, OSError) or "does not recognize this architecture" in text or "Unrecognized model" in text:
        return QLoRAPluginError(f"Could not load the model {model_id!r}: {text} {FOLDER_HINT}")
    return None
