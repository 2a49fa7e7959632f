"""How many bytes of a model's CPU tensors are not in this process's memory yet (Linux `/proc/self/pagemap`), for
`--memory_budget` on CPU.

Why: a model loaded from safetensors on CPU keeps every tensor whose dtype it did not change (the 16-bit
embeddings and LM head, the norms, a 4-bit base read from the quantized cache) as a view of the file's memory
map, and a page of it joins the process's resident set only when something first reads it. When the budget
measures what the process holds, before the first step, the LM head has not been read: measured with a 1024-wide
model and a 128,256-entry vocabulary, the resident set grew by 256 MiB when the head first ran. A choice made on
the resident set alone would count that much too little; adding the pages not yet present counts every weight
whole, as the plan does (an untied input embedding whose rows the data never reads stays unread: an upper bound).

How: `/proc/self/pagemap` has one 64-bit entry per virtual page of this process; bit 63 says the page is present
in memory (readable without privileges; the frame numbers, which need them, are not used).
"""

from __future__ import annotations

import os

PAGEMAP = "/proc/self/pagemap"
PRESENT = 1 << 63


def _page_spans(tensors, page: int) -> list[tuple[int, int]]:
    """The page ranges [first, last) spanned by the distinct CPU storages behind `tensors`, merged."""
    spans = set()
    for tensor in tensors:
        if tensor.device.type != "cpu":
            continue
        storage = tensor.untyped_storage()
        if storage.nbytes():
            spans.add((storage.data_ptr() // page, (storage.data_ptr() + storage.nbytes() - 1) // page + 1))
    merged: list[tuple[int, int]] = []
    for first, last in sorted(spans):
        if merged and first <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], last))
        else:
            merged.append((first, last))
    return merged


def absent_bytes(tensors) -> int | None:
    """Bytes of the pages behind `tensors` (CPU ones; each storage once) that are not in this process's memory:
    never read since they were mapped, or swapped out. Whole pages, so it can exceed the tensors' own bytes by a
    page per storage. None where `/proc/self/pagemap` cannot be read (not Linux, or a restricted container)."""
    import torch

    page = os.sysconf("SC_PAGE_SIZE")
    spans = _page_spans(tensors, page)
    absent = 0
    try:
        with open(PAGEMAP, "rb", buffering=0) as pagemap:
            for first, last in spans:
                pagemap.seek(first * 8)
                entries = torch.frombuffer(bytearray(pagemap.read((last - first) * 8)), dtype=torch.int64)
                absent += int((entries >= 0).sum())  # bit 63 clear: not present (an int64 >= 0)
    except OSError:
        return None
    return absent * page
