"""Fit a run to a memory budget before it starts: the largest per-device batch the plan predicts to fit.

Why: the usual answer to running out of memory is to halve the batch after the crash (HF's
`auto_find_batch_size`); the plan already knows what each batch costs, so the run starts with the largest that
fits and never crashes for it. Gradient accumulation takes up the rest, so the effective batch (per-device x
accumulation x ranks) is the one you asked for. Every term of the plan is exact in the batch except activations,
which are linear in it (every saved or transient tensor has a batch dimension), so two plans (batch 1 and 2) give
the peak for every batch, training and evaluation.
"""

from __future__ import annotations

import dataclasses

from qlora_plugin.errors import QLoRAPluginError
from qlora_plugin.options import StrategyOptions
from qlora_plugin.plan.estimate import PlanSettings, plan_strategy
from qlora_plugin.sizes import parse_memory

MiB = 2**20
# `auto` on CUDA: the device's total memory less what its driver and context hold before the allocator sees any
# of it (~0.5-1 GiB on current GPUs), less a tenth for the allocator's fragmentation; on CPU: what the kernel
# reports available now, less a tenth for the page cache and other processes.
AUTO_CUDA_RESERVE = 1024 * MiB
AUTO_FRACTION = 0.9
# Left unused for the plan's own error: measured on CPU from 4% under (this bf16-native machine,
# examples/budget_accuracy.py) to 12% over (docs/plan.md) the real peak.
PLAN_ERROR_MARGIN = 0.05


def budget_bytes(text: str, device: str) -> tuple[int, str]:
    """(bytes, how they were found) for `--memory_budget TEXT` on `device`."""
    if text != "auto":
        return parse_memory(text, "--memory_budget"), "as given"
    if device == "cuda":
        import torch

        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        return int((total - AUTO_CUDA_RESERVE) * AUTO_FRACTION), f"auto: 90% of the GPU's {total / 2**30:.1f} GiB " \
                                                                  "less 1 GiB for its context"
    available = _proc_kib("/proc/meminfo", "MemAvailable")
    if available is None:
        raise QLoRAPluginError("`--memory_budget auto` needs /proc/meminfo on CPU; give a size instead (e.g. 16GiB).")
    return int(available * AUTO_FRACTION), f"auto: 90% of the {available / 2**30:.1f} GiB this machine has available"


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
    """Predicted training and evaluation peaks as functions of the per-device batch."""

    train_base: int
    train_per_sample: int
    eval_base: int
    eval_per_sample: int
    resident: int = 0  # what is in memory before training starts (weights, adapters, runtime), as predicted
    in_use: int | None = None  # the same, measured in a live run: replaces the prediction of it

    def offset(self) -> int:
        return 0 if self.in_use is None else self.in_use - self.resident

    def train(self, batch: int) -> int:
        return self.train_base + batch * self.train_per_sample + self.offset()

    def eval(self, batch: int) -> int:
        return self.eval_base + batch * self.eval_per_sample + self.offset()


def peaks(config, name, strategy, options: StrategyOptions, settings: PlanSettings, pm=None,
          in_use: int | None = None) -> Peaks:
    """The peaks as lines in the batch. `in_use`: memory a live run holds now (model loaded, runtime started),
    measured; it replaces the plan's weights, adapters and runtime terms, so the choice rests on what this process
    really holds (the runtime term is a measured constant from one machine)."""
    one = plan_strategy(config, name, strategy, options, dataclasses.replace(settings, batch_size=1,
                                                                                 eval_batch_size=1), pm)
    two = plan_strategy(config, name, strategy, options, dataclasses.replace(settings, batch_size=2,
                                                                                 eval_batch_size=2), pm)
    train_slope, eval_slope = two.total_bytes - one.total_bytes, two.eval_bytes - one.eval_bytes
    resident = sum(one.components[k] for k in ("weights", "adapters", "runtime"))
    return Peaks(one.total_bytes - train_slope, train_slope, one.eval_bytes - eval_slope, eval_slope, resident,
                 in_use)


def _largest(fits, candidates) -> int | None:
    return next((c for c in sorted(candidates, reverse=True) if fits(c)), None)


def choose(config, name, strategy, options: StrategyOptions, settings: PlanSettings, budget: int,
           samples_per_step: int, eval_cap: int, explicit_batch: int | None = None,
           explicit_eval: int | None = None, strict: bool = False, pm=None, in_use: int | None = None) -> dict:
    """The batch sizes for `budget`: `samples_per_step` (per device, per optimizer step) is kept as batch x
    accumulation. Explicit batch sizes are checked, not changed. Raises when nothing fits, naming the levers."""
    p = peaks(config, name, strategy, options, settings, pm, in_use)
    usable = int(budget * (1 - PLAN_ERROR_MARGIN))
    notes = []

    def check_yours(flag: str, value: int, peak: int) -> None:
        if peak > usable:
            message = (f"{flag}={value} is predicted to peak at {peak / MiB:,.0f} MiB, over the memory budget of "
                       f"{budget / MiB:,.0f} MiB less {PLAN_ERROR_MARGIN:.0%} for the plan's error")
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
            raise QLoRAPluginError(_nothing_fits(config, name, strategy, options, settings, budget, p, pm))
    if explicit_eval is not None:
        eval_batch = explicit_eval
        check_yours("per_device_eval_batch_size", eval_batch, p.eval(eval_batch))
    else:
        eval_batch = _largest(lambda b: p.eval(b) <= usable, range(1, max(eval_cap, 1) + 1)) or 1
        if p.eval(eval_batch) > usable:
            notes.append(f"evaluation at batch 1 is predicted to peak at {p.eval(1) / MiB:,.0f} MiB, over the budget")
    return {
        "budget_bytes": budget, "per_device_train_batch_size": batch,
        "gradient_accumulation_steps": max(samples_per_step // batch, 1), "per_device_eval_batch_size": eval_batch,
        "predicted_peak_bytes": p.train(batch), "predicted_eval_peak_bytes": p.eval(eval_batch),
        "largest_fitting_batch": _largest(lambda b: p.train(b) <= usable, range(1, 4 * samples_per_step + 1)),
        "usable_bytes": usable,
        "notes": notes,
    }


def _nothing_fits(config, name, strategy, options, settings, budget, p: Peaks, pm) -> str:
    """What to change when batch 1 does not fit, each lever with its predicted peak at batch 1."""
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
    listed = "; ".join(f"{flag}: {(plan.total_bytes + p.offset()) / MiB:,.0f} MiB" for flag, plan in levers)
    return (f"Nothing fits the memory budget of {budget / MiB:,.0f} MiB: even per-device batch 1 is predicted to peak "
            f"at {p.train(1) / MiB:,.0f} MiB. Predicted peaks at batch 1 with one change each: {listed}. "
            "Change one of these, or raise --memory_budget.")


def settings_for_run(training_args, device: str, compute: str, optim: str) -> PlanSettings:
    """The plan settings of a training run (as `predict_for_run` uses them)."""
    return PlanSettings(batch_size=1, seq_len=training_args.max_length or 1024,
                        device="cuda" if device == "cuda" else "cpu", dtype=compute, optim=optim,
                        gradient_checkpointing=bool(training_args.gradient_checkpointing))


def memory_in_use(device: str) -> int | None:
    """What this process holds now: the CUDA allocator's allocated bytes, or the resident set on CPU (Linux)."""
    if device == "cuda":
        import torch

        return int(torch.cuda.memory_allocated())
    return _proc_kib("/proc/self/status", "VmRSS")
