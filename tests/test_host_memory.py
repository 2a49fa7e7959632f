"""`release_memory_after_load`: the heap memory freed while loading goes back to the OS when training starts."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import load_dataset

from conftest import DATA

from qlora_plugin.cpu import host_memory

needs_glibc = pytest.mark.skipif(host_memory._glibc() is None, reason="malloc_trim is glibc's (Linux)")


@needs_glibc
@pytest.mark.slow
def test_freed_heap_in_the_middle_of_the_heap_is_returned():
    blocks = [torch.ones(25_000) for _ in range(2000)]  # ~200 MB of 100 kB blocks: heap, not mmap
    pin = torch.ones(25_000)  # allocated above them, so freeing them cannot shrink the heap by itself
    del blocks
    released = host_memory.release_freed_heap()
    assert released is not None and released > 100, released
    del pin


@pytest.mark.parametrize("release", [True, False])
@pytest.mark.slow
def test_training_report_says_what_was_released(tiny_models, tmp_path, release):
    from trl import SFTConfig

    from qlora_plugin import make_trainer

    args = SFTConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, report_to="none",
                     use_cpu=True, save_strategy="no", max_length=32)
    trainer = make_trainer("qlora", model=tiny_models["llama"], args=args,
                           train_dataset=load_dataset(str(DATA))["train"],
                           options={"release_memory_after_load": release})
    trainer.train()
    report = json.loads((tmp_path / "qlora_plugin_report.json").read_text())
    if not release:
        assert "released_after_load_mib" not in report
    elif host_memory._glibc() is not None:
        assert report["released_after_load_mib"] >= 0
