"""What the strategy needs to know about where it runs: device, native bf16, distributed engine, rank.

Read from accelerate's `PartialState` (never by re-parsing launcher variables ourselves), once per trainer.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass

ENGINES = ("none", "ddp", "fsdp", "deepspeed_zero3", "deepspeed")


@dataclass(frozen=True)
class Runtime:
    device_type: str  # "cpu", "cuda", "xpu", "mps"
    bf16_native: bool
    engine: str  # one of ENGINES
    process_index: int = 0
    num_processes: int = 1

    @property
    def shards_parameters(self) -> bool:
        """FSDP and ZeRO-3 flatten parameters: 4-bit storage must then match the model dtype."""
        return self.engine in ("fsdp", "deepspeed_zero3")


def cpu_has_native_bf16() -> bool:
    """True where the CPU multiplies bf16 in hardware (AVX512-BF16 / AMX on x86, BF16 on Arm)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
    except OSError:
        return platform.machine() == "arm64"  # Apple silicon M2+ and macOS: bf16 is native
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16", " bf16"))


def detect_runtime() -> Runtime:
    """Inspect accelerate's process state; safe to call before or after the Trainer creates it."""
    import torch
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    state = PartialState()
    device_type = state.device.type
    if device_type == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
    elif device_type == "cpu":
        bf16 = cpu_has_native_bf16()
    else:
        bf16 = device_type in ("xpu", "mps")
    engine = "none"
    dist = state.distributed_type
    if dist == DistributedType.FSDP:
        engine = "fsdp"
    elif dist == DistributedType.DEEPSPEED:
        from accelerate.utils import is_deepspeed_available

        engine = "deepspeed"
        if is_deepspeed_available():
            from transformers.integrations import is_deepspeed_zero3_enabled

            if is_deepspeed_zero3_enabled():
                engine = "deepspeed_zero3"
    elif state.num_processes > 1:
        engine = "ddp"
    return Runtime(device_type, bf16, engine, state.local_process_index, state.num_processes)
