"""A hook file for `examples/bench/plan_grid.py --probe`: where a CPU training step's bytes go (a benchmark aid).

    python -m trl.scripts.sft ... --qlora_hooks examples/bench/memory_probe_hooks.py

Prints, as `[probe] ...` lines: the resident set when training begins (after the adapter's start), and for the
second step the peak of the bytes held by live torch tensors (every storage an operation creates, followed until
freed, by `TorchDispatchMode`), what was live when that peak was reached by kind of op, and the peak resident set
of the step. The gap between the two peaks is the allocator's (glibc) and the runtime's, not torch's.
"""

import collections
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


class Live(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.now, self.peak, self.holders, self.by_op, self.at_peak = 0, 0, {}, collections.Counter(), None
        self.shapes, self.big_at_peak = {}, []

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
            self.mode = Live()
            self.mode.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if self.mode is not None:
            self.mode.__exit__(None, None, None)
            top = ", ".join(f"{op} {b / 2**20:.0f}" for op, b in self.mode.at_peak.most_common(12))
            print(f"[probe] step 2: rss before {self.before / 2**20:.0f} MiB, step's peak rss {hwm() / 2**20:.0f} "
                  f"MiB; live torch tensors created in the step: peak {self.mode.peak / 2**20:.0f} MiB ({top})",
                  flush=True)
            self.mode = None


@hookimpl
def qlora_trainer_callbacks():
    return [Probe()]
