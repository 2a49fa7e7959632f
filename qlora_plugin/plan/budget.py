"""Fit a run to a memory budget before it starts: the largest per-device batch the plan predicts to fit.

Why: the usual answer to running out of memory is to halve the batch after the crash (HF's
`auto_find_batch_size`); the plan already knows what each batch costs, so the run starts with the largest that
fits and never crashes for it. Gradient accumulation takes up the rest, so the effective batch (per-device x
accumulation x ranks) is the one you asked for. A training step is priced at each candidate batch by the plan's
own `StepCost` (the decoder stack's storages are linear in the batch, TRL's fused head and the allocator's share
are not); evaluation from two plans (batch 1 and 2) or, with TRL's fused head, the head priced at each batch.
"""

from __future__ import annotations

import dataclasses

from qlora_plugin.core.errors import QLoRAPluginError
from qlora_plugin.core.options import StrategyOptions
from qlora_plugin.plan.estimate import (
    CUDA_CONTEXT_BYTES, TRAINING_ONLY, PlanSettings, plan_strategy, running_malloc_mode, trained_length,
)
from qlora_plugin.plan.allocator import kept_of
from qlora_plugin.plan.step_cost import StepCost
from qlora_plugin.plan.loss import buffer_mapped, eval_peak_bytes
from qlora_plugin.core.sizes import parse_memory

MiB = 2**20
# `auto` on CUDA: what the GPU has free (`torch.cuda.mem_get_info`, other processes' memory excluded) plus what
# this process already holds there (allocator and context), less a tenth for the allocator's fragmentation; on
# CPU: what the kernel reports available now, less a tenth for the page cache and other processes.
AUTO_FRACTION = 0.9
# Left unused for the plan's own error, by the allocator the run uses (`allocator.mode_of`): on CPU under
# `qlora-plugin run` the validation grid's cells are within 4% under and 5% over the measured peak (docs/plan.md);
# with glibc's defaults the heap keeps 2.3-3.2 bytes per byte of a step's transients depending on what ran before
# (the calibrated start fragments it), so the plan's 2.8 can be 7.4% under (issue 25's batch-8 run): 10% is kept.
# CUDA: the 5% of the tuned CPU mode until a GPU run measures it.
PLAN_ERROR_MARGIN = 0.05
ERROR_MARGINS = {"tuned": PLAN_ERROR_MARGIN, "glibc": 0.10, "cuda": PLAN_ERROR_MARGIN}


def budget_bytes(text: str, device: str) -> tuple[int, str]:
    """(bytes, how they were found) for `--memory_budget TEXT` on `device`."""
    if text != "auto":
        return parse_memory(text, "--memory_budget"), "as given"
    if device == "cuda":
        import torch

        free, total = torch.cuda.mem_get_info()  # after this process's CUDA context exists: it is not in `free`
        ours = _cuda_held()
        others = max(total - free - ours, 0)
        usable = int((free + ours) * AUTO_FRACTION)
        return usable, (f"auto: 90% of the GPU's {free / 2**30:.1f} GiB free plus the {ours / 2**30:.1f} GiB this "
                        f"process holds (CUDA context estimated at {CUDA_CONTEXT_BYTES / MiB:.0f} MiB); other "
                        f"processes hold {others / 2**30:.1f} GiB of its {total / 2**30:.1f} GiB")
    available = _proc_kib("/proc/meminfo", "MemAvailable")
    if available is None:
        raise QLoRAPluginError("`--memory_budget auto` needs /proc/meminfo on CPU; give a size instead (e.g. 16GiB).")
    return int(available * AUTO_FRACTION), f"auto: 90% of the {available / 2**30:.1f} GiB this machine has available"


def _cuda_held() -> int:
    """What this process holds on its GPU: the caching allocator's reserved bytes plus the CUDA context, which no
    torch figure shows (an estimate: `CUDA_CONTEXT_BYTES`)."""
    import torch

    return int(torch.cuda.memory_reserved()) + CUDA_CONTEXT_BYTES


def _proc_kib(path: str, key: str) -> int | None:
    """Bytes of a `key: N kB` line in a Linux /proc file, or None elsewhere."""
    try:
        with open(path, encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@dataclasses.dataclass
class Peaks:
    """Predicted training and evaluation peaks as functions of the per-device batch: what is resident, then the
    larger of the adapter's start (before the first step) and a training step (the optimizer state beside the
    step's `StepCost`: gradients, activations, TRL's fused LM head and the allocator's share, at that batch)."""

    resident: int  # weights, adapters, runtime, as predicted
    optimizer: int
    step: StepCost
    eval_base: int
    eval_per_sample: int
    in_use: int | None = None  # what is resident, measured in a live run: replaces the prediction of it
    head: dict | None = None  # the fused head's shape, for evaluation (None: the model's own loss, linear)
    eval_stack_per_sample: int | None = None
    start: int = 0  # the adapter's start's transient (`plan.start`)
    share: float = 0.0  # the allocator's share of an evaluation's transient (`allocator.ALLOCATOR_SHARE`)
    cuda: bool = False

    def offset(self) -> int:
        return 0 if self.in_use is None else self.in_use - self.resident

    @property
    def margin(self) -> float:
        """The share of a budget kept for the plan's error under this run's allocator (`ERROR_MARGINS`)."""
        return ERROR_MARGINS[self.step.mode]

    def train(self, batch: int) -> int:
        step = self.optimizer + self.step.transients(batch)  # as `estimate.plan_strategy` sums it
        return self.resident + max(step, self.start) + self.offset()

    def eval(self, batch: int, train_batch: int = 1) -> int:
        """The evaluation's peak at `batch` rows, in a run training at `train_batch` (what the allocator kept of its
        steps stays beside the evaluation: `Plan.eval_bytes`)."""
        step_kept = self.step.allocator(train_batch)
        if self.head is None or self.eval_stack_per_sample is None:
            return self.eval_base + batch * self.eval_per_sample + self.offset()
        transient = eval_peak_bytes(self.head, batch, self.eval_stack_per_sample)
        mapped = not self.cuda and buffer_mapped(self.head, batch)
        held = kept_of(self.step.mode, transient, 0 if mapped else self.share)
        return self.eval_base + transient + max(held, step_kept) + self.offset()  # as `Plan`


def peaks(config, name, strategy, options: StrategyOptions, settings: PlanSettings, pm=None,
          in_use: int | None = None) -> Peaks:
    """The peaks as functions of the batch, from the plan at batch 1 (and at 2 for evaluation without the fused
    head). `in_use`: memory a live run holds now (model loaded, runtime started), measured; it replaces the plan's
    weights, adapters and runtime terms, so the choice rests on what this process really holds (the runtime term is
    a measured constant from one machine)."""
    one = plan_strategy(config, name, strategy, options, dataclasses.replace(settings, batch_size=1,
                                                                             eval_batch_size=1), pm)
    resident = sum(one.components[k] for k in ("weights", "adapters", "runtime"))
    head = one.details.get("head")
    eval_kept = sum(v for k, v in one.components.items() if k not in TRAINING_ONLY)
    if head is None:
        two = plan_strategy(config, name, strategy, options, dataclasses.replace(settings, batch_size=2,
                                                                                 eval_batch_size=2), pm)
        eval_slope = two.eval_bytes - one.eval_bytes
        eval_base, stack = one.eval_bytes - eval_slope, None
    else:
        eval_slope, eval_base, stack = 0, eval_kept, one.details["eval_stack_per_sample"]
    return Peaks(resident, one.components["optimizer"], one.step_cost, eval_base, eval_slope, in_use, head, stack,
                 one.details["start_transient_bytes"], one.details["allocator_share"], settings.device == "cuda")


def readable(n: int) -> str:
    """A size for a message: GiB, MiB or KiB with the digits that matter (a 10 KiB budget is not "0 MiB")."""
    for unit, scale in (("GiB", 2**30), ("MiB", MiB), ("KiB", 2**10)):
        if abs(n) >= scale:
            value = n / scale
            return f"{value:,.2f} {unit}" if value < 10 else f"{value:,.0f} {unit}"
    return f"{n} bytes"


def _largest(fits, candidates) -> int | None:
    return next((c for c in sorted(candidates, reverse=True) if fits(c)), None)


def choose(config, name, strategy, options: StrategyOptions, settings: PlanSettings, budget: int,
           samples_per_step: int, eval_cap: int, explicit_batch: int | None = None,
           explicit_eval: int | None = None, strict: bool = False, pm=None, in_use: int | None = None,
           trainer_peaks=None) -> dict:
    """The batch sizes for `budget`: `samples_per_step` (per device, per optimizer step) is kept as batch x
    accumulation. Explicit batch sizes are checked, not changed. Raises when nothing fits, naming the levers.
    `trainer_peaks`: another TRL trainer's peaks and plan function (`trainer_passes.peaks_for`; None: SFT's)."""
    if trainer_peaks is not None:
        p, plan = trainer_peaks(config, name, strategy, options, settings, pm, in_use)
    else:
        p, plan = peaks(config, name, strategy, options, settings, pm, in_use), plan_strategy
    margin = p.margin
    usable = int(budget * (1 - margin))
    notes = []

    def check_yours(flag: str, value: int, peak: int) -> None:
        if peak > usable:
            message = (f"{flag}={value} is predicted to peak at {readable(peak)}, over the memory budget of "
                       f"{readable(budget)} less {margin:.0%} for the plan's error ({readable(usable)})")
            if strict:
                raise QLoRAPluginError(f"{message}. Lower it, raise --memory_budget, or drop --strict_budget.")
            notes.append(message)

    if explicit_batch is not None:
        batch = explicit_batch
        check_yours("per_device_train_batch_size", batch, p.train(batch))
    else:
        divisors = [b for b in range(1, samples_per_step + 1) if samples_per_step % b == 0]
        batch = _largest(lambda b: p.train(b) <= usable, divisors)
        if batch is None:
            raise QLoRAPluginError(_nothing_fits(config, name, strategy, options, settings, budget, usable, p, pm,
                                                 plan))
    if explicit_eval is not None:
        eval_batch = explicit_eval
        check_yours("per_device_eval_batch_size", eval_batch, p.eval(eval_batch, batch))
    else:
        eval_batch = _largest(lambda b: p.eval(b, batch) <= usable, range(1, max(eval_cap, 1) + 1)) or 1
        if p.eval(eval_batch, batch) > usable:
            notes.append(f"evaluation at batch 1 is predicted to peak at {readable(p.eval(1, batch))}, over the memory budget "
                         f"less {margin:.0%} for the plan's error ({readable(usable)})")
    return {
        "budget_bytes": budget, "per_device_train_batch_size": batch,
        "gradient_accumulation_steps": max(samples_per_step // batch, 1), "per_device_eval_batch_size": eval_batch,
        "predicted_peak_bytes": p.train(batch), "predicted_eval_peak_bytes": p.eval(eval_batch, batch),
        "largest_fitting_batch": _largest(lambda b: p.train(b) <= usable, range(1, 4 * samples_per_step + 1)),
        "usable_bytes": usable, "error_margin": margin,
        "notes": notes,
    }


def _nothing_fits(config, name, strategy, options, settings, budget, usable, p: Peaks, pm,
                  plan_strategy=plan_strategy) -> str:
    """What to change when batch 1 does not fit: the levers whose predicted peak at batch 1 fits what the budget
    really allows (the budget less the plan's error margin), each with that peak; else the budget that would do."""
    levers = []
    one = dataclasses.replace(settings, batch_size=1, eval_batch_size=1)
    if settings.seq_len > 64:
        shorter = dataclasses.replace(one, seq_len=settings.seq_len // 2)
        levers.append((f"--max_length {shorter.seq_len}", plan_strategy(config, name, strategy, options, shorter, pm)))
    if options.lora_r > 8:
        small = dataclasses.replace(options, lora_r=options.lora_r // 4)
        levers.append((f"--lora_r {small.lora_r}", plan_strategy(config, name, strategy, small, one, pm)))
    attention = dataclasses.replace(options, lora_target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    try:
        levers.append(("--lora_target_modules q_proj k_proj v_proj o_proj",
                       plan_strategy(config, name, strategy, attention, one, pm)))
    except QLoRAPluginError:
        pass  # another architecture's names: not a lever here
    if (settings.optim or "paged_adamw_32bit") != "paged_adamw_8bit":
        levers.append(("--optim paged_adamw_8bit",
                       plan_strategy(config, name, strategy, options, dataclasses.replace(one, optim="paged_adamw_8bit"),
                                     pm)))
    peaks_at_one = [(flag, plan.total_bytes + p.offset()) for flag, plan in levers]
    fitting = [(flag, peak) for flag, peak in peaks_at_one if peak <= usable]
    needed = readable(int(p.train(1) / (1 - p.margin)) + 1)
    head = (f"Nothing fits the memory budget of {readable(budget)} ({readable(usable)} usable: "
            f"{p.margin:.0%} is kept for the plan's error): even per-device batch 1 is predicted to peak at "
            f"{readable(p.train(1))}.")
    if fitting:
        listed = "; ".join(f"{flag}: {readable(peak)}" for flag, peak in fitting)
        return f"{head} Changes that fit, each alone, with their predicted peaks at batch 1: {listed}. " \
               f"Make one of them, or raise --memory_budget to at least {needed}."
    return f"{head} No single change fits; raise --memory_budget to at least {needed}, or combine " \
           f"{', '.join(flag for flag, _ in peaks_at_one) or 'a shorter --max_length and a smaller --lora_r'}."


def settings_for_run(training_args, device: str, compute: str, optim: str) -> PlanSettings:
    """The plan settings of a training run (as `predict_for_run` uses them)."""
    checkpointing = getattr(training_args, "activation_checkpointing", training_args.gradient_checkpointing)
    return PlanSettings(batch_size=1, seq_len=trained_length(training_args),
                        device="cuda" if device == "cuda" else "cpu", dtype=compute, optim=optim,
                        gradient_checkpointing=bool(checkpointing), malloc=running_malloc_mode())


def memory_in_use(device: str, model=None) -> int | None:
    """What this process holds now: on a GPU the caching allocator's reserved bytes plus the CUDA context (the
    plan's `runtime` term there, so it is not dropped); on CPU (Linux) the resident set plus the pages of `model`'s
    parameters and buffers not read yet (a weight mapped from its safetensors file joins the resident set when the
    first step reads it: `cpu.resident_pages`)."""
    if device == "cuda":
        return _cuda_held()
    resident = _proc_kib("/proc/self/status", "VmRSS")
    if resident is None or model is None:
        return resident
    from qlora_plugin.cpu.resident_pages import absent_bytes

    return resident + (absent_bytes([*model.parameters(), *model.buffers()]) or 0)
