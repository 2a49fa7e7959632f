"""Quantize once: the streamed 4-bit cache is bit-identical to quantizing at load time, is reused, is keyed on
content and settings, and is never left half-written."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import TRAIN_FLAGS, run_python


def _bnb_config(double_quant=True):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_compute_dtype=torch.float32)


def _kwargs(double_quant=True):
    return {"quantization_config": _bnb_config(double_quant), "dtype": torch.float32}


def _dequantized(model) -> dict:
    import bitsandbytes.functional as F

    from qlora_plugin.quant.layers import four_bit_layers

    return {id(layer): F.dequantize_4bit(layer.weight.data, layer.weight.quant_state) for layer in four_bit_layers(model)}


@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi3"])  # plain Linear, GPT-2 Conv1D (transposed), fused qkv
@pytest.mark.slow
def test_cached_base_is_bit_identical_to_load_time_quantization(tiny_models, arch):
    from transformers import AutoModelForCausalLM

    from qlora_plugin.quant.cache import cached_base
    from qlora_plugin.quant.layers import four_bit_layers

    entry = cached_base(tiny_models[arch], _kwargs())
    assert entry and os.path.isfile(os.path.join(entry, "qlora_plugin_cache.json"))
    direct = AutoModelForCausalLM.from_pretrained(tiny_models[arch], **_kwargs())
    cached = AutoModelForCausalLM.from_pretrained(entry, dtype=torch.float32)
    assert len(four_bit_layers(cached)) == len(four_bit_layers(direct)) > 0
    a, b = direct.state_dict(), cached.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)  # packed codes, absmax, nested constants, unquantized tensors
    ids = torch.arange(1, 17).unsqueeze(0)
    assert torch.equal(direct(ids).logits, cached(ids).logits)


def test_second_lookup_reuses_the_entry(tiny_models, monkeypatch):
    from qlora_plugin.quant import cache as quantized_cache

    entry = quantized_cache.cached_base(tiny_models["llama"], _kwargs())

    def must_not_quantize(*args, **kwargs):
        raise AssertionError("quantized again")

    monkeypatch.setattr(quantized_cache, "_quantize_into", must_not_quantize)
    assert quantized_cache.cached_base(tiny_models["llama"], _kwargs()) == entry


@pytest.mark.slow
def test_key_follows_content_and_settings(tiny_models, tmp_path):
    from safetensors.torch import load_file, save_file

    from qlora_plugin.quant.cache import cached_base

    source = tmp_path / "model"
    shutil.copytree(tiny_models["llama"], source)
    first = cached_base(str(source), _kwargs())
    assert cached_base(str(source), _kwargs(double_quant=False)) != first
    weights = load_file(source / "model.safetensors")
    weights["model.layers.0.mlp.up_proj.weight"] += 1.0
    save_file(weights, source / "model.safetensors", metadata={"format": "pt"})
    assert cached_base(str(source), _kwargs()) != first


def test_key_follows_the_device_kind_and_the_library_versions():
    """bitsandbytes quantizes with a CUDA kernel on a GPU and with torch ops on the CPU (different code, bytes not
    assumed equal): entries made on each are kept apart, and torch's version is in the key with bitsandbytes'."""
    import bitsandbytes

    from qlora_plugin.quant.cache import _entry_name, _settings, quantizing_device
    from qlora_plugin.ecosystem.runtime import Runtime

    cpu, gpu0, gpu1 = (_settings(_bnb_config(), torch.float32, d) for d in ("cpu", "cuda:0", "cuda:1"))
    assert cpu["torch"] == torch.__version__.split("+")[0] and cpu["bitsandbytes"] == bitsandbytes.__version__
    assert (cpu["device"], gpu0["device"]) == ("cpu", "cuda") and gpu0 == gpu1  # the kernel, not which GPU
    assert _entry_name("m", {}, cpu) != _entry_name("m", {}, gpu0)
    assert quantizing_device(Runtime("cuda", True, "ddp", process_index=1, num_processes=2, device_index=1)) == "cuda:1"
    assert quantizing_device(Runtime("cuda", True, "ddp", process_index=1, num_processes=2, device_index=0)) == "cuda:0"
    assert quantizing_device(Runtime("cpu", False, "ddp", process_index=1, num_processes=2)) == "cpu"


def test_one_process_makes_a_missing_entry_while_the_others_wait(tiny_models, tmp_path, monkeypatch):
    """Waiting is a lock file per entry (no collective, so no process-group timeout however long it takes)."""
    import threading
    import time

    from qlora_plugin.quant import cache as quantized_cache

    monkeypatch.setenv("QLORA_PLUGIN_CACHE_DIR", str(tmp_path / "cache"))
    made, original = [], quantized_cache._quantize_into

    def slow_quantize(*args):
        made.append(threading.get_ident())
        time.sleep(1.0)  # long enough that the other caller arrives while this one works
        return original(*args)

    monkeypatch.setattr(quantized_cache, "_quantize_into", slow_quantize)
    entries = []
    workers = [threading.Thread(target=lambda: entries.append(quantized_cache.cached_base(tiny_models["llama"],
                                                                                         _kwargs())))
               for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert len(made) == 1 and len(entries) == 2 and entries[0] == entries[1] is not None


def test_record_names_the_device_that_quantized_a_cached_base(tiny_models, tmp_path, monkeypatch):
    """The quantization record beside the adapter (what `merge` quantizes on again) is the entry's device, not
    the device the weights were loaded onto: a CPU-made entry loaded on a GPU said `cuda`. Simulated by an entry
    that says it was made on a GPU, loaded on the CPU."""
    from qlora_plugin.core.options import StrategyOptions
    from qlora_plugin.quant import cache as quantized_cache
    from qlora_plugin.quant.record import quantization_record
    from qlora_plugin.ecosystem.runtime import Runtime

    monkeypatch.setenv("QLORA_PLUGIN_CACHE_DIR", str(tmp_path / "cache"))
    entry = quantized_cache.cached_base(tiny_models["llama"], _kwargs())
    runtime = Runtime("cpu", False, "none")
    model = quantized_cache.qlora_load_model(StrategyOptions(), tiny_models["llama"], _kwargs(), runtime)
    assert quantization_record(model)["device_type"] == "cpu"
    info = json.loads((Path(entry) / quantized_cache.ENTRY_FILE).read_text())
    info["settings"]["device"] = "cuda"
    (Path(entry) / quantized_cache.ENTRY_FILE).write_text(json.dumps(info))
    model = quantized_cache.qlora_load_model(StrategyOptions(), tiny_models["llama"], _kwargs(), runtime)
    assert quantization_record(model)["device_type"] == "cuda"


def test_failed_write_leaves_no_entry_and_falls_back(tiny_models, tmp_path, monkeypatch):
    import safetensors.torch

    from qlora_plugin.quant import cache as quantized_cache

    monkeypatch.setenv("QLORA_PLUGIN_CACHE_DIR", str(tmp_path / "cache"))

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    assert quantized_cache.cached_base(tiny_models["llama"], _kwargs()) is None
    leftovers = [n for n in os.listdir(tmp_path / "cache") if n not in ("file-hashes.json", quantized_cache.LOCKS)]
    assert leftovers == []


def test_checkpoint_with_foreign_names_is_not_cached(tiny_models, tmp_path):
    from safetensors.torch import load_file, save_file

    from qlora_plugin.quant.cache import cached_base

    source = tmp_path / "renamed"
    shutil.copytree(tiny_models["llama"], source)
    weights = load_file(source / "model.safetensors")
    weights["legacy.gamma"] = weights.pop("model.norm.weight")  # a name only a loader's key mapping knows
    save_file(weights, source / "model.safetensors", metadata={"format": "pt"})
    before = set(os.listdir(os.environ["QLORA_PLUGIN_CACHE_DIR"]))
    assert cached_base(str(source), _kwargs()) is None
    assert set(os.listdir(os.environ["QLORA_PLUGIN_CACHE_DIR"])) == before


@pytest.mark.slow
def test_training_run_reuses_the_cache_and_records_the_real_base(tiny_models, dataset_dir, tmp_path):
    model = tiny_models["llama_odd"]
    reports = []
    for run in ("first", "second"):
        out = tmp_path / run
        result = run_python(
            ["-m", "trl.scripts.sft", "--model_name_or_path", model, "--dataset_name", dataset_dir,
             "--strategy", "qlora", *TRAIN_FLAGS, "--output_dir", str(out)], cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        reports.append(json.loads((out / "qlora_plugin_report.json").read_text()))
    entry = reports[0]["quantization"]["cached_base"]
    assert entry and entry == reports[1]["quantization"]["cached_base"]
    assert "4-bit base loaded from" in result.stdout
    assert reports[1]["model"]["name_or_path"] == model  # not the cache folder: adapters name their real base
    # Same 4-bit weights, same seed, same data: the same training run.
    for key in ("first_loss", "final_loss"):
        assert reports[1]["measured"][key] == pytest.approx(reports[0]["measured"][key], rel=1e-6)


@pytest.mark.slow
def test_cache_can_be_turned_off(tiny_models, dataset_dir, tmp_path):
    out = tmp_path / "run"
    result = run_python(
        ["-m", "trl.scripts.sft", "--model_name_or_path", tiny_models["llama"], "--dataset_name", dataset_dir,
         "--strategy", "qlora", "--quantized_cache", "false", *TRAIN_FLAGS, "--output_dir", str(out)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "qlora_plugin_report.json").read_text())["quantization"]["cached_base"] is None
