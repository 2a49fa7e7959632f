"""Hand the memory that loading freed back to the operating system before training starts.

Why: loading the base, tokenizing the dataset and wrapping the model allocate and free memory that glibc keeps in
its heap for reuse, so the process stays that much larger for the whole run.
Resident memory is what a container limit or the OOM killer counts, and on a CPU run it is the headroom training
needs. `malloc_trim(0)` returns free heap pages to the kernel; training then takes back only what it uses. One
call, milliseconds.

glibc only (Linux); on other C libraries this does nothing. Off with `release_memory_after_load: false`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

from transformers import TrainerCallback

from qlora_plugin.plugin.specs import hookimpl

logger = logging.getLogger(__name__)


def _glibc():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") else None


def _anon_mib() -> float | None:
    """The process's anonymous resident memory (Linux), MiB."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def release_freed_heap() -> float | None:
    """`malloc_trim(0)`; returns the MiB of resident memory it gave back (None where unsupported)."""
    libc = _glibc()
    if libc is None:
        return None
    before = _anon_mib()
    libc.malloc_trim(0)
    after = _anon_mib()
    if before is None or after is None:
        return None
    return max(before - after, 0.0)


class ReleaseMemoryAfterLoad(TrainerCallback):
    """At `on_train_begin` (model, data and optimizer built): release the freed heap, say how much, note it."""

    def __init__(self, facts: dict):
        self.facts = facts

    def on_train_begin(self, args, state, control, **kwargs):
        released = release_freed_heap()
        self.facts["released_after_load_mib"] = None if released is None else round(released, 1)
        if released and state.is_world_process_zero:
            logger.info("Returned %.0f MiB of memory freed while loading to the operating system.", released)


@hookimpl
def qlora_trainer_callbacks(options, facts):
    return [ReleaseMemoryAfterLoad(facts)] if options.release_memory_after_load else []
