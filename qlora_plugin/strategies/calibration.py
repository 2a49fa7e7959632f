"""The calibrated LoftQ start (`init_lora_weights loftq_calibrated`, what `auto` picks on a 4-bit base): LoftQ's
correction of each layer's 4-bit error, weighted by how large each of the layer's input channels is on the first
training examples (`loftq.loftq_initialise`).

When: at `on_train_begin` of a fresh run, before `eval_on_start`, so the step-0 evaluation already sees it. Not
earlier, because the data is tokenized only once the trainer is built; not on resume, where the checkpoint's adapter
is what training continues from.

Every process reads the same first rows of the whole dataset (not its own shard) and so computes the same start;
under torch.distributed the adapter is also broadcast from rank 0, so no two processes can train different ones.
The forward passes run without gradients and keep only the last position's logits, so they cost less memory than one
training step.
"""

from __future__ import annotations

import inspect
import itertools
import logging

from transformers import TrainerCallback

from qlora_plugin.errors import QLoRAPluginError

logger = logging.getLogger(__name__)

CALIBRATION_EXAMPLES = 16  # on SmolLM2-135M, 16 and 150 examples give the same start (docs/benchmarks.md)
DAMPING = 0.01  # added to each channel's mean square, as a share of the layer's average: no channel weighs zero
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


def first_batches(train_dataloader, examples: int, batch_size: int) -> tuple[list[dict], int]:
    """The first `examples` rows of the training dataset (in order, unshuffled), collated by the trainer's own
    collator into batches of `batch_size`, and how many rows that was."""
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
    return [collate(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)], len(rows)


def input_scales(model, batches, adapter: str = "default") -> tuple[dict, int]:
    """Root-mean-square of each input channel of every 4-bit LoRA layer over the (non-padding) tokens of `batches`,
    and the number of tokens seen. The model runs in eval mode (no dropout), without gradients."""
    import torch
    from peft.tuners.lora import Linear4bit

    sums, tokens, keep = {}, {}, {}

    def record(name):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            if keep.get("mask") is not None and keep["mask"].numel() == x.shape[0]:
                x = x[keep["mask"]]
            sums[name] = sums.get(name, 0) + x.float().square().sum(0)
            tokens[name] = tokens.get(name, 0) + x.shape[0]
        return hook

    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, Linear4bit) and adapter in m.lora_A]
    handles = [module.register_forward_pre_hook(record(name)) for name, module in layers]
    device = next(p.device for p in model.parameters() if not p.is_meta)
    forward = inspect.signature(model.get_base_model().forward).parameters
    extra = {"use_cache": False, **({"logits_to_keep": 1} if "logits_to_keep" in forward else {})}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                inputs = {k: v.to(device) for k, v in batch.items() if k in MODEL_INPUTS and v is not None}
                mask = inputs.get("attention_mask")
                keep["mask"] = mask.reshape(-1).bool() if mask is not None else None
                model(**inputs, **extra)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if not sums:
        raise QLoRAPluginError("`init_lora_weights loftq_calibrated`: no 4-bit LoRA layer saw any input.")
    scales = {}
    for name, total in sums.items():
        mean_square = total / max(tokens[name], 1)
        scales[name] = (mean_square + DAMPING * mean_square.mean()).sqrt()
    return scales, max(tokens.values())


def broadcast_adapter(model) -> None:
    """Under torch.distributed, every process takes rank 0's adapter (the trainable parameters)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    for param in model.parameters():
        if param.requires_grad:
            dist.broadcast(param.data, src=0)


class CalibratedLoftQ(TrainerCallback):
    """Computes the `loftq_calibrated` start when a fresh run begins, and records it in the run's facts (the report
    and the line printed under the summary)."""

    def __init__(self, init_facts: dict, chosen_by_user: bool):
        self.init = init_facts
        self.chosen_by_user = chosen_by_user

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        from qlora_plugin.strategies.loftq import loftq_initialise

        if not self.init.pop("pending", False):
            return
        if state.global_step > 0:
            self.init["note"] = "resumed: training continues from the checkpoint's adapter"
            return
        try:
            batches, examples = first_batches(train_dataloader, CALIBRATION_EXAMPLES,
                                              args.per_device_train_batch_size)
            scales, tokens = input_scales(model, batches)
            self.init.update(loftq_initialise(model, input_scales=scales), examples=examples, tokens=tokens)
        except QLoRAPluginError as err:
            if self.chosen_by_user:
                raise
            # auto: the plain LoftQ start needs no data
            logger.warning("init_lora_weights auto: the plain loftq start instead of the calibrated one. %s", err)
            self.init.update(loftq_initialise(model), method="loftq", note=f"not calibrated: {err}")
        broadcast_adapter(model)
        if state.is_world_process_zero:
            print(f"[qlora-plugin] {describe(self.init)}", flush=True)


def describe(init: dict) -> str:
    """The summary's line for a LoftQ start (plain or calibrated), once computed."""
    seen = (f", weighted by the inputs of the first {init['examples']} training examples ({init['tokens']} tokens)"
            if "examples" in init and "tokens" in init else "")
    return (f"LoRA init: {init['method']}: the adapters start at the best low-rank correction of the 4-bit error"
            f"{seen}; {100 * init['error_cancelled']:.0f}% of it cancelled on {init['layers']} layers "
            f"({init['seconds']:.1f} s; init_lora_weights)")
