"""A hook file for `examples/bench/gpu_smoke.py`: what a run's trainer held when training ended, as JSON.

    python -m trl.scripts.sft ... --strategy qlora --qlora_hooks examples/bench/gpu_smoke_probe.py   (SMOKE_PROBE=out.json)

Writes the optimizer class, how many optimizer-state tensors are paged (bitsandbytes' CUDA unified memory), the
dtypes and device of the trainable parameters, the CUDA allocator's peaks and the CUDA context's size.
"""

import json
import os

from transformers import TrainerCallback

from qlora_plugin import hookimpl


class SmokeProbe(TrainerCallback):
    context_bytes = None

    def on_train_begin(self, args, state, control, **kwargs):
        """The CUDA context (driver, kernels, cuBLAS workspace), measured inside the training process: what the
        device uses beyond what torch's allocator reserved (other processes' memory counts too: none here)."""
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            free, total = torch.cuda.mem_get_info()
            self.context_bytes = int(total - free - torch.cuda.memory_reserved())

    def on_train_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        import torch

        inner = getattr(optimizer, "optimizer", optimizer)
        states = [v for s in getattr(inner, "state", {}).values() for v in s.values() if torch.is_tensor(v)]
        trainable = [p for p in model.parameters() if p.requires_grad] if model is not None else []
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        probe = {
            "optimizer": type(inner).__name__,
            "state_tensors": len(states),
            "paged_state_tensors": sum(bool(getattr(v, "is_paged", False)) for v in states),
            "trainable_dtypes": sorted({str(p.dtype).replace("torch.", "") for p in trainable}),
            "trainable_device": str(trainable[0].device) if trainable else None,
            "mixed_precision": getattr(args, "mixed_precision", None),
            "max_memory_reserved": int(torch.cuda.max_memory_reserved()) if cuda else None,
            "max_memory_allocated": int(torch.cuda.max_memory_allocated()) if cuda else None,
            "global_step": state.global_step,
            "context_bytes": self.context_bytes,
        }
        if state.is_world_process_zero:
            with open(os.environ["SMOKE_PROBE"], "w", encoding="utf-8") as f:
                json.dump(probe, f, indent=2)


@hookimpl
def qlora_trainer_callbacks():
    return [SmokeProbe()] if os.environ.get("SMOKE_PROBE") else []
