"""Which quantized-base cache entry a loaded model came from, and the device that quantized it.

Apart from `quant/cache.py` so that what a loaded model records (`quant/backends/bnb_4bit.py`, the record beside
every adapter) can ask it without importing the cache itself.
"""

from __future__ import annotations

import json
import os
import weakref

ENTRY_FILE = "qlora_plugin_cache.json"
_loaded_from: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> the cache entry it came from


def cached_entry(model) -> str | None:
    """The cache entry a (possibly PEFT-wrapped) model was loaded from; None if it was not loaded from the cache."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return _loaded_from.get(base)


def quantized_on(model) -> str | None:
    """The device kind that quantized a (possibly PEFT-wrapped) model loaded from the cache; None otherwise.
    Entries made before the device was recorded were all quantized on the CPU."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    entry = _loaded_from.get(base)
    if entry is None:
        return None
    try:
        with open(os.path.join(entry, ENTRY_FILE), encoding="utf-8") as f:
            return json.load(f)["settings"].get("device", "cpu")
    except (OSError, ValueError, KeyError):
        return None
