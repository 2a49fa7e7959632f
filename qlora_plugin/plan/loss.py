"""The language-model head and loss as the installed TRL computes them, for `plan`: what it keeps, what it holds
for a moment.

Why its own term: with a large vocabulary it is the largest transient of a training step, and TRL changed how it is
computed. TRL 1.16's `SFTTrainer` trains through a fused, chunked LM head (`trl.trainer.utils.add_fused_lm_head`,
`trl.kernels.chunked_logprob.ChunkedLogProbFunction`): the (batch x seq x vocab) logits never exist; the head is
projected in tiles of at most 4,096 tokens x 32,768 vocabulary entries into one buffer (`mm_buf`, in the compute
dtype, always 32,768 wide however small the vocabulary), folded into per-token statistics, and recomputed the same
way in the backward, which also holds the hidden states' gradient in fp32. Where Triton runs (CUDA) a tile is
folded in place; elsewhere (CPU) in torch, which makes several fp32 copies of each tile (`_forward_tile`,
`_backward_tile`: about 30 bytes per tile element at the backward's peak). Evaluation takes the same path without
the backward. Older TRL computed the model's own loss from the full fp32 logits (`activations` counts those).

How: on CPU TRL's own function runs forward and backward on meta tensors while every storage it creates is
followed until freed (the same count as `activations.eval_transient_bytes`), so a TRL release that changes its
tiles changes the figure. On CUDA the Triton kernels cannot run on meta tensors: the buffer, the hidden chunk's
cast and the fp32 gradient are counted from TRL's source (an estimate, not measured here; docs/plan.md).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util


def fused_head() -> bool:
    """Whether the installed TRL trains SFT through the chunked fused LM head (TRL 1.16 does)."""
    try:
        return importlib.util.find_spec("trl.kernels.chunked_logprob") is not None
    except (ImportError, ValueError):
        return False


@contextlib.contextmanager
def _no_meta_autocast():
    """`torch.is_autocast_enabled("meta")` raises; TRL's function asks it. Meta tensors are never autocast."""
    import torch

    original = torch.is_autocast_enabled

    def enabled(*args):
        if args and str(args[0]) == "meta":
            return False
        return original(*args)

    torch.is_autocast_enabled = enabled
    try:
        yield
    finally:
        torch.is_autocast_enabled = original


def _tracked_peaks(tokens: int, hidden: int, vocab: int, compute_dtype) -> tuple[int, int, int, int]:
    """(forward, backward) peaks of the bytes TRL's chunked log-prob function holds on CPU (its torch path), for
    `tokens` positions, counted on meta tensors, then the part of each in blocks the heap serves (under the mmap
    threshold: the buffer up to 511 tokens, never a 32 MiB fp32 tile). Inputs and outputs are not included, nor
    views of the inputs."""
    import torch
    from trl.kernels import chunked_logprob

    from qlora_plugin.plan.allocator import MMAP_THRESHOLD
    from qlora_plugin.plan.live import LiveBytes

    chunk = _vocab_chunk()
    hidden_states = torch.empty(tokens, hidden, device="meta", dtype=compute_dtype, requires_grad=True)
    weight = torch.empty(vocab, hidden, device="meta", dtype=compute_dtype)
    targets = torch.zeros(tokens, dtype=torch.long, device="meta")
    # its slices of the weight allocate nothing
    live = LiveBytes(existing=(hidden_states, weight, targets), heap_below=MMAP_THRESHOLD)
    with _no_meta_autocast(), live:
        log_probs, *_ = chunked_logprob.ChunkedLogProbFunction.apply(
            hidden_states, weight, None, targets, 1.0, chunk, None, 1.0, ("log_probs", "entropy", "is_top1"))
        forward, forward_heap = live.peak, live.peak_heap
        live.restart_peak()
        (-log_probs.sum()).backward()
        backward, backward_heap = live.peak, live.peak_heap
    return forward, backward, forward_heap, backward_heap


def _vocab_chunk() -> int:
    try:
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE
    except ImportError:  # moved or renamed: the value of TRL 1.16
        return 32768
    return _CHUNKED_LOGPROB_CHUNK_SIZE


def _token_chunk() -> int:
    try:
        from trl.kernels.chunked_logprob import TOKEN_CHUNK_SIZE
    except ImportError:
        return 4096
    return TOKEN_CHUNK_SIZE


def fused_loss_bytes(tokens: int, hidden: int, vocab: int, hidden_itemsize: int, compute_itemsize: int,
                     device: str) -> dict:
    """Bytes of TRL's fused LM head and loss for `tokens` scored positions (batch x (seq - 1)):
    {"saved": kept for the backward from the forward to the backward (the flattened hidden states, per-token
    statistics), "forward": held for a moment during the forward, "backward": during the backward}, and with
    "_heap" the part of each in blocks the CPU heap serves (`allocator`; on CUDA all of it)."""
    return dict(zip(("saved", "forward", "backward", "saved_heap", "forward_heap", "backward_heap"),
                    _fused_loss(tokens, hidden, vocab, hidden_itemsize, compute_itemsize, device)))


@functools.lru_cache(maxsize=64)  # `--memory_budget` prices the same shapes at several batches
def _fused_loss(tokens: int, hidden: int, vocab: int, hidden_itemsize: int, compute_itemsize: int,
                device: str) -> tuple[int, ...]:
    import torch

    from qlora_plugin.plan.allocator import on_heap

    # the hidden states' copy, log_z, entropy, targets
    parts = (tokens * hidden * hidden_itemsize, tokens * 4, tokens * 4, tokens * 8)
    saved = sum(parts)
    n = min(tokens, _token_chunk())
    cast = n * hidden * compute_itemsize if compute_itemsize != hidden_itemsize else 0  # the hidden chunk's cast
    grad_hidden = tokens * hidden * 4  # accumulated in fp32
    if device == "cuda":  # Triton folds the tile in place: the buffer is all
        buffer = n * _vocab_chunk() * compute_itemsize
        return saved, buffer + cast, buffer + cast + grad_hidden, saved, buffer + cast, buffer + cast + grad_hidden
    dtype = {2: torch.bfloat16, 4: torch.float32}.get(compute_itemsize, torch.bfloat16)
    forward, backward, forward_heap, backward_heap = _tracked_peaks(tokens, hidden, vocab, dtype)
    cast_heap = on_heap((cast,))
    return (saved, forward + cast, backward + cast, on_heap(parts), forward_heap + cast_heap,
            backward_heap + cast_heap)


def head_shape(model, seq_len: int, hidden_itemsize: int, compute_itemsize: int, device: str) -> dict:
    """What `head_bytes` needs to price the head at any batch (kept in a plan's details for `--memory_budget`)."""
    head = model.get_output_embeddings().weight
    return {"seq_len": seq_len, "hidden": head.shape[1], "vocab": head.shape[0], "hidden_itemsize": hidden_itemsize,
            "compute_itemsize": compute_itemsize, "device": device}


def head_bytes(shape: dict, batch_size: int, training: bool) -> int:
    """The most the fused head holds at once for `batch_size` rows: what it saves plus its larger transient in
    training; in evaluation its forward transient beside the flattened hidden states."""
    cost = fused_loss_bytes(batch_size * (shape["seq_len"] - 1), shape["hidden"], shape["vocab"],
                            shape["hidden_itemsize"], shape["compute_itemsize"], shape["device"])
    return cost["saved"] + (max(cost["forward"], cost["backward"]) if training else cost["forward"])


def train_loss_term(shape: dict, batch_size: int, layer_phase_per_sample: int) -> int:
    """The `loss` component: what the head adds to a training step's peak beyond the decoder stack's own backward
    transient (`layer_phase_per_sample` per row: the two do not overlap, the head's tiles are freed before the last
    layer's backward starts)."""
    return max(head_bytes(shape, batch_size, True) - batch_size * layer_phase_per_sample, 0)


def train_loss_heap(shape: dict, batch_size: int, layer_phase_per_sample: int) -> int:
    """Of `train_loss_term`, the bytes in blocks the CPU heap serves, in the proportion the head holds them at its
    peak (the rest, its fp32 tiles of 32 MiB and more, is mapped and given back: `allocator`)."""
    cost = fused_loss_bytes(batch_size * (shape["seq_len"] - 1), shape["hidden"], shape["vocab"],
                            shape["hidden_itemsize"], shape["compute_itemsize"], shape["device"])
    phase = "backward" if cost["backward"] >= cost["forward"] else "forward"
    whole, heap = cost["saved"] + cost[phase], cost["saved_heap"] + cost[f"{phase}_heap"]
    return int(train_loss_term(shape, batch_size, layer_phase_per_sample) * heap / whole) if whole else 0


def eval_peak_bytes(shape: dict, batch_size: int, stack_per_sample: int) -> int:
    """Evaluation's transient for `batch_size` rows: the larger of the decoder stack's (`stack_per_sample` per row)
    and the head's beside the last hidden states."""
    last_hidden = batch_size * shape["seq_len"] * shape["hidden"] * shape["hidden_itemsize"]
    return max(batch_size * stack_per_sample, last_hidden + head_bytes(shape, batch_size, False))


def fused_how(device: str) -> str:
    """How the fused head's bytes were found on `device`, for the plan's output."""
    if device == "cuda":
        return "TRL's fused LM head, estimated from TRL's source (Triton path; not measured here)"
    return "TRL's fused LM head, counted on meta tensors (TRL's CPU path)"


def buffer_mapped(shape: dict, batch_size: int) -> bool:
    """Whether the fused head's buffer is large enough for glibc to map it on its own (returned when freed): then
    none of the head stays in the heap (`allocator`)."""
    from qlora_plugin.plan.allocator import MMAP_THRESHOLD

    return buffer_bytes(shape, batch_size) >= MMAP_THRESHOLD


def buffer_bytes(shape: dict, batch_size: int) -> int:
    """The fused head's tile buffer for `batch_size` rows: (tokens, at most 4,096) x 32,768 in the compute dtype."""
    return min(batch_size * (shape["seq_len"] - 1), _token_chunk()) * _vocab_chunk() * shape["compute_itemsize"]
