"""A training step's transient memory as a function of the per-device batch: what `plan` prints at one batch and
`--memory_budget` prices at every candidate batch, from one count.

Why one object: the step's terms are not all linear in the batch. The decoder stack's storages are (every one has
a batch dimension), but TRL's fused head stops growing at 4,096 tokens, and which blocks the CPU heap keeps after
they are freed depends on each block's size at that batch (`allocator`). Pricing both the plan's batch and the
budget's candidates here keeps them equal by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

from qlora_plugin.plan.allocator import Transients, kept_bytes, on_heap, profile_bytes


@dataclass(frozen=True)
class StepCost:
    gradients: int  # one per trainable parameter
    gradients_heap: int  # of them, in blocks under the mmap threshold
    dequantized: int  # one 4-bit layer's weight dequantized for its matmul (the largest), at any batch
    # the decoder stack's storages: (bytes per row, how many) (`activations.activation_bytes`); a storage without a
    # batch dimension (the rotary tables: KiB) is scaled with the batch too, so other batches are priced within 0.2%
    # (tests/test_plan.py)
    profile: tuple
    head: dict | None  # TRL's fused head's shape (`loss.head_shape`); None: the model's own loss, in `profile`
    layer_phase_per_sample: int
    mode: str  # the allocator rule (`allocator.kept_bytes`): "tuned", "glibc" or "cuda"

    def activations(self, batch: int) -> int:
        return self.dequantized + profile_bytes(self.profile, batch)

    def loss(self, batch: int) -> int:
        from qlora_plugin.plan.loss import train_loss_term

        return 0 if self.head is None else train_loss_term(self.head, batch, self.layer_phase_per_sample)

    def allocator(self, batch: int) -> int:
        from qlora_plugin.plan.loss import buffer_mapped, train_loss_heap

        loss = self.loss(batch)
        # TRL's fused head block by block, as the stack: its buffer on the heap up to 511 tokens, its fp32 tiles
        # (twice the buffer) mapped from 256 (`allocator`); glibc's defaults go by whether the buffer is mapped
        mapped = self.head is not None and buffer_mapped(self.head, batch)
        loss_heap = train_loss_heap(self.head, batch, self.layer_phase_per_sample) if self.head else 0
        heap = (self.gradients_heap + on_heap((self.dequantized,)) + profile_bytes(self.profile, batch, True)
                + loss_heap)
        return kept_bytes(self.mode, Transients(self.gradients + self.activations(batch) + loss, heap, loss, mapped))

    def transients(self, batch: int) -> int:
        """Gradients, activations, loss and what the allocator keeps of them: the step beside the optimizer state."""
        return self.gradients + self.activations(batch) + self.loss(batch) + self.allocator(batch)
