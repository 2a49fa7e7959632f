"""Checks of the accelerate configuration a sharded job was launched with, for the settings QLoRA needs.

The strategy adapts what it controls (quant storage = model dtype, no fp32 upcast, reentrant checkpointing for
ZeRO-3, no device map); what only the launcher controls is checked here, from the variables `accelerate launch`
exports, and reported as warnings that say which key to change (see examples/accelerate/).
"""

from __future__ import annotations

import os

from qlora_plugin.ecosystem.runtime import Runtime


def _flag(name: str, default: str = "") -> str:
    return os.environ.get(name, default).strip().lower()


def engine_warnings(runtime: Runtime, optim: str) -> list[str]:
    """Launcher settings that break or waste QLoRA under this engine, each with its fix; empty when all is well."""
    found = []
    if runtime.engine == "fsdp":
        if _flag("FSDP_USE_ORIG_PARAMS") == "true":
            found.append("FSDP with 4-bit weights needs `fsdp_use_orig_params: false` in the accelerate config")
        if _flag("FSDP_CPU_RAM_EFFICIENT_LOADING") != "true":
            found.append("set `fsdp_cpu_ram_efficient_loading: true` (and `fsdp_sync_module_states: true`) in the "
                         "accelerate config: otherwise every rank loads the whole model into CPU memory")
        if optim == "paged_adamw_8bit":
            found.append("paged_adamw_8bit fails when FSDP saves a checkpoint; use paged_adamw_32bit (the default)")
    if runtime.engine == "deepspeed_zero3" and _flag("ACCELERATE_DEEPSPEED_ZERO3_INIT") not in ("", "true"):
        found.append("ZeRO-3 + QLoRA needs `zero3_init_flag: true` in the accelerate config")
    return found
