"""`qlora-plugin merge` on bad input: a message that says what was wrong and how to fix it, exit status 2, no
traceback, and no output folder (complete-looking or temporary) left behind."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest

from conftest import run_command

from qlora_plugin import cli
from qlora_plugin.errors import QLoRAPluginError
from qlora_plugin.quant.record import RECORD_FILE


@pytest.fixture(scope="module")
def adapter(tiny_models, tmp_path_factory) -> Path:
    """A small valid LoRA adapter for the tiny Llama (built on the 16-bit model: only its files matter here)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("bad-merge") / "adapter"
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM")).save_pretrained(out)
    return out


def copy_adapter(adapter, tmp_path) -> Path:
    return Path(shutil.copytree(adapter, tmp_path / "adapter"))


def run_merge(capsys, tmp_path, *argv):
    out = tmp_path / "merged"
    code = cli.main(["merge", *[str(a) for a in argv], "--out", str(out)] if "--out" not in argv
                    else ["merge", *[str(a) for a in argv]])
    err = capsys.readouterr().err
    return code, err, out


def assert_refused(code, err, out, *fragments):
    assert code == 2
    assert "Traceback" not in err and "qlora-plugin: error:" in err, err
    for fragment in fragments:
        assert fragment in err, err
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith((".merged", "merged"))]
    assert leftovers == [] or (out.is_dir() and leftovers == ["merged"]), leftovers


def test_missing_adapter_folder(tmp_path, capsys):
    code, err, out = run_merge(capsys, tmp_path, "--adapter", tmp_path / "nope")
    assert_refused(code, err, out, "does not exist", "output_dir")


def test_folder_without_adapter_config(adapter, tmp_path, capsys):
    folder = copy_adapter(adapter, tmp_path)
    (folder / "adapter_config.json").unlink()
    assert_refused(*run_merge(capsys, tmp_path, "--adapter", folder), "adapter_config.json is missing")


def test_truncated_adapter_weights(adapter, tmp_path, capsys):
    folder = copy_adapter(adapter, tmp_path)
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert_refused(*run_merge(capsys, tmp_path, "--adapter", folder), "corrupt or truncated", "checkpoint-N")


def test_adapter_for_another_shape(adapter, tiny_models, tmp_path, capsys):
    code, err, out = run_merge(capsys, tmp_path, "--adapter", adapter, "--base", tiny_models["llama_odd"])
    assert_refused(code, err, out, "does not fit", "`model.layers.0.mlp.down_proj` lora_A is [4, 128]", "needs [4, 100]", "--base")


def test_adapter_for_another_architecture(adapter, tiny_models, tmp_path, capsys):
    code, err, out = run_merge(capsys, tmp_path, "--adapter", adapter, "--base", tiny_models["gpt2"])
    assert_refused(code, err, out, "adapts `model.layers.", "does not have", "another architecture")


def test_no_base_recorded_and_none_given(adapter, tmp_path, capsys):
    folder = copy_adapter(adapter, tmp_path)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = None
    (folder / "adapter_config.json").write_text(json.dumps(config))
    assert_refused(*run_merge(capsys, tmp_path, "--adapter", folder), "records no base model", "--base")


def test_pickle_only_base_is_refused_not_unpickled(adapter, tiny_models, tmp_path, capsys):
    base = tmp_path / "bin-base"
    base.mkdir()
    shutil.copy(Path(tiny_models["llama"]) / "config.json", base)
    (base / "pytorch_model.bin").write_bytes(b"not read")
    code, err, out = run_merge(capsys, tmp_path, "--adapter", adapter, "--base", base)
    assert_refused(code, err, out, "pytorch_model.bin", "never unpickles", "save_pretrained")


@pytest.mark.slow
def test_non_empty_output_needs_force(adapter, tmp_path, capsys):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err, _ = run_merge(capsys, tmp_path, "--adapter", adapter, "--out", out)
    assert_refused(code, err, out, "exists and is not empty", "--force")
    assert (out / "keep.txt").read_text() == "mine"
    assert cli.main(["merge", "--adapter", str(adapter), "--out", str(out), "--force"]) == 0
    assert {"config.json", "generation_config.json"} <= {p.name for p in out.iterdir()}
    assert not (out / "keep.txt").exists() and [p.name for p in tmp_path.iterdir()] == ["merged"]


def test_full_disk_mid_write_leaves_nothing(adapter, tmp_path, capsys, monkeypatch):
    import safetensors.torch

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", no_space)
    code, err, out = run_merge(capsys, tmp_path, "--adapter", adapter, "--max_shard_size", "50KB")
    assert_refused(code, err, out, "No space left", "GiB", "Nothing was kept")
    assert list(tmp_path.iterdir()) == []


def test_too_little_free_space_is_refused_before_writing(adapter, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 1000))
    code, err, out = run_merge(capsys, tmp_path, "--adapter", adapter)
    assert_refused(code, err, out, "No space left", "another disk")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_unreachable_hub_base_from_the_command_line(adapter, tmp_path):
    folder = copy_adapter(adapter, tmp_path)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "nobody/no-such-model"
    (folder / "adapter_config.json").write_text(json.dumps(config))
    proc = run_command(["qlora-plugin", "merge", "--adapter", str(folder), "--out", str(tmp_path / "merged")],
                       tmp_path)  # offline: HF_HUB_OFFLINE=1
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "qlora-plugin: error: Base model 'nobody/no-such-model' is not a local folder" in proc.stderr
    assert "--base" in proc.stderr and sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_quantization_settings_recorded_defaulted_and_overridden(adapter, tmp_path, caplog):
    from qlora_plugin.merge.inputs import Adapter
    from qlora_plugin.merge.merging import quant_settings

    bare = Adapter(str(tmp_path), {})
    assert quant_settings(bare)["bnb_4bit_quant_type"] == "nf4" and quant_settings(bare)["bnb_4bit_use_double_quant"]
    assert "has no qlora_plugin_quantization.json" in caplog.text  # a warning (stderr), not the command's output
    caplog.clear()
    (tmp_path / RECORD_FILE).write_text(json.dumps({"load_in_4bit": True, "bnb_4bit_quant_type": "fp4",
                                                    "bnb_4bit_use_double_quant": False, "blocksize": 64}))
    assert quant_settings(bare)["bnb_4bit_quant_type"] == "fp4" and caplog.text == ""
    assert quant_settings(bare, "nf4", True)["bnb_4bit_quant_type"] == "nf4"
    assert "training recorded bnb_4bit_quant_type=fp4; using nf4" in caplog.text
    (tmp_path / RECORD_FILE).write_text(json.dumps({"load_in_4bit": False}))
    assert quant_settings(bare) is None
    with pytest.raises(QLoRAPluginError, match="trained on a 16-bit base"):
        quant_settings(bare, "nf4")
