"""The calibrated LoftQ start (`init_lora_weights loftq_calibrated`, what `auto` picks on a 4-bit base): LoftQ's
correction of each layer's 4-bit error, weighted by what the layer's inputs look like on the first training examples
(`loftq.loftq_initialise`): their second-moment matrix where all of them fit in `COVARIANCE_LIMIT` (SmolLM2-135M
needs 768 MiB, measured in passes of at most `GROUP_BYTES`), each channel's root-mean-square above it (a 1B model
would need several GiB).

When: at `on_train_begin` of a fresh run, before `eval_on_start`, so the step-0 evaluation already sees it. Not
earlier, because the data is tokenized only once the trainer is built; not on resume, where the checkpoint's adapter
is what training continues from.

Under torch.distributed only rank 0 computes it (or loads it from the start cache) and broadcasts the adapter and
its facts, so every process trains the same start and no other rank re-reads the 16-bit base.
The forward passes run without gradients and keep only the last position's logits, so they cost less memory than one
training step; the statistics are freed before training.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import time

from transformers import TrainerCallback

from qlora_plugin.core.errors import QLoRAPluginError
from qlora_plugin.strategies.loftq import OVERSAMPLE, loftq_initialise
from qlora_plugin.strategies.start_cache import load_start, save_start, start_key

logger = logging.getLogger(__name__)

CALIBRATION_EXAMPLES = 16  # on SmolLM2-135M, 16 and 150 examples give the same start (docs/benchmarks.md)
CALIBRATION_TOKENS = 1024  # and no more batches once this many tokens are in: the passes stay cheap at 1B
DAMPING = 0.01  # added to each channel's mean square, as a share of the layer's average: no channel weighs zero
COVARIANCE_LIMIT = 1 << 30  # bytes of all input covariances; above it, per-channel scales (a 1B model: several GiB)
GROUP_BYTES = 1 << 28  # bytes of input covariances held at once (`InputWeights`)
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")
# what the start depends on beside the base, the adapter and the data (the cache key: `start_cache.start_key`)
CONSTANTS = {"examples": CALIBRATION_EXAMPLES, "tokens": CALIBRATION_TOKENS, "damping": DAMPING,
             "covariance_limit": COVARIANCE_LIMIT, "oversample": OVERSAMPLE}


def first_batches(train_dataloader, examples: int, batch_size: int, tokens: int = CALIBRATION_TOKENS):
    """The first `examples` rows of the training dataset (in order, unshuffled), collated by the trainer's own
    collator into batches of `batch_size`, stopping early once `tokens` tokens (not padding) are in; and how many
    rows that was."""
    dataset = getattr(train_dataloader, "dataset", None)
    collate = getattr(train_dataloader, "collate_fn", None)
    if dataset is None or collate is None:
        raise QLoRAPluginError("`init_lora_weights loftq_calibrated` needs the training data, and the trainer has no "
                               "training dataloader. Pass a train_dataset, or use `--init_lora_weights loftq`.")
    if hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
        rows = [dataset[i] for i in range(min(examples, len(dataset)))]
    else:
        rows = list(itertools.islice(iter(dataset), examples))
    if not rows:
        raise QLoRAPluginError("`init_lora_weights loftq_calibrated`: the training dataset is empty.")
    batches, used, seen = [], 0, 0
    while used < len(rows) and seen < tokens:
        batch = collate(rows[used:used + batch_size])
        used += len(rows[used:used + batch_size])
        mask = batch.get("attention_mask")
        seen += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
        batches.append(batch)
    return batches, used


SHARED_INPUT = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "gate_proj": "mlp", "up_proj": "mlp"}


def input_key(name: str, module) -> tuple | str:
    """Layers known to be fed the same tensor share a key: a block's attention projections, and its MLP's gate and
    up projections. Any other layer is its own."""
    block, kind = name.rsplit(".", 1)
    return (block.rsplit(".", 1)[0], module.in_features, SHARED_INPUT[kind]) if kind in SHARED_INPUT else name


def covariance_bytes(layers) -> int:
    """Memory the inputs' second-moment matrices take (float64), one per distinct input (`input_key`)."""
    return sum(8 * module.in_features ** 2 for module in dict((input_key(n, m), m) for n, m in layers).values())


def layer_groups(layers, group_bytes: int) -> list[list]:
    """Consecutive layers in groups whose covariances take at most `group_bytes` (a group holds at least one
    input); layers sharing an input stay in one group."""
    groups, size, keys = [[]], 0, set()
    for name, module in layers:
        key = input_key(name, module)
        cost = 0 if key in keys else 8 * module.in_features ** 2
        if groups[-1] and cost and size + cost > group_bytes:
            groups.append([])
            size, keys = 0, set()
            cost = 8 * module.in_features ** 2
        groups[-1].append((name, module))
        size += cost
        keys.add(key)
    return groups


def damped_cholesky(moment):
    """Lower Cholesky factor of the second-moment matrix, damped so that no direction weighs zero: `DAMPING` times
    the mean of its diagonal is added to it, ten times more at each try while rounding still leaves it not positive
    definite (float64 holds it exactly enough with the damping alone on the models measured)."""
    import torch

    mean = moment.diagonal().mean()
    for factor in (1, 10, 100, 1000):
        damped = moment.clone()
        damped.diagonal().add_(factor * DAMPING * mean)
        factor_l, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            return factor_l
    raise QLoRAPluginError("`init_lora_weights loftq_calibrated`: an input covariance stayed singular after damping "
                           "(its inputs are all zero?). Use `--init_lora_weights loftq`.")


class _GroupMeasured(Exception):
    """Raised by the group's last layer: the forward pass stops there."""


class InputWeights:
    """For every 4-bit LoRA layer, what its inputs look like over the (non-padding) tokens of `batches`, as
    `loftq_initialise` weighs the error with (`self[name]`): the lower Cholesky factor of the inputs' second-moment
    matrix (float64) where all of them take at most `covariance_limit` bytes, else each input channel's
    root-mean-square.

    The matrices are measured group by group, in model order, as `loftq_initialise` asks for them (one pass over
    the batches per group of at most `group_bytes`, stopped at the group's last layer), so no more than one group's
    are held at a time: SmolLM2-135M's 768 MiB become three passes of at most 256 MiB. The model runs in eval mode
    (no dropout), without gradients.
    Layers fed the same tensor (q/k/v, gate/up: called one after the other with it) share one matrix."""

    def __init__(self, model, batches, adapter: str = "default", covariance_limit: int = COVARIANCE_LIMIT,
                 group_bytes: int = GROUP_BYTES):
        from peft.tuners.lora import Linear4bit

        self.model, self.batches = model, batches
        layers = [(n, m) for n, m in model.named_modules() if isinstance(m, Linear4bit) and adapter in m.lora_A]
        self.full = covariance_bytes(layers) <= covariance_limit
        self.kind = "covariance" if self.full else "channel scales"
        self.groups = layer_groups(layers, group_bytes) if self.full else [layers]
        self.current, self.tokens, self.passes = {}, 0, 0

    def __getitem__(self, name: str):
        if name not in self.current:
            group = next((g for g in self.groups if any(n == name for n, _ in g)), None)
            if group is None:
                raise KeyError(name)
            self.current = {}  # the previous group's matrices go before the next group's come
            self.current = self._measure(group)
        return self.current[name]

    def _measure(self, layers) -> dict:
        import torch

        full, sums, tokens, owner, final = self.full, {}, {}, {}, layers[-1][0]
        last = {"input": None, "name": None, "mask": None}

        def record(name):
            def hook(module, args):
                x = args[0]
                if x is last["input"]:  # the previous layer's input: share its statistics
                    owner[name] = last["name"]
                else:
                    last.update(input=x, name=name)
                    owner[name] = name
                    x = x.detach().reshape(-1, x.shape[-1])
                    if last["mask"] is not None and last["mask"].numel() == x.shape[0]:
                        x = x[last["mask"]]
                    x = x.double() if full else x.float()  # float64: massive activations swamp float32's precision
                    sums[name] = sums.get(name, 0) + (x.T @ x if full else x.square().sum(0))
                    tokens[name] = tokens.get(name, 0) + x.shape[0]
                if name == final:
                    raise _GroupMeasured  # the rest of the model has nothing for this group
            return hook

        model = self.model
        handles = [module.register_forward_pre_hook(record(name)) for name, module in layers]
        device = next(p.device for p in model.parameters() if not p.is_meta)
        forward = inspect.signature(model.get_base_model().forward).parameters
        extra = {"use_cache": False, **({"logits_to_keep": 1} if "logits_to_keep" in forward else {})}
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for batch in self.batches:
                    inputs = {k: v.to(device) for k, v in batch.items() if k in MODEL_INPUTS and v is not None}
                    mask = inputs.get("attention_mask")
                    last.update(input=None, mask=mask.reshape(-1).bool() if mask is not None else None)
                    try:
                        model(**inputs, **extra)
                    except _GroupMeasured:
                        pass
        finally:
            for handle in handles:
                handle.remove()
            model.train(was_training)
            last.clear()
        self.passes += 1
        if not sums:
            raise QLoRAPluginError("`init_lora_weights loftq_calibrated`: no 4-bit LoRA layer saw any input.")
        self.tokens = max(self.tokens, *tokens.values())
        computed = {}
        for name in list(sums):
            moment = sums.pop(name) / max(tokens[name], 1)
            if full:
                computed[name] = damped_cholesky(moment).float()
            else:
                computed[name] = (moment + DAMPING * moment.mean()).sqrt()
            del moment
        return {name: computed[owner[name]] for name, _ in layers if name in owner}


def _process_group() -> tuple[int, int]:
    """(rank, world size) under an initialised torch.distributed group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def share_from_rank_zero(model, facts: dict | None, error: str | None) -> dict:
    """Rank 0's outcome to every process: its facts (or its error, raised everywhere, so no rank waits for a
    broadcast that never comes), then its adapter (the trainable parameters)."""
    import torch.distributed as dist

    box = [facts, error]
    dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise QLoRAPluginError(box[1])
    for param in model.parameters():
        if param.requires_grad:
            dist.broadcast(param.data, src=0)
    return box[0]


class CalibratedLoftQ(TrainerCallback):
    """Computes the `loftq_calibrated` start when a fresh run begins, and records it in the run's facts (the report
    and the line printed under the summary). Under torch.distributed only rank 0 computes it (or loads it from the
    start cache): the others would re-read every 16-bit shard of the base for the same result. They receive its
    adapter by broadcast, a few hundred MB at 70B and r=64."""

    def __init__(self, init_facts: dict, chosen_by_user: bool):
        self.init = init_facts
        self.chosen_by_user = chosen_by_user

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        if not self.init.pop("pending", False):
            return
        if state.global_step > 0:
            self.init["note"] = "resumed: training continues from the checkpoint's adapter"
            return
        rank, world = _process_group()
        error, batches = None, None
        try:
            # on every rank: iterating accelerate's prepared dataloader is itself collective (it synchronises the
            # samplers' random state from rank 0), so a rank that skipped it would pair the wrong broadcasts
            batches = first_batches(train_dataloader, CALIBRATION_EXAMPLES, args.per_device_train_batch_size)
        except QLoRAPluginError as err:
            if self.chosen_by_user:
                raise  # the same data on every rank: every rank stops here with the same message
            error = err
        if rank == 0:
            try:
                self._compute(model, batches, error,
                              show=state.is_world_process_zero and not getattr(args, "disable_tqdm", False))
            except QLoRAPluginError as err:
                if world == 1:
                    raise
                error = err
            else:
                error = None
        if world > 1:
            shared = share_from_rank_zero(model, dict(self.init) if rank == 0 else None,
                                          str(error) if rank == 0 and error is not None else None)
            self.init.clear()
            self.init.update(shared)
        if state.is_world_process_zero:
            print(f"[qlora-plugin] {describe(self.init)}", flush=True)

    def _compute(self, model, batches, batches_error, show: bool) -> None:
        try:
            if batches_error is not None:
                raise batches_error
            batches, examples = batches
            start = time.perf_counter()
            key = start_key(model, batches, CONSTANTS)
            cached = load_start(model, key) if key else None
            if cached is not None:
                self.init.update(cached, cached=True, seconds=round(time.perf_counter() - start, 2))
            else:
                weights = InputWeights(model, batches)
                self.init.update(loftq_initialise(model, input_weights=weights, progress=show), examples=examples,
                                 tokens=weights.tokens, weighting=weights.kind, passes=weights.passes)
                if key:
                    save_start(model, key, {k: v for k, v in self.init.items() if k not in ("note", "method")})
        except QLoRAPluginError as err:
            if self.chosen_by_user:
                raise
            # auto: the plain LoftQ start needs no data
            logger.warning("init_lora_weights auto: the plain loftq start instead of the calibrated one. %s", err)
            self.init.update(loftq_initialise(model), method="loftq", note=f"not calibrated: {err}")


def describe(init: dict) -> str:
    """The summary's line for a LoftQ start (plain or calibrated), once computed."""
    seen = (f", weighted by the inputs' {init.get('weighting', 'statistics')} over the first {init['examples']} "
            f"training examples ({init['tokens']} tokens)" if "examples" in init and "tokens" in init else "")
    return (f"LoRA init: {init['method']}: the adapters start at the best low-rank correction of the 4-bit error"
            f"{seen}; {100 * init['error_cancelled']:.0f}% of it cancelled on {init['layers']} layers "
            f"({'loaded from the start cache in ' if init.get('cached') else ''}{init['seconds']:.1f} s; "
            "init_lora_weights)")
