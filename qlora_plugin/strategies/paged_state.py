"""Paged optimizer state that survives a checkpoint round trip (bitsandbytes#782, #1381).

bitsandbytes' paged optimizers keep the Adam moments (`state1`, `state2`) of large parameters in CUDA unified
memory. Its `load_state_dict` turns them back into ordinary device tensors: a resumed run trains, but without
paging, so the memory spike that paging absorbed can now run out of memory. `resumable` subclasses an optimizer
class so that

- `state_dict()` holds ordinary (non-paged) tensors, copied after the device finished writing them, and
- `load_state_dict()` puts the moments back into buffers from the optimizer's own `get_state_buffer`, exactly
  as a fresh step would allocate them (paged on CUDA above bitsandbytes' size threshold, ordinary elsewhere).

The same code runs on every device; on CPU the buffers are ordinary tensors (bitsandbytes pages GPU memory only).
"""

from __future__ import annotations

from qlora_plugin.ecosystem.compat import fsdp_wrapped_quant_state_key

MOMENT_KEYS = ("state1", "state2")


def _is_paged(tensor) -> bool:
    return getattr(tensor, "is_paged", False)


class ResumablePagedState:
    """Mixin for a bitsandbytes `Optimizer8bit` subclass; see the module docstring."""

    def state_dict(self):
        import torch

        state_dict = super().state_dict()
        if torch.cuda.is_available() and any(_is_paged(v) for s in self.state.values() for v in s.values()):
            torch.cuda.synchronize()  # paged updates are asynchronous
        for param_state in state_dict["state"].values():
            for holder in (param_state, param_state.get(fsdp_wrapped_quant_state_key(self), {})):
                for key, value in holder.items():
                    if _is_paged(value):
                        holder[key] = value.clone()
        return state_dict

    def load_state_dict(self, state_dict, move_to_device=True):
        super().load_state_dict(state_dict, move_to_device=False)
        for param, param_state in self.state.items():
            for key, value in list(param_state.items()):
                if key not in self.non_castable_tensor_keys or not hasattr(value, "to"):
                    continue
                if self.is_paged and key in MOMENT_KEYS and value.shape == param.shape:
                    buffer = self.get_state_buffer(param, dtype=value.dtype)
                    buffer.copy_(value)
                    param_state[key] = buffer
                elif move_to_device:
                    param_state[key] = value.to(param.device)


def resumable(optimizer_class):
    """`optimizer_class` with `ResumablePagedState` mixed in (same name); non-paged classes are returned as is."""
    if not optimizer_class.__name__.startswith("Paged"):
        return optimizer_class
    return type(optimizer_class.__name__, (ResumablePagedState, optimizer_class),
                {"__module__": __name__, "__doc__": optimizer_class.__doc__})
