"""Activation memory for `plan`: counted on the meta device, not guessed.

A forward pass of the strategy's meta-device skeleton (4-bit stand-ins, LoRA with its dropout, the real dtypes)
runs under `torch.autograd.graph.saved_tensors_hooks`, which sees every tensor autograd keeps for the backward
pass; their storages (deduplicated, parameters excluded) are the activations. It runs with 1 and 2 decoder
layers: the difference is one layer, the rest is the embedding, the head and the loss (the fp32 logits, often
the largest term for small models). Meta tensors have shapes and dtypes but no data, so this takes a second
even for 65B.

- Attention: meta tensors always take SDPA's math path, which keeps the (seq x seq) scores. On CUDA and CPU
  training uses a fused kernel (flash / memory-efficient) that keeps q, k, v, the output and the log-sum-exp;
  `_fused_attention` stands in for it during the count.
- Gradient checkpointing (non-reentrant, what the recipe uses) keeps each layer's input hidden states and
  recomputes one layer at a time during the backward: embedding/head/loss + L x input + one full layer.
- Backward transient: when the loss backward starts, the gradient of the fp32 logits (batch x seq x vocab) exists
  beside everything saved; while a layer is backpropagated its gradients (about one layer's activations) exist
  beside its saved tensors. Both are added. Measured errors: docs/plan.md.
"""

from __future__ import annotations

import contextlib

from qlora_plugin.plan.skeleton import with_layers


def _fused_attention():
    import torch

    class FusedAttention(torch.autograd.Function):
        @staticmethod
        def forward(ctx, query, key, value):
            out = query.new_empty(query.shape[:-1] + (value.shape[-1],))
            lse = query.new_empty(query.shape[:-1], dtype=torch.float32)
            ctx.save_for_backward(query, key, value, out, lse)
            return out

        @staticmethod
        def backward(ctx, grad):  # never run: the count needs the forward only
            raise NotImplementedError

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
             **kwargs):
        return FusedAttention.apply(query, key, value)

    return sdpa


@contextlib.contextmanager
def _patched_sdpa():
    import torch

    original = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = _fused_attention()
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


def saved_bytes(model, batch_size: int, seq_len: int) -> int:
    """Bytes of the distinct storages autograd saves in one training forward of `model` (meta device)."""
    import torch

    params = {id(p) for p in model.parameters()}
    storages = {}

    def root(t):
        while t._base is not None:
            t = t._base
        return t

    def pack(t):
        if id(root(t)) not in params and id(t) not in params:
            storage = t.untyped_storage()
            storages[id(storage)] = storage  # keeping a reference keeps the id unique
        return t

    ids = torch.zeros((batch_size, seq_len), dtype=torch.long, device="meta")
    model.train()
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()  # as the Trainer does for an adapter model
    with _patched_sdpa(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    return sum(s.nbytes() for s in storages.values())


def activation_bytes(config, build, batch_size: int, seq_len: int, checkpointing: bool) -> dict:
    """{"total", "with_checkpointing", "without_checkpointing", "per_layer", "outside_layers"} in bytes.

    `build(config)` returns the strategy's meta-device skeleton for a config.
    """
    text = config.get_text_config()
    layers = text.num_hidden_layers
    one = saved_bytes(build(with_layers(config, 1)), batch_size, seq_len)
    two = saved_bytes(build(with_layers(config, 2)), batch_size, seq_len)
    per_layer = two - one
    outside = one - per_layer
    skeleton = build(with_layers(config, 1))
    residual = skeleton.get_input_embeddings().weight.element_size()
    hidden = batch_size * seq_len * text.hidden_size * residual
    logits_grad = batch_size * seq_len * text.vocab_size * 4
    transient = logits_grad + per_layer
    without = outside + layers * per_layer + transient
    with_ckpt = outside + layers * hidden + per_layer + transient
    return {
        "total": with_ckpt if checkpointing else without,
        "with_checkpointing": with_ckpt,
        "without_checkpointing": without,
        "per_layer": per_layer,
        "outside_layers": outside,
    }


def eval_transient_bytes(model, batch_size: int, seq_len: int) -> int:
    """The most memory an evaluation forward of `model` holds at once beyond its weights (meta device).

    Evaluation runs without gradients and without checkpointing: nothing is kept for a backward, but every
    intermediate lives until its last use, and the logits (batch x seq x vocab, then upcast to fp32 for the loss)
    are the largest for most models. Counted by following every tensor an operation creates until it is freed
    (a `TorchDispatchMode` and `weakref.finalize`), by storage, the way the allocator sees them.
    """
    import weakref

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    live = {"now": 0, "peak": 0}
    holders: dict[int, int] = {}  # storage -> how many live tensors use it (a storage is freed with its last)

    def release(key, nbytes):
        holders[key] -= 1
        if not holders[key]:
            del holders[key]
            live["now"] -= nbytes

    class Track(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in torch.utils._pytree.tree_leaves(out):
                if not isinstance(t, torch.Tensor):
                    continue
                storage = t.untyped_storage()
                key = storage._cdata  # views and `_unsafe_view` results share their input's storage
                if key not in holders:
                    holders[key] = 0
                    live["now"] += storage.nbytes()
                    live["peak"] = max(live["peak"], live["now"])
                holders[key] += 1
                weakref.finalize(t, release, key, storage.nbytes())
            return out

    ids = torch.zeros((batch_size, seq_len), dtype=torch.long, device="meta")
    model.eval()
    with torch.no_grad(), _patched_sdpa(), Track():
        loss = model(input_ids=ids, labels=ids).loss
        del loss
    return live["peak"]
