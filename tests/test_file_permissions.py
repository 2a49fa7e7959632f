"""Everything the plugin writes ends with the permissions a plain write would give (0666 / 0777 less the umask),
not the 0600 safetensors 0.8 gives its files or the 0700 of `tempfile.mkdtemp`: others, containers and a shared
cache can read the adapter (issue 16, item 3)."""

from __future__ import annotations

import os
import stat

import pytest
from datasets import load_dataset

from conftest import DATA

UMASK = 0o027  # not the usual 022: the modes must follow the umask, not be fixed at 0644


@pytest.fixture
def umask_027():
    previous = os.umask(UMASK)
    try:
        yield
    finally:
        os.umask(previous)


def wrong_modes(root) -> list[str]:
    """Every file not 0640 and every folder not 0750 under `root` (what umask 027 gives a plain write)."""
    wrong = []
    for folder, names, files in os.walk(root):
        for name, expected in [(folder, 0o750), *((os.path.join(folder, f), 0o640) for f in files)]:
            mode = stat.S_IMODE(os.stat(name).st_mode)
            if mode != expected:
                wrong.append(f"{os.path.relpath(name, root)}: {oct(mode)}")
    return wrong


@pytest.mark.slow
def test_training_outputs_merge_and_cache_are_readable_like_plain_writes(tiny_models, tmp_path, umask_027,
                                                                          monkeypatch):
    from trl import SFTConfig

    from qlora_plugin import make_trainer
    from qlora_plugin.merge.merging import merge

    cache = tmp_path / "cache"
    monkeypatch.setenv("QLORA_PLUGIN_CACHE_DIR", str(cache))  # a fresh cache entry, written under this umask
    out = tmp_path / "out"
    args = SFTConfig(output_dir=str(out), max_steps=2, save_steps=1, per_device_train_batch_size=4, report_to="none",
                     use_cpu=True, max_length=32)
    trainer = make_trainer("qlora", model=tiny_models["llama"], args=args,
                           train_dataset=load_dataset(str(DATA))["train"])
    trainer.train()
    trainer.save_model()
    assert {"adapter_model.safetensors", "qlora_plugin_report.json", "qlora_plugin_quantization.json",
            "checkpoint-1", "checkpoint-2"} <= set(os.listdir(out))
    assert wrong_modes(out) == []
    entries = [e for e in os.listdir(cache) if not e.endswith(".json") and not e.startswith(".")]  # not .locks
    assert sorted(entries)[-1] == "lora-starts" and wrong_modes(cache / "lora-starts") == []  # the cached LoRA start
    entries.remove("lora-starts")
    assert len(entries) == 1 and wrong_modes(cache / entries[0]) == []

    merged = tmp_path / "merged"
    merge(str(out), str(merged))
    assert wrong_modes(merged) == []


@pytest.mark.slow
def test_tiny_model_and_plan_plot(tmp_path, umask_027):
    from qlora_plugin.plan.cli import main as plan
    from qlora_plugin.models.tiny_model import build_tiny_model

    model = tmp_path / "tiny"
    build_tiny_model(str(model), hidden_size=32, layers=1)
    assert wrong_modes(model) == []
    plot = tmp_path / "plots" / "memory.png"
    plot.parent.mkdir()
    assert plan([str(model), "--plot", str(plot)]) == 0
    assert wrong_modes(plot.parent) == []
