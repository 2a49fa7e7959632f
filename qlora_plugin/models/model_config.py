"""A model's `config.json`, read without its weights: what `plan` and `merge` build their meta-device skeletons from."""

from __future__ import annotations

import os

from qlora_plugin.core.errors import QLoRAPluginError


def load_config(model: str, trust_remote_code: bool = False):
    """`config.json` of a local folder or a hub id: nothing else is read or downloaded."""
    from transformers import AutoConfig

    looks_local = os.path.isabs(model) or model.startswith((".", "~")) or os.path.exists(model)
    path = os.path.expanduser(model)
    if looks_local and not os.path.isdir(path):
        raise QLoRAPluginError(f"No such model folder: {model!r}. Pass a folder that holds config.json, or a hub id.")
    if looks_local and not os.path.isfile(os.path.join(path, "config.json")):
        raise QLoRAPluginError(f"{model!r} has no config.json. Pass the folder that holds the model's config.json.")
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as err:
        raise QLoRAPluginError(_unreadable(model, err)) from None


def _unreadable(model: str, err: Exception) -> str:
    """One line for a config that could not be read: the library's reason (its own sentences, ending once), what to
    pass instead, and the custom-code rule only when the reason is custom code or an architecture transformers
    does not know."""
    reason = " ".join(str(err).split()).rstrip(".")
    custom = any(word in reason for word in ("custom code", "trust_remote_code", "model type", "model_type"))
    return (f"Could not read the config of {model!r}: {reason}. Pass a local folder with config.json, or a hub id on "
            "a machine that reaches the Hub." + (
                " Architectures transformers does not ship need custom code: only `plan` runs it, and only with "
                "`--trust-remote-code`; `merge` never does." if custom else ""))
