"""Bytes held by live tensors, followed op by op: how `plan` counts transients on meta tensors (evaluation, TRL's
fused LM head), and how its tests compare those counts with the same code run on real tensors."""

from __future__ import annotations


class LiveBytes:
    """While entered: the bytes of every storage an operation creates, followed until its last tensor is freed
    (`now`, and the most at once, `peak`), the way the allocator sees them. Works on meta tensors.

    `existing`: tensors made before entering (inputs, weights). A view of one (TRL's fused head slices its weight
    per vocabulary chunk) shares its storage and allocates nothing, so it is not counted: counting it added the
    whole head weight to the head's transient, 54 MiB at SmolLM2-135M's vocabulary, 256 MiB at 128k x 1024."""

    def __init__(self, existing=(), heap_below: int | None = None):
        self.now, self.peak, self._mode = 0, 0, None
        # with `heap_below`: of the bytes live at the peak, those in storages under it (`peak_heap`; the CPU heap
        # serves blocks under glibc's mmap threshold, `plan.allocator`)
        self.heap_below, self.heap_now, self.peak_heap = heap_below, 0, 0
        self._existing = {t.untyped_storage()._cdata for t in existing}

    def restart_peak(self) -> None:
        """Follow a new peak from what is live now (a second phase, e.g. the backward after the forward)."""
        self.peak, self.peak_heap = self.now, self.heap_now

    def _on_heap(self, nbytes: int) -> bool:
        return self.heap_below is not None and nbytes < self.heap_below

    def __enter__(self):
        import weakref

        import torch
        from torch.utils._python_dispatch import TorchDispatchMode

        holders: dict[int, int] = {}  # storage -> how many live tensors use it (a storage is freed with its last)
        live = self

        def release(key, nbytes):
            holders[key] -= 1
            if not holders[key]:
                del holders[key]
                live.now -= nbytes
                live.heap_now -= nbytes if live._on_heap(nbytes) else 0

        class Track(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in torch.utils._pytree.tree_leaves(out):
                    if not isinstance(t, torch.Tensor):
                        continue
                    storage = t.untyped_storage()
                    key = storage._cdata  # views and `_unsafe_view` results share their input's storage
                    if key in live._existing:
                        continue
                    if key not in holders:
                        holders[key] = 0
                        live.now += storage.nbytes()
                        live.heap_now += storage.nbytes() if live._on_heap(storage.nbytes()) else 0
                        if live.now > live.peak:
                            live.peak, live.peak_heap = live.now, live.heap_now
                    holders[key] += 1
                    weakref.finalize(t, release, key, storage.nbytes())
                return out

        self._mode = Track()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        self._mode = None
        return False
