"""Activation memory for `plan`: counted on the meta device, not guessed.

A forward pass of the strategy's meta-device skeleton (4-bit stand-ins, LoRA with its dropout, the real dtypes)
runs under `torch.autograd.graph.saved_tensors_hooks`, which sees every tensor autograd keeps for the backward
pass; their storages (deduplicated, parameters excluded) are the activations. It runs with 1 and 2 decoder
layers: the difference is one layer, the rest is the embedding and the final norm (and the head and loss, below). Meta tensors have shapes and dtypes but no data, so this takes a second
even for 65B.

- Attention: meta tensors always take SDPA's math path, which keeps the (seq x seq) scores. On CUDA and CPU
  training uses a fused kernel (flash / memory-efficient) that keeps q, k, v, the output and the log-sum-exp;
  `_fused_attention` stands in for it during the count.
- Mixed precision: autocast does not act on meta tensors, so `_autocast_mode` stands in for it: the matmul
  family (and the attention stand-in) take their float inputs cast to the autocast dtype, and autograd keeps
  those copies, as under autocast (e.g. q, k, v in bf16 while the qlora residual stream is fp32).
- Gradient checkpointing (non-reentrant, what the recipe uses) keeps each layer's input hidden states and
  recomputes one layer at a time during the backward: embedding/head/loss + L x input + one full layer.
- The head and loss: with TRL's fused LM head (TRL 1.16) only the decoder stack runs here and `plan.loss` prices
  the head; with an older TRL the model's own loss runs, keeping the fp32 logits, whose gradient exists when the
  backward starts.
- Backward transient: while a layer is backpropagated, the gradients it produces beside its saved tensors, a
  measured share of them (`LAYER_GRADIENTS`). Measured errors: docs/plan.md.
"""

from __future__ import annotations

import contextlib

from qlora_plugin.plan.skeleton import with_layers


# While a layer is backpropagated, the gradients it produces beside its saved tensors, as a share of those (they
# free as the backward goes): measured with the live-tensor count of real training steps on CPU at hidden 1024,
# 8 layers, 512 tokens, batch 1, 2 and 4 (docs/plan.md, "Where the bytes go"): the step's peak grows by 66.5 MiB
# per row, which this share reproduces (1.0 over-counted it by a third).
LAYER_GRADIENTS = 0.25


def _fused_attention(amp_dtype=None):
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
        if amp_dtype is not None:  # SDPA is on autocast's lower-precision list: it keeps the cast q, k, v
            query, key, value = (t.to(amp_dtype) for t in (query, key, value))
        return FusedAttention.apply(query, key, value)

    return sdpa


@contextlib.contextmanager
def _patched_sdpa(amp_dtype=None):
    import torch

    original = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = _fused_attention(amp_dtype)
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


def _autocast_mode(amp_dtype):
    """Autocast for meta tensors, which the real one skips (it dispatches on CPU/CUDA keys): the matmul family
    runs on float inputs cast to `amp_dtype`, so what autograd saves is the cast copies, as under autocast. The
    elementwise ops (norms, activations, residual adds) stay in their dtypes, as autocast leaves them."""
    import torch
    from torch.overrides import TorchFunctionMode

    cast_functions = {torch.nn.functional.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__,
                      torch.mm, torch.bmm, torch.addmm, torch.baddbmm}

    def cast(value):
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != amp_dtype:
            return value.to(amp_dtype)
        return value

    class MetaAutocast(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in cast_functions:
                args, kwargs = tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}
            return func(*args, **kwargs)

    return MetaAutocast()


def _layer_inputs(model, sizes: list):
    """Hooks that append the bytes per element of the hidden states entering each decoder layer to `sizes`."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    def record(module, args, kwargs):
        hidden = args[0] if args else kwargs.get("hidden_states")
        if hidden is not None:
            sizes.append(hidden.element_size())

    return [m.register_forward_pre_hook(record, with_kwargs=True) for m in model.modules()
            if isinstance(m, GradientCheckpointingLayer)]


def backbone(model):
    """The decoder stack without the LM head (`base_model` of the causal LM, under a PEFT wrapper too): what TRL's
    fused head runs before it projects the hidden states itself."""
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(causal, "base_model", causal)


@contextlib.contextmanager
def _unpacked():
    """Rows are not packed: transformers' check for packed sequences reads the position ids' values (`.item()`),
    which meta tensors have not; training with full rows and no padding passes no mask either."""
    from transformers import masking_utils

    original = getattr(masking_utils, "find_packed_sequence_indices", None)
    if original is None:
        yield
        return
    masking_utils.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = original


def _stack(model, ids):
    """The decoder stack's forward as TRL's fused head runs it (no cache), on meta `ids`."""
    with _unpacked():
        return backbone(model)(input_ids=ids, use_cache=False)


def saved_bytes(model, batch_size: int, seq_len: int, layer_inputs: list | None = None, amp_dtype=None,
                head: bool = True) -> int:
    """Bytes of the distinct storages autograd saves in one training forward of `model` (meta device), under
    mixed precision when `amp_dtype` (a torch dtype) is given; `layer_inputs`, when given, receives the bytes per
    element of each decoder layer's input hidden states. `head` False: the decoder stack only (TRL's fused head
    computes the loss itself: `plan.loss`)."""
    return sum(saved_storages(model, batch_size, seq_len, layer_inputs, amp_dtype, head))


def saved_storages(model, batch_size: int, seq_len: int, layer_inputs: list | None = None, amp_dtype=None,
                   head: bool = True) -> list[int]:
    """`saved_bytes`, storage by storage: each one's bytes (the allocator serves each as one block)."""
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
    hooks = _layer_inputs(model, layer_inputs) if layer_inputs is not None else []
    autocast = _autocast_mode(amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
    try:
        with _patched_sdpa(amp_dtype), autocast, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            if head:
                model(input_ids=ids, labels=ids)
            else:
                _stack(model, ids)
    finally:
        for hook in hooks:
            hook.remove()
    return sorted(s.nbytes() for s in storages.values())


def activation_bytes(config, build, batch_size: int, seq_len: int, checkpointing: bool, amp: str | None = None,
                     device: str = "cpu") -> dict:
    """{"total", "with_checkpointing", "without_checkpointing", "per_layer", "outside_layers", "loss", "loss_how",
    "profile"} in bytes: "total" is the decoder stack's saved tensors and backward transients, "loss" what the LM
    head and loss add on top at the step's peak (TRL's fused head, `plan.loss`; with older TRL the full fp32 logits
    and their gradient, counted in the stack's terms and "loss" 0). "profile": "total" storage by storage, as
    (bytes per row, how many) pairs, every one proportional to the batch: which of them the CPU heap serves at a
    batch depends on their size (`allocator.profile_bytes`).

    `build(config)` returns the strategy's meta-device skeleton for a config; `amp` the mixed-precision dtype of
    the run ("bfloat16", "float16"), or None.
    """
    import collections

    import torch

    from qlora_plugin.plan.loss import fused_head, fused_how, head_shape, train_loss_term

    amp_dtype = getattr(torch, amp) if amp else None
    fused = fused_head()
    text = config.get_text_config()
    layers = text.num_hidden_layers
    one_model = build(with_layers(config, 1))
    one_sizes = collections.Counter(saved_storages(one_model, batch_size, seq_len, amp_dtype=amp_dtype,
                                                   head=not fused))
    inputs = []  # bytes per element of the hidden states entering layer 1 and layer 2
    two_sizes = collections.Counter(saved_storages(build(with_layers(config, 2)), batch_size, seq_len, inputs,
                                                   amp_dtype, head=not fused))
    layer_sizes = two_sizes - one_sizes  # the second layer's storages
    outside_sizes = one_sizes - layer_sizes
    per_layer, outside = sum(layer_sizes.elements()), sum(outside_sizes.elements())
    if len(inputs) != 2:  # decoder layers not found (custom code): the embeddings' dtype throughout
        inputs = [one_model.get_input_embeddings().weight.element_size()] * 2
    # checkpointing keeps each layer's input: the first in the embeddings' dtype, the rest in the residual
    # stream's (fp32 under qlora, whose fp32 norms promote it, even with 16-bit embeddings)
    row = seq_len * text.hidden_size
    inputs_kept = batch_size * row * (inputs[0] + (layers - 1) * inputs[1])
    # the backward's transient beside the saved tensors: with checkpointing one layer recomputed and the gradients
    # flowing through it, without only the gradients (its saved tensors are already counted)
    layer_phase = int((1 + LAYER_GRADIENTS) * per_layer) if checkpointing else int(LAYER_GRADIENTS * per_layer)
    head = None
    if fused:
        compute = amp_dtype or one_model.get_output_embeddings().weight.dtype
        head = head_shape(one_model, seq_len, inputs[1], torch.empty(0, dtype=compute).element_size(), device)
        loss = train_loss_term(head, batch_size, layer_phase // batch_size)
        logits_grad, how = 0, fused_how(device)
    else:  # the fp32 logits are saved with the stack; their gradient exists when the backward starts
        logits_grad = batch_size * seq_len * text.vocab_size * 4
        loss, how = 0, "the model's own loss from the full fp32 logits (counted in the activations)"
    without = outside + layers * per_layer + int(LAYER_GRADIENTS * per_layer) + logits_grad
    with_ckpt = outside + inputs_kept + int((1 + LAYER_GRADIENTS) * per_layer) + logits_grad
    per_row = [(size / batch_size, count) for size, count in outside_sizes.items()]
    if logits_grad:
        per_row.append((logits_grad / batch_size, 1))
    if checkpointing:
        per_row += [(row * inputs[0], 1), (row * inputs[1], layers - 1)]
    layer_count = (1 if checkpointing else layers) + LAYER_GRADIENTS  # the gradients: shaped like what they meet
    per_row += [(size / batch_size, count * layer_count) for size, count in layer_sizes.items()]
    return {
        "total": with_ckpt if checkpointing else without,
        "with_checkpointing": with_ckpt,
        "without_checkpointing": without,
        "per_layer": per_layer,
        "outside_layers": outside,
        "loss": loss,
        "loss_how": how,
        "head": head,  # the fused head's shape, to price it at another batch (`plan.loss`)
        "layer_phase_per_sample": layer_phase // batch_size,
        "profile": tuple(per_row),
    }


def eval_transient(model, batch_size: int, seq_len: int, device: str = "cpu") -> dict:
    """{"total": the most memory an evaluation forward of `model` holds at once beyond its weights, "stack": the
    decoder stack's own part of it per row (with TRL's fused head; else None), "head"} (meta device).

    Evaluation runs without gradients and without checkpointing: nothing is kept for a backward, but every
    intermediate lives until its last use. With TRL's fused head (`plan.loss`) the decoder stack runs alone and the
    head's tiles follow, beside the last hidden states and their flattened copy; with the model's own loss the
    logits (batch x seq x vocab, then upcast to fp32 for the loss) are the largest for most models. Counted by
    following every tensor an operation creates until it is freed (`LiveBytes`).
    """
    import torch

    from qlora_plugin.plan.live import LiveBytes
    from qlora_plugin.plan.loss import eval_peak_bytes, fused_head, head_shape

    fused = fused_head()
    ids = torch.zeros((batch_size, seq_len), dtype=torch.long, device="meta")
    model.eval()
    with torch.no_grad(), _patched_sdpa(), LiveBytes() as live:
        if fused:
            hidden = _stack(model, ids).last_hidden_state
        else:
            loss = model(input_ids=ids, labels=ids).loss
            del loss
    if not fused:
        return {"total": live.peak, "stack": None, "head": None}
    head = head_shape(model, seq_len, hidden.element_size(), model.get_output_embeddings().weight.element_size(),
                      device)
    stack = live.peak // batch_size
    return {"total": eval_peak_bytes(head, batch_size, stack), "stack": stack, "head": head}


def eval_transient_bytes(model, batch_size: int, seq_len: int, device: str = "cpu") -> int:
    """`eval_transient`'s total."""
    return eval_transient(model, batch_size, seq_len, device)["total"]
