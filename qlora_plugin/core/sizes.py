"""Memory sizes as people write them: `48GB` (10^9), `80GiB` (2^30), `48` (GB), or a GPU's name (`a100-80gb`)."""

from __future__ import annotations

import re

from qlora_plugin.core.errors import QLoRAPluginError

GIB = 2**30
# Usable memory of common GPUs (what the driver reports, binary units).
NAMED_GPUS = {"t4": 15 * GIB, "l4": 22 * GIB, "rtx4090": 24 * GIB, "a10": 24 * GIB, "v100-32gb": 32 * GIB,
              "a100-40gb": 40 * GIB, "a6000": 48 * GIB, "l40s": 48 * GIB, "a100-80gb": 80 * GIB,
              "h100-80gb": 80 * GIB, "h200": 141 * GIB}
UNITS = {"": 10**9, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20,
         "gib": 2**30, "tib": 2**40, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_memory(text: str, flag: str = "--gpu-memory") -> int:
    """Bytes in `text`; `flag` names the option in the error message."""
    name = str(text).strip().lower()
    if name in NAMED_GPUS:
        return NAMED_GPUS[name]
    match = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([a-z]*)", name)
    if not match or match.group(2) not in UNITS or float(match.group(1)) <= 0:
        raise QLoRAPluginError(
            f"`{flag} {text}` is not a size. Use e.g. 48GB, 80GiB, or one of: {', '.join(NAMED_GPUS)}."
        )
    return int(float(match.group(1)) * UNITS[match.group(2)])
