"""Stop a run whose loss or gradient norm is not finite, at the first logged step, with one line.

Why: without it a run that goes NaN keeps stepping, saves an all-NaN adapter and ends with "Training completed".
Trainer's `logging_nan_inf_filter` (on by default) even shows a NaN step's loss as 0, so the log looks healthy; the
gradient norm (`grad_norm nan`) and the trainable weights do not lie.

When: at every log (`logging_steps`), for every strategy: the logged loss and gradient norm, and the trainable
parameters (the adapter: a pass over a few megabytes), must be finite. The error names the step and the value, ends
the script like any user error (one line, no traceback), and nothing more is saved.

Under fp16 loss scaling an overflowing step's gradient norm is infinite and the scaler skips that step (its usual
first steps, while the scale comes down): that alone does not stop the run; `FP16_OVERFLOW_LOGS` logs in a row do
(16 halvings take the scaler's initial 2^16 scale to 1: past that, the gradients are not finite at any scale).
"""

from __future__ import annotations

import math

from transformers import TrainerCallback

from qlora_plugin.core.errors import QLoRAPluginError
from qlora_plugin.plugin.specs import hookimpl

WATCHED = ("loss", "grad_norm")
FP16_OVERFLOW_LOGS = 17


def _not_finite(logs: dict) -> dict:
    bad = {}
    for key in WATCHED:
        value = logs.get(key)
        try:
            if value is not None and not math.isfinite(float(value)):
                bad[key] = value
        except (TypeError, ValueError):
            continue
    return bad


def _first_non_finite_parameter(model) -> str | None:
    import torch

    if model is None:
        return None
    for name, param in model.named_parameters():
        if param.requires_grad and not bool(torch.isfinite(param.detach()).all()):
            return name
    return None


class StopOnNonFinite(TrainerCallback):
    """Raises `QLoRAPluginError` at the first log where the loss, the gradient norm or a trainable weight is NaN
    or infinite."""

    def __init__(self):
        self.overflows = 0  # consecutive logs with a non-finite gradient norm under fp16 loss scaling

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        bad = _not_finite(logs or {})
        if getattr(args, "fp16", False) and "grad_norm" in (logs or {}):
            self.overflows = self.overflows + 1 if "grad_norm" in bad else 0
            if "grad_norm" in bad and self.overflows < FP16_OVERFLOW_LOGS:
                del bad["grad_norm"]  # an overflow the scaler skips
        parameter = _first_non_finite_parameter(model) if bad or "loss" in (logs or {}) else None
        if not bad and parameter is None:
            return
        seen = ", ".join(f"{'gradient norm' if k == 'grad_norm' else k} {v}" for k, v in bad.items())
        if parameter is not None:
            seen = f"{seen}, and {parameter} is not finite" if seen else f"{parameter} is not finite"
        raise QLoRAPluginError(
            f"Training stopped at step {state.global_step}: {seen}; nothing more is saved. Lower --learning_rate, "
            "train in bf16 rather than fp16, check the data, or start again from a clean cache "
            "(--quantized_cache false) if the base or the LoRA start came from it."
        )


@hookimpl
def qlora_trainer_callbacks():
    return [StopOnNonFinite()]
