"""What the strategy needs to know about where it runs: device, native bf16, distributed engine, rank.

Read from accelerate's `PartialState` (never by re-parsing launcher variables ourselves), once per trainer.

"Native bf16" means the hardware multiplies bf16: on CUDA, compute capability 8.0 (Ampere) or newer.
`torch.cuda.is_bf16_supported()` also says yes on a T4 or V100, where bf16 is emulated (it only checks that a
bf16 tensor can be made, torch/cuda/__init__.py); the strategy computes in fp16 there instead (`half_dtype`).
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Runtime:
    device_type: str  # "cpu", "cuda", "xpu", "mps"
    bf16_native: bool
    engine: Literal["none", "ddp", "fsdp", "deepspeed_zero3", "deepspeed"]
    process_index: int = 0
    num_processes: int = 1
    capability: tuple | None = None  # CUDA compute capability (major, minor), when on CUDA
    # The index of the accelerator accelerate gave this process (`PartialState().device.index`): the local rank
    # modulo the devices this process sees, so 0 where each process sees one GPU (Slurm, Kubernetes).
    device_index: int = 0

    @property
    def device(self) -> str:
        """This process's device as torch names it: "cuda:1", or "cpu"."""
        return "cpu" if self.device_type == "cpu" else f"{self.device_type}:{self.device_index}"

    @property
    def half_dtype(self) -> str | None:
        """The 16-bit dtype this device computes in natively: bfloat16 where it has bf16, float16 on CUDA GPUs
        without it (pre-Ampere: T4, V100), None where neither is fast (CPUs without bf16: fp32)."""
        if self.bf16_native:
            return "bfloat16"
        return "float16" if self.device_type == "cuda" else None

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


def cuda_bf16_native(capability) -> bool:
    """bf16 in hardware on this CUDA device: ROCm, or compute capability 8.0+ (what
    `torch.cuda.is_bf16_supported(including_emulation=False)` tests, without needing torch >= 2.5 for the flag)."""
    import torch

    return bool(torch.version.hip) or tuple(capability) >= (8, 0)


def detect_runtime() -> Runtime:
    """Inspect accelerate's process state; safe to call before or after the Trainer creates it."""
    import torch
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    state = PartialState()
    device_type = state.device.type
    capability = None
    if device_type == "cuda":
        capability = tuple(torch.cuda.get_device_capability(state.device))
        bf16 = cuda_bf16_native(capability)
    elif device_type == "cpu":
        bf16 = cpu_has_native_bf16()
    else:
        bf16 = device_type in ("xpu", "mps")
    engine = "none"
    dist = state.distributed_type
    if dist == DistributedType.FSDP:
        engine = "fsdp"
    elif dist == DistributedType.DEEPSPEED:
        engine = "deepspeed_zero3" if deepspeed_zero3_requested() else "deepspeed"
    elif state.num_processes > 1:
        engine = "ddp"
    return Runtime(device_type, bf16, engine, state.local_process_index, state.num_processes, capability,
                   state.device.index or 0)


ZERO_STAGE_ENV = "ACCELERATE_DEEPSPEED_ZERO_STAGE"  # set by `accelerate launch` from its DeepSpeed config


def deepspeed_zero3_requested() -> bool:
    """ZeRO-3 is on: transformers' `HfDeepSpeedConfig` says so (it exists once training arguments are built), or
    the launcher's environment does, which a script that calls `from_pretrained` before building its arguments
    already has."""
    import os

    if os.environ.get(ZERO_STAGE_ENV, "").strip() == "3":
        return True
    from accelerate.utils import is_deepspeed_available

    if not is_deepspeed_available():
        return False
    from transformers.integrations import is_deepspeed_zero3_enabled

    return bool(is_deepspeed_zero3_enabled())
