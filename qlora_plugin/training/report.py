"""What the user sees: one summary when the trainer is ready, and `qlora_plugin_report.json` in `output_dir`
with the same facts plus measured peak memory and throughput when training ends."""

from __future__ import annotations

import os
import resource
import sys
import time

from transformers import TrainerCallback

from qlora_plugin.core.files import write_json_atomic
from qlora_plugin.plan.estimate import padded_length
from qlora_plugin.plugin.specs import hookimpl
from qlora_plugin.quant.backends import backend_named
from qlora_plugin.strategies.calibration import describe

REPORT_FILE = "qlora_plugin_report.json"


def peak_memory() -> dict:
    """Peak memory so far: on a GPU what the CUDA caching allocator reserved (what the GPU gave the process,
    beside what it allocated), else the process's peak resident set. Neither CUDA figure holds the CUDA context
    or bitsandbytes' paged optimizer state (CUDA unified memory)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return {"peak_memory_bytes": int(torch.cuda.max_memory_reserved()), "memory_kind": "cuda_max_reserved",
                "peak_allocated_bytes": int(torch.cuda.max_memory_allocated())}
    return {"peak_memory_bytes": _peak_rss_bytes(), "memory_kind": "process_peak_rss"}


def _peak_rss_bytes() -> int:
    """The process's peak resident set: on Linux `VmHWM` (what `reset_peak_memory` resets); `getrusage`'s
    `ru_maxrss` is not reset by it, and it keeps the peak of any thread that exited (a notebook's or a test
    session's earlier work), so it is only the fallback."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is KiB on Linux, bytes on macOS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def reset_peak_memory() -> None:
    """Start a new peak (called when training begins, so the peak is training's, not loading's): the CUDA
    allocator's peak, and on Linux the process's peak RSS (`/proc/self/clear_refs`, value 5)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # not Linux: the peak then includes loading


def _setting(name: str, value) -> str:
    """One recipe setting as the summary shows it: `warmup_steps` below 1 is a share of the steps (transformers)."""
    if name == "warmup_steps" and isinstance(value, float) and 0 < value < 1:
        return f"{name}={value} ({value:.0%} of the steps)"
    return f"{name}={value}"


def _plugins(loaded: dict) -> str:
    parts = [f"{what} {', '.join(loaded[key])}" for key, what in
             (("hook_files", "hook files"), ("packaged_hooks", "packaged hooks"), ("installed", "installed plugins"))
             if loaded.get(key)]
    return "; ".join(parts) or "built-in only (no hook files, no installed plugins)"


def format_summary(facts: dict) -> str:
    q, a, o = facts.get("quantization"), facts["adapter"], facts["optimizer"]
    lines = [f"[qlora-plugin] strategy {facts['strategy']} (from {facts['plugin']}, requested via {facts['source']})"]
    if facts.get("trainer_kind", "sft") != "sft":
        lines.append(f"  trainer    : {facts['trainer']} (trl {facts['trainer_kind']})")
    if facts.get("reference"):
        lines.append(f"  reference  : {facts['reference']}")
    if facts.get("loaded_by", "strategy") != "strategy":
        lines.append(f"  loaded by  : {facts['loaded_by']}")
    if "plugins" in facts:
        lines.append(f"  plugins    : {_plugins(facts['plugins'])}")
    if q:
        lines.append("  " + backend_named(q.get("backend", "bnb_4bit")).summary_line(q))
        if q.get("cached_base"):
            lines.append(f"  cached     : 4-bit base loaded from {q['cached_base']}")
    else:
        lines.append(f"  base       : 16-bit, not quantized ({facts['model'].get('dtype')})")
    lines.append(
        f"  LoRA       : r={a['r']} alpha={a['alpha']} dropout={a['dropout']} on {a['layers']} layers "
        f"({', '.join(a['target_modules'])}); trainable {a['trainable_params']:,} of {a['total_params']:,} "
        f"params ({100 * a['trainable_params'] / max(a['total_params'], 1):.2f}%)"
    )
    init = a.get("init") or {}
    if init.get("pending"):
        lines.append(f"  LoRA init  : {init['method']}: a rank-{a['r']} correction of the 4-bit error, weighted by the "
                     f"inputs of the first {init['examples']} training examples, computed when training starts "
                     "(init_lora_weights)")
    elif "error_cancelled" in init:
        lines.append("  " + describe(init).replace("LoRA init:", "LoRA init  :"))
    elif init.get("method"):
        lines.append(f"  LoRA init  : {init['method']} (init_lora_weights)" + (f"; {init['note']}" if init.get("note") else ""))
    for label, text in facts.get("summary_lines", ()):  # the plugins' own lines (`qlora_summary_lines`)
        lines.append(f"  {label:<11}: {text}")
    budget = facts.get("memory_budget")
    if budget:
        lines.append(f"  memory     : budget {budget['budget_bytes'] / 2**20:,.0f} MiB ({budget['how']}): per-device batch "
                     f"{budget['per_device_train_batch_size']} x accumulation {budget['gradient_accumulation_steps']}, "
                     f"eval batch {budget['per_device_eval_batch_size']}; predicted peak "
                     f"{budget['predicted_peak_bytes'] / 2**20:,.0f} MiB (eval {budget['predicted_eval_peak_bytes'] / 2**20:,.0f} MiB)"
                     + (f"; {budget['error_margin']:.0%} of the budget kept for the plan's error"
                        if "error_margin" in budget else ""))
    lines.append(f"  optimizer  : {o['name']}" + (f" ({o['class']})" if o.get("class") else ""))
    if facts["recipe_applied"]:
        lines.append("  recipe     : " + ", ".join(_setting(k, v) for k, v in facts["recipe_applied"].items()))
    if facts["user_kept"]:
        lines.append("  yours kept : " + ", ".join(facts["user_kept"]))
    for note in facts["fallbacks"]:
        lines.append(f"  fell back  : {note}")
    return "\n".join(lines)


def prediction_error(memory: dict, measured: int) -> float | None:
    """predicted / measured - 1, like against like: on a GPU the plan's allocator part (no CUDA context, no paged
    optimizer state) against `max_memory_reserved`; on the CPU the whole plan against the process's peak RSS."""
    cuda = memory.get("memory_kind") == "cuda_max_reserved"
    predicted = memory.get("predicted_allocator_bytes") if cuda else \
        memory.get("predicted_step_peak_bytes", memory.get("predicted_peak_bytes"))
    return round(predicted / measured - 1, 4) if predicted and measured else None


def longest_row(*dataloaders, multiple: int | None = None) -> int | None:
    """The most tokens in one row of the tokenized datasets behind `dataloaders` (their `input_ids` column),
    rounded up to `multiple` (`pad_to_multiple_of`); None when no dataset says. Collators pad each batch to its
    longest row: a run whose rows are all shorter than `max_length` never holds `max_length` tokens."""
    longest = None
    for loader in dataloaders:
        data = getattr(getattr(loader, "dataset", None), "data", None)  # a datasets.Dataset's Arrow table
        try:
            import pyarrow.compute as pc

            lengths = pc.list_value_length(data.column("input_ids"))
            most = pc.max(lengths).as_py()
        except Exception:  # noqa: BLE001 - not a tokenized datasets.Dataset (iterable, packed, custom): unknown
            return None
        if most is not None:
            longest = max(longest or 0, most)
    return padded_length(longest, multiple) if longest else longest


def replan_for_rows(facts: dict, args, dataloaders) -> None:
    """Re-plan the run's memory for the longest row it really had when that is shorter than the planned
    `max_length` (the prediction made before the data was tokenized), keeping the first prediction beside it."""
    memory, replan = facts.get("memory"), facts.pop("_memory_at", None)
    planned = (memory or {}).get("predicted_for", {}).get("seq_len")
    longest = longest_row(*dataloaders, multiple=getattr(args, "pad_to_multiple_of", None))
    if not (memory and replan and planned and longest) or longest >= planned:
        return
    again = replan(seq_len=longest)
    if again.get("predicted_peak_bytes"):
        first = {k: memory[k] for k in ("predicted_peak_bytes", "predicted_step_peak_bytes")}
        memory.update(again, predicted_at_max_length=first)
        memory["predicted_for"]["longest_row"] = longest


PREDICTION_TOLERANCE = 0.10  # the plan's validated accuracy (docs/plan.md): beyond it a run says so


def prediction_off_line(memory: dict) -> str | None:
    """One line when the measured peak is more than `PREDICTION_TOLERANCE` off the plan's prediction, so that shapes
    the plan was not validated at get reported; None otherwise."""
    error = memory.get("prediction_error")
    if error is None or abs(error) <= PREDICTION_TOLERANCE:
        return None
    predicted = memory.get("predicted_allocator_bytes") if memory.get("memory_kind") == "cuda_max_reserved" \
        else memory.get("predicted_step_peak_bytes", memory.get("predicted_peak_bytes"))
    return (f"[qlora-plugin] memory: measured peak {memory['measured_peak_bytes'] / 2**20:,.0f} MiB, plan predicted "
            f"{predicted / 2**20:,.0f} MiB ({error:+.0%}: more than {PREDICTION_TOLERANCE:.0%} off); please report "
            "the model's config.json and this run's command (docs/plan.md, Measured accuracy)")


class StrategyReportCallback(TrainerCallback):
    """Prints the summary when the trainer is built and writes the JSON report when training ends."""

    def __init__(self, facts: dict):
        self.facts = facts
        self._start = None

    def on_init_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            print(format_summary(self.facts), flush=True)

    def on_train_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()
        reset_peak_memory()

    def on_train_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        logs = [entry for entry in state.log_history if "loss" in entry]
        train = next((e for e in reversed(state.log_history) if "train_runtime" in e), {})
        runtime = train.get("train_runtime") or (time.perf_counter() - (self._start or time.perf_counter()))
        tokens = next((e.get("num_tokens") for e in reversed(state.log_history) if "num_tokens" in e), None)
        measured = {
            **peak_memory(),
            "steps": state.global_step,
            "train_runtime_s": round(runtime, 3),
            "train_samples_per_second": train.get("train_samples_per_second"),
            "train_tokens_per_second": round(tokens / runtime, 2) if tokens and runtime else None,
            "first_loss": logs[0]["loss"] if logs else None,
            "final_loss": logs[-1]["loss"] if logs else None,
        }
        self.facts["measured"] = measured
        replan_for_rows(self.facts, args, (kwargs.get("train_dataloader"), kwargs.get("eval_dataloader")))
        memory = self.facts.get("memory")
        if memory is not None:  # the plan's prediction beside what was measured
            memory.update(measured_peak_bytes=measured["peak_memory_bytes"], memory_kind=measured["memory_kind"])
            memory["prediction_error"] = prediction_error(memory, measured["peak_memory_bytes"])
            off = prediction_off_line(memory)
            if off:
                print(off, flush=True)
        path = os.path.join(args.output_dir, REPORT_FILE)
        write_json_atomic(path, self.facts)
        print(f"[qlora-plugin] report written to {path}", flush=True)


@hookimpl(trylast=True)
def qlora_trainer_callbacks(facts):
    """Last, so other callbacks' `on_train_begin` (e.g. releasing load-time memory) runs before the peak starts."""
    return [StrategyReportCallback(facts)]
