"""LoRA dropout for CPU training with a cheaper mask: the same drop rate and scaling, a faster generator.

Why: on CPU, torch's dropout draws its mask with `bernoulli_`, serially. With LoRA on all seven projections of
every block and gradient checkpointing (each mask is drawn again when the block is recomputed), dropout was about
a tenth of a profiled 1.1B step: the largest part of the gap to TRL's default LoRA, which has dropout on two
projections (docs/architecture.md, Decisions, has the profile).

What it does: one 32-bit draw per element from numpy's SFC64 generator (about twice the rate of torch's CPU
generator); an element is kept where its draw falls below
`round((1 - p) * 2**32)`, so the drop probability is `p` to within 2**-32; kept values are scaled by
`1 / (1 - p)` as torch's dropout scales them. The backward keeps the mask as bool (1 byte per element; torch's
keeps a float mask, 4 bytes).

Same seed, same masks: each mask's generator is seeded by one draw from torch's default CPU generator, which
`set_seed` seeds, gradient checkpointing restores for the recomputation (`tests/test_cpu_dropout.py` checks that
gradients with and without checkpointing are equal), and Trainer checkpoints save for resume. The masks are not
torch's, so a run matches stock peft's only in distribution; `cpu_fast_dropout false` keeps torch's dropout.

When it applies: `cpu_fast_dropout` (on by default), CPU runs, LoRA dropout above 0, in training mode, on
floating-point inputs. Anything else (eval, another device, `inplace`) takes torch's dropout. On the meta device
(`plan`'s skeleton) it keeps a bool mask of the input's shape, so the plan counts what a CPU run keeps.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from qlora_plugin.cpu.options import FAST_DROPOUT, FAST_DROPOUT_DEFAULT
from qlora_plugin.plugin.specs import hookimpl

_SPAN = 2**32


def keep_mask(shape: torch.Size, p: float) -> torch.Tensor:
    """A bool mask of `shape`, each element True with probability `1 - p` (to within 2**-32).

    One 32-bit draw per element from numpy's SFC64, seeded by one draw from torch's default CPU generator, so
    torch's seeding and RNG-state restores decide the mask.
    """
    count = shape.numel()
    seed = int(torch.empty((), dtype=torch.int64).random_())
    draws = np.random.SFC64(seed).random_raw((count + 1) // 2).view(np.uint32)[:count]
    threshold = np.uint32(min(round((1.0 - p) * _SPAN), _SPAN - 1))
    return torch.from_numpy(draws < threshold).view(shape)


class _ScaleKept(torch.autograd.Function):
    """`x * scale` where `keep`, 0 elsewhere; the backward applies the same mask and scale to the gradient."""

    @staticmethod
    def forward(ctx, x, keep, scale):
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x.mul(keep).mul_(scale)  # as torch's dropout: a dropped NaN stays NaN

    @staticmethod
    def backward(ctx, grad_output):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        (keep,) = ctx.saved_tensors
        return grad_output.mul(keep).mul_(ctx.scale), None, None


class CpuLoraDropout(nn.Dropout):
    """`nn.Dropout` whose CPU training path draws its mask with `keep_mask`; every other call is torch's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        usable = 2**-31 < self.p < 1 - 2**-31  # outside: keep all or drop all, which torch's path does exactly
        device = x.device.type
        fast = self.training and usable and not self.inplace and device in ("cpu", "meta") and x.is_floating_point()
        if not fast:
            return super().forward(x)
        if device == "meta":  # `plan` counts what the backward keeps (a bool mask) on shapes alone
            keep = torch.empty(x.shape, dtype=torch.bool, device="meta")
        else:
            keep = keep_mask(x.shape, self.p)
        return _ScaleKept.apply(x, keep, 1.0 / (1.0 - self.p))


def install(model) -> int:
    """Swap the `nn.Dropout` of every peft LoRA layer in `model` for `CpuLoraDropout`; returns how many."""
    count = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, nn.ModuleDict):
            continue
        for name, dropout in dropouts.items():
            if type(dropout) is nn.Dropout:
                replacement = CpuLoraDropout(dropout.p, dropout.inplace)
                replacement.train(dropout.training)
                dropouts[name] = replacement
                count += 1
    return count


def installed(model) -> int:
    """How many LoRA dropouts in `model` draw their masks with `keep_mask`."""
    return sum(1 for module in model.modules() if isinstance(module, CpuLoraDropout))


OPTION, DEFAULT = FAST_DROPOUT, FAST_DROPOUT_DEFAULT  # registered by `cpu/options.py` (a catalog plugin)


@hookimpl
def qlora_summary_lines(facts):
    count = facts["adapter"].get("fast_dropout_layers")
    if count:
        return [("dropout", f"masks for {count} LoRA layers drawn with one 32-bit draw per element ({OPTION})")]
    return None


@hookimpl(wrapper=True)
def qlora_wrap_model(options, runtime):
    """After whichever plugin wrapped the model: on CPU runs, give its LoRA dropouts the cheaper mask."""
    model = yield
    if model is not None and options is not None and getattr(options, OPTION, DEFAULT) and runtime.device_type == "cpu":
        install(model)
    return model


def inactive_note(asked: dict, device_type: str, dropout: float | None, count: int) -> str | None:
    """What the summary says when `cpu_fast_dropout true` was asked for and no dropout took it (never silently)."""
    if asked.get("cpu_fast_dropout") is not True or count:
        return None
    if device_type != "cpu":
        return f"cpu_fast_dropout acts on CPU runs only; this run is on {device_type}: no effect"
    if not dropout:
        return "cpu_fast_dropout: lora_dropout is 0, so there is no mask to draw: no effect"
    return "cpu_fast_dropout: the adapter was not added by the strategy's hook, so its dropout is torch's"


@hookimpl
def qlora_run_facts(explicit_options, model, runtime):
    count = installed(model)
    config = model.peft_config[model.active_adapter] if hasattr(model, "peft_config") else None
    note = inactive_note(explicit_options, runtime.device_type, getattr(config, "lora_dropout", None), count)
    return {"adapter": {"fast_dropout_layers": count}, "fallbacks": [note] if note else []}
