"""What the memory allocator holds beyond a training step's live tensors: the plan's `allocator` component.

Why its own rule per allocator: a training step allocates and frees its activations, the fused head's tiles and
the dequantized weights every time, and what the process keeps of that depends on who serves the blocks. The plan,
`--memory_budget` and the other trainers' passes price it the same way, at any batch, through `kept_bytes`.

- CPU under `qlora-plugin run` ("tuned": glibc's small-block caches off, the mmap threshold fixed at 32 MiB,
  512 MiB kept at the heap's top): a block of 32 MiB or more is mapped on its own and given back when freed, so it
  leaves nothing behind; smaller blocks come from the heap, which keeps about 1.35 bytes per byte of them
  between steps (measured with `mallinfo2` at hidden 1024, 8 layers, 512 tokens: batch 1 and 4 all on the heap;
  at batch 8 the MLP's fp32 tensors are 48 MiB and mapped, 256 MiB of them at once, and the heap did not grow in
  the step that held them: docs/plan.md, "Where the bytes go"). TRL's fused head is priced block by block too: its
  bf16 buffer (tokens x 32,768) comes from the heap up to 511 tokens, its fp32 tiles (twice that) are mapped
  (measured at G2's shape, 2 x 255 tokens: 446 MiB mapped during the step; the demo's cell padded to 128 tokens:
  1,579 MiB planned, 1,648 measured, against 1,893 with the whole head on the heap).
  What the heap keeps is at most the trim threshold (512 MiB): glibc returns the free top beyond it (the grid's
  cells where it binds: G9, 1024 x 22 at 4 x 512 tokens, 619 MiB uncapped, +2.0% -> -0.8%; G7 and G10 by under 1%).
- CPU with glibc's defaults ("glibc"): per-thread caches keep small freed blocks between large ones, which then
  cannot merge; the heap grows 2.8-3.3 bytes per byte of every transient (3.2, fitted to issue 25's two runs at
  batch 1 and 8 with the calibrated start), except the fused head's buffer once it is mapped. Not modelled per
  block: with the same blocks mapped, the heap there grew 4.9 bytes per heap byte at batch 8 against 2.8 at batch 1.
- CUDA: the caching allocator rounds blocks up to 2 MiB and keeps freed ones for reuse; 10% of every transient,
  an estimate (PyTorch's allocator design; not measured here: examples/bench/gpu_smoke.py measures reserved minus
  allocated on a GPU).
"""

from __future__ import annotations

from dataclasses import dataclass

from qlora_plugin.cpu.malloc_tunables import MMAP_THRESHOLD, TRIM_THRESHOLD

# glibc maps a block of MMAP_THRESHOLD or more on its own (`qlora-plugin run` fixes its threshold there; glibc's
# moving threshold never goes above it) and unmaps it when freed; under `qlora-plugin run` the heap returns its free
# top beyond TRIM_THRESHOLD, so what it keeps of freed blocks is at most that
ALLOCATOR_SHARE = {"glibc": 2.8, "tuned": 1.35, "cuda": 0.1}
MALLOC_MODES = ("tuned", "glibc")


def mode_of(device: str, malloc: str) -> str:
    """The allocator rule for a run on `device` with CPU malloc mode `malloc` ("tuned" or "glibc")."""
    return "cuda" if device == "cuda" else malloc


def on_heap(sizes) -> int:
    """Bytes of the blocks in `sizes` that the heap serves (under the mmap threshold)."""
    return sum(size for size in sizes if size < MMAP_THRESHOLD)


def profile_bytes(profile, batch: int, heap_only: bool = False) -> int:
    """Bytes of a batch-proportional `profile` ((bytes per row, how many) per storage kind) at `batch` rows; with
    `heap_only`, only the storages under the mmap threshold at that batch."""
    return int(sum(count * per_row * batch for per_row, count in profile
                   if not heap_only or per_row * batch < MMAP_THRESHOLD))


@dataclass(frozen=True)
class Transients:
    """A training step's transient bytes (gradients, activations, loss), `heap` of them in blocks under the mmap
    threshold; `loss`, and whether TRL's fused head maps its buffer, for glibc's rule."""

    total: int
    heap: int
    loss: int = 0
    head_mapped: bool = False


def kept_of(mode: str, heap_bytes: int, share: float | None = None) -> int:
    """What the allocator keeps of `heap_bytes` of freed transients under `mode`: `share` (default the mode's) of
    them, and under `qlora-plugin run` at most its trim threshold (the free top beyond it is returned)."""
    kept = int((ALLOCATOR_SHARE[mode] if share is None else share) * heap_bytes)
    return min(kept, TRIM_THRESHOLD) if mode == "tuned" else kept


def kept_bytes(mode: str, step: Transients) -> int:
    """What the allocator holds beyond the step's live tensors, under `mode` ("tuned", "glibc", "cuda")."""
    share = ALLOCATOR_SHARE[mode]
    if mode == "tuned":
        return kept_of(mode, step.heap)
    if mode == "glibc":
        return int(share * (step.total - (step.loss if step.head_mapped else 0)))
    return int(share * step.total)


def how(mode: str) -> str:
    """The rule in words, for the plan's output (`details.allocator_how`)."""
    if mode == "cuda":
        return ("CUDA caching allocator: 10% of the step's transients, an estimate (not measured); "
                "runtime: the CUDA context, 500 MiB, an estimate (CUDA 12 with lazy loading: 300-600 MiB)")
    if mode == "tuned":
        return (f"glibc malloc tuned by `qlora-plugin run`: {ALLOCATOR_SHARE['tuned']:g} x the step's transients in "
                "blocks under 32 MiB (larger blocks are mapped and given back), at most its 512 MiB trim threshold, "
                "measured (docs/plan.md)")
    return (f"glibc malloc, its defaults: {ALLOCATOR_SHARE['glibc']:g} x the step's transients, measured "
            "(docs/plan.md)")
