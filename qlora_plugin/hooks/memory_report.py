"""Observe training: peak memory and throughput every `logging_steps`, added to the trainer's logs.

    QLORA_PLUGIN_HOOKS=memory_report python -m trl.scripts.sft ... --strategy qlora

At each loss log it prints one line with `peak_mem_mb` (CUDA allocator peak on GPU, peak resident set on CPU)
and `tokens_per_s` since the previous log, and adds both to `trainer.state.log_history` (so they are saved in
`trainer_state.json` with the checkpoint).
"""

import time

from transformers import TrainerCallback

from qlora_plugin import hookimpl
from qlora_plugin.training.report import peak_memory


class MemoryThroughputCallback(TrainerCallback):
    def __init__(self):
        self._last_time = None
        self._last_tokens = 0

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs:
            return
        figures = {"peak_mem_mb": round(peak_memory()["peak_memory_bytes"] / 2**20, 1)}
        now, tokens = time.perf_counter(), int(float(logs.get("num_tokens", 0) or 0))
        if self._last_time is not None and now > self._last_time:
            figures["tokens_per_s"] = round((tokens - self._last_tokens) / (now - self._last_time), 1)
        self._last_time, self._last_tokens = now, tokens
        if state.log_history:
            state.log_history[-1].update(figures)
        if state.is_world_process_zero:
            print(f"[memory_report] step {state.global_step}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))


@hookimpl
def qlora_trainer_callbacks(training_args):
    return [MemoryThroughputCallback()]
