"""A hook file for `examples/bench/plan_grid.py --probe`: where a CPU training step's bytes go (a benchmark aid).

    python -m trl.scripts.sft ... --qlora_hooks examples/bench/memory_probe_hooks.py

Prints, as `[probe] ...` lines: the resident set when training begins (after the adapter's start), and for the
second step the peak of the bytes held by live torch tensors (every storage an operation creates, followed until
freed, by `TorchDispatchMode`), what was live when that peak was reached by kind of op, and the peak resident set
of the step. The gap between the two peaks is the allocator's (glibc) and the runtime's, not torch's.
"""

import collections
import ctypes
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import TrainerCallback

from qlora_plugin import hookimpl


def rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))


def hwm() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


try:
    _libc = ctypes.CDLL("libc.so.6")
    _libc.mallinfo2.restype = _Mallinfo2
except (OSError, AttributeError):  # not glibc 2.33+
    _libc = None


def heap() -> tuple[int, int]:
    """(glibc's heap bytes from the kernel, bytes in blocks mapped on their own): `mallinfo2`'s arena, hblkhd."""
    if _libc is None:
        return 0, 0
    info = _libc.mallinfo2()
    return info.arena, info.hblkhd


MAPPED = 32 * 2**20  # `qlora-plugin run`'s mmap threshold


class Live(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.now, self.peak, self.holders, self.by_op, self.at_peak = 0, 0, {}, collections.Counter(), None
        self.shapes, self.big_at_peak = {}, []
        self.max_arena, self.max_mapped, self.max_both, self.mapped_at_peak = 0, 0, 0, 0

    def _release(self, key, nbytes, op):
        self.holders[key] -= 1
        if not self.holders[key]:
            del self.holders[key]
            self.shapes.pop(key, None)
            self.now -= nbytes
            self.by_op[op] -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        op = str(func.overloadpacket.__name__)
        arena, mapped = heap()
        self.max_arena, self.max_mapped = max(self.max_arena, arena), max(self.max_mapped, mapped)
        self.max_both = max(self.max_both, arena + mapped)
        for t in torch.utils._pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key not in self.holders:
                self.holders[key] = 0
                self.now += storage.nbytes()
                self.by_op[op] += storage.nbytes()
                self.shapes[key] = (op, tuple(t.shape), str(t.dtype), storage.nbytes())
                if self.now > self.peak:
                    self.peak = self.now
                    self.at_peak = +self.by_op
                    self.big_at_peak = sorted(self.shapes.values(), key=lambda v: -v[3])[:8]
                    self.mapped_at_peak = sum(v[3] for v in self.shapes.values() if v[3] >= MAPPED)
            self.holders[key] += 1
            weakref.finalize(t, self._release, key, storage.nbytes(), op)
        return out


class Probe(TrainerCallback):
    def __init__(self):
        self.mode, self.step = None, 0

    def on_train_begin(self, args, state, control, **kwargs):
        print(f"[probe] train begin: rss {rss() / 2**20:.0f} MiB, hwm {hwm() / 2**20:.0f} MiB", flush=True)

    def on_step_begin(self, args, state, control, **kwargs):
        self.step += 1
        if self.step == 2:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.before = rss()
            self.heap_before = heap()
            self.mode = Live()
            self.mode.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if self.mode is not None:
            self.mode.__exit__(None, None, None)
            top = ", ".join(f"{op} {b / 2**20:.0f}" for op, b in self.mode.at_peak.most_common(12))
            print(f"[probe] step 2: rss before {self.before / 2**20:.0f} MiB, step's peak rss {hwm() / 2**20:.0f} "
                  f"MiB; live torch tensors created in the step: peak {self.mode.peak / 2**20:.0f} MiB ({top})",
                  flush=True)
            m = self.mode
            print(f"[probe] step 2 heap: arena {self.heap_before[0] / 2**20:.0f} -> max {m.max_arena / 2**20:.0f} MiB, "
                  f"mapped {self.heap_before[1] / 2**20:.0f} -> max {m.max_mapped / 2**20:.0f} MiB, arena+mapped max "
                  f"{m.max_both / 2**20:.0f} MiB; at the live peak {m.mapped_at_peak / 2**20:.0f} MiB in storages of "
                  f">= 32 MiB; largest: " + ", ".join(f"{op} {shape} {dtype} {n / 2**20:.0f}"
                                                      for op, shape, dtype, n in m.big_at_peak[:5]), flush=True)
            self.mode = None


@hookimpl
def qlora_trainer_callbacks():
    return [Probe()]
