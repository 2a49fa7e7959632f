"""The calibrated LoftQ start, cached: a later run with the same 4-bit base, adapter and first training batches loads
it instead of computing it again (the calibration passes and the SVDs: about 25 s on the 1.1B benchmark model on a
2-core CPU, against a start of about 23 s without them).

When: the common loop of re-running one script on one dataset with other hyperparameters (learning rate, steps,
schedule) that leave the start as it was. Only for a base loaded from the quantized-base cache (`quantized_cache`):
that entry's key (the base's files and the quantization settings) is what identifies the weights.

Key: SHA-256 of that entry, the adapter's layers, ranks, scalings and shapes, the calibration batches' tokens, the
start's constants and the torch, peft and bitsandbytes versions. One safetensors file per key, beside the cached
bases, written to a temporary file and renamed: a reader never sees half of one, and a failed read or write only
means computing the start.

Checked when read: the file records the SHA-256 of its tensors' bytes, and every value must be finite (a start of
NaN trained to `loss 0`, `grad_norm nan` and an all-NaN adapter). A file that fails either is removed with a
warning naming it, and the start is computed again; a start that is not finite is never stored. The cost is one
pass over the adapter (megabytes: milliseconds).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

from qlora_plugin.core.files import atomic_path
from qlora_plugin.quant.cache import cache_root, cached_entry

logger = logging.getLogger(__name__)

FORMAT = 2  # 2: the file records its tensors' digest
FOLDER = "lora-starts"


def _digest(tensors: dict) -> str:
    """SHA-256 of the tensors' names, dtypes, shapes and bytes, in name order."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _not_finite(tensors: dict) -> str | None:
    """The first tensor holding a NaN or an infinity, or None."""
    import torch

    return next((name for name in sorted(tensors) if not bool(torch.isfinite(tensors[name]).all())), None)


def _adapter_parameters(model, adapter: str) -> dict:
    return {name: param for name, param in model.named_parameters()
            if f".lora_A.{adapter}." in name or f".lora_B.{adapter}." in name}


def start_key(model, batches, constants: dict, adapter: str = "default") -> str | None:
    """The cache key of this run's calibrated start; None when the base was not loaded from the quantized cache."""
    import bitsandbytes
    import peft
    import torch

    entry = cached_entry(model)
    if entry is None:
        return None
    layers = [(name, module.r[adapter], float(module.scaling[adapter]))
              for name, module in model.named_modules() if hasattr(module, "lora_A") and adapter in module.lora_A]
    shapes = [(name, tuple(param.shape), str(param.dtype)) for name, param in _adapter_parameters(model, adapter).items()]
    digest = hashlib.sha256(json.dumps({
        "format": FORMAT, "base": os.path.basename(entry), "layers": layers, "shapes": shapes, "constants": constants,
        "versions": [torch.__version__, peft.__version__, bitsandbytes.__version__],
    }, sort_keys=True).encode())
    for batch in batches:
        for key in sorted(batch):
            value = batch[key]
            if isinstance(value, torch.Tensor) and key in ("input_ids", "attention_mask", "position_ids"):
                digest.update(key.encode())
                digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _path(key: str) -> str:
    return os.path.join(cache_root(), FOLDER, f"{key}.safetensors")


def load_start(model, key: str, adapter: str = "default") -> dict | None:
    """Fill the adapter from the cached start and return its facts; None (adapter untouched) on a miss."""
    from safetensors import safe_open

    path = _path(key)
    if not os.path.isfile(path):
        return None
    params = _adapter_parameters(model, adapter)
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            facts = json.loads(metadata["facts"])
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as err:  # noqa: BLE001 - an unreadable entry is a miss, whatever broke it
        return _discard(path, f"unreadable: {type(err).__name__}: {err}")
    if metadata.get("sha256") != _digest(tensors):
        return _discard(path, "its tensors differ from what was written (SHA-256)")
    bad = _not_finite(tensors)
    if bad is not None:
        return _discard(path, f"{bad} holds NaN or infinite values")
    if tensors.keys() != params.keys() or any(tensors[n].shape != p.shape for n, p in params.items()):
        return None
    for name, param in params.items():
        param.data.copy_(tensors[name].to(param.dtype))
    return facts


def _discard(path: str, why: str):
    """Remove a bad cached start (the cache's own file) and say so; the start is then computed again."""
    logger.warning("The cached LoRA start %s is damaged (%s); removing it and computing the start again.", path, why)
    try:
        os.unlink(path)
    except OSError:
        pass
    return None


def save_start(model, key: str, facts: dict, adapter: str = "default") -> None:
    """Store the adapter's start under `key`; a cache that cannot be written is skipped with a note in the log, a
    start that is not finite is not stored."""
    from safetensors.torch import save_file

    tensors = {name: param.detach().cpu().contiguous() for name, param in _adapter_parameters(model, adapter).items()}
    bad = _not_finite(tensors)
    if bad is not None:
        logger.warning("The calibrated LoRA start is not cached: %s holds NaN or infinite values.", bad)
        return
    try:
        with atomic_path(_path(key), ".safetensors") as tmp:
            save_file(tensors, tmp, metadata={"facts": json.dumps(facts), "sha256": _digest(tensors)})
    except OSError as err:
        logger.info("The calibrated LoRA start was not cached (%s).", err)
