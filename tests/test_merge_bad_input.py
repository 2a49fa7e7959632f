"""`qlora-plugin merge` on bad input: a message that says what was wrong and how to fix it, exit status 2, no
traceback, and no output folder (complete-looking or temporary) left behind."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest

from conftest import _env, run_command

from qlora_plugin import cli
from qlora_plugin.core.errors import QLoRAPluginError
from qlora_plugin.merge.writer import MARKER_FILE
from qlora_plugin.quant.record import RECORD_FILE


@pytest.fixture(scope="module")
def adapter(tiny_models, tmp_path_factory) -> Path:
    """A small valid LoRA adapter for the tiny Llama, built on the 16-bit model and recorded as such."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("bad-merge") / "adapter"
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"])
    get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM")).save_pretrained(out)
    (out / RECORD_FILE).write_text(json.dumps({"version": 1, "load_in_4bit": False}))
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
def test_non_empty_output_needs_force_and_force_replaces_only_a_merge(adapter, tmp_path, capsys):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err, _ = run_merge(capsys, tmp_path, "--adapter", adapter, "--out", out, "--no_check")
    assert_refused(code, err, out, "exists and is not empty", "--force")
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    assert cli.main(["merge", "--adapter", str(adapter), "--out", str(out), "--no_check"]) == 0  # empty: fine
    marker = json.loads((out / MARKER_FILE).read_text())
    assert marker["written_by"] == "qlora-plugin merge" and marker["adapter"] == str(adapter)
    assert cli.main(["merge", "--adapter", str(adapter), "--out", str(out), "--force", "--no_check"]) == 0
    assert {"config.json", "generation_config.json", MARKER_FILE} <= {p.name for p in out.iterdir()}
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]


def test_force_leaves_a_folder_merge_did_not_write(adapter, tmp_path, capsys):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err, _ = run_merge(capsys, tmp_path, "--adapter", adapter, "--out", out, "--no_check", "--force")
    assert_refused(code, err, out, "--force replaces only a folder that `qlora-plugin merge` wrote", MARKER_FILE)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"


def tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("target", ["adapter", "run folder", "base", "base's parent", "recorded base"])
def test_force_never_replaces_an_input_or_what_holds_it(target, adapter, tiny_models, tmp_path, capsys):
    """`--force` with --out at the adapter, the run folder holding it (every checkpoint), or the base: refused,
    every byte kept, even when the folder carries a merge's marker."""
    run = tmp_path / "run"
    folder = Path(shutil.copytree(adapter, run / "checkpoint-2"))
    base = Path(shutil.copytree(tiny_models["llama"], tmp_path / "models" / "base"))
    recorded = Path(json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"])
    if target == "recorded base":  # --base elsewhere, --out at the base the adapter records
        recorded = Path(shutil.copytree(recorded, tmp_path / "recorded"))
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(recorded)}))
    out = {"adapter": folder, "run folder": run, "base": base, "base's parent": base.parent,
           "recorded base": recorded}[target]
    (out / MARKER_FILE).write_text("{}")  # looks like a merge's output: still an input
    before = tree(tmp_path)
    code = cli.main(["merge", "--adapter", str(folder), "--base", str(base), "--out", str(out), "--force", "--no_check"])
    err = capsys.readouterr().err
    assert code == 2 and "an input of this merge" in err and "Traceback" not in err, err
    assert tree(tmp_path) == before


def test_failed_check_keeps_an_earlier_incomplete_unless_forced(adapter, tmp_path, capsys, monkeypatch):
    from qlora_plugin.merge import fidelity

    monkeypatch.setattr(fidelity, "check", lambda *a, **k: {"passed": False, "failures": ["made to fail"]})
    out = tmp_path / "merged"
    earlier = tmp_path / "merged.incomplete"
    earlier.mkdir()
    (earlier / "notes.txt").write_text("what I was looking at")
    code = cli.main(["merge", "--adapter", str(adapter), "--out", str(out)])
    assert code == 2 and "merged.incomplete-2" in capsys.readouterr().err
    assert (earlier / "notes.txt").read_text() == "what I was looking at"  # not ours and no --force: kept
    assert (tmp_path / "merged.incomplete-2" / MARKER_FILE).is_file() and not out.exists()
    assert cli.main(["merge", "--adapter", str(adapter), "--out", str(out), "--force"]) == 2
    assert (earlier / "notes.txt").is_file() and (tmp_path / "merged.incomplete-3").is_dir()  # not ours: kept
    code = cli.main(["merge", "--adapter", str(adapter), "--out", str(tmp_path / "other")])
    assert code == 2 and (tmp_path / "other.incomplete" / MARKER_FILE).is_file()
    assert cli.main(["merge", "--adapter", str(adapter), "--out", str(tmp_path / "other"), "--force"]) == 2
    assert not (tmp_path / "other.incomplete-2").exists()  # ours and --force: replaced in place


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


def test_quantization_settings_recorded_named_and_overridden(adapter, tmp_path, caplog):
    from qlora_plugin.merge.inputs import Adapter
    from qlora_plugin.merge.merging import quant_settings

    bare = Adapter(str(tmp_path), {})
    with pytest.raises(QLoRAPluginError, match="cannot tell whether it was trained on a 4-bit base .* --trained_on"):
        quant_settings(bare)  # no record: neither guess is safe
    assert quant_settings(bare, trained_on="16bit") is None
    four = quant_settings(bare, trained_on="4bit")
    assert four["bnb_4bit_quant_type"] == "nf4" and four["bnb_4bit_use_double_quant"]
    assert "has no qlora_plugin_quantization.json" in caplog.text  # a warning (stderr), not the command's output
    assert quant_settings(bare, "fp4", False)["bnb_4bit_quant_type"] == "fp4"  # a 4-bit flag names the choice
    assert quant_settings(Adapter(str(tmp_path), {"init_lora_weights": "loftq"}))["load_in_4bit"]  # peft's LoftQ
    with pytest.raises(QLoRAPluginError, match="--trained_on 16bit contradicts"):
        quant_settings(bare, "nf4", trained_on="16bit")
    caplog.clear()
    (tmp_path / RECORD_FILE).write_text(json.dumps({"load_in_4bit": True, "bnb_4bit_quant_type": "fp4",
                                                    "bnb_4bit_use_double_quant": False, "blocksize": 64}))
    assert quant_settings(bare)["bnb_4bit_quant_type"] == "fp4" and caplog.text == ""
    assert quant_settings(bare, "nf4", True)["bnb_4bit_quant_type"] == "nf4"
    assert "training recorded bnb_4bit_quant_type=fp4; using nf4" in caplog.text
    with pytest.raises(QLoRAPluginError, match="--trained_on 16bit contradicts"):
        quant_settings(bare, trained_on="16bit")
    (tmp_path / RECORD_FILE).write_text(json.dumps({"load_in_4bit": False}))
    assert quant_settings(bare) is None
    with pytest.raises(QLoRAPluginError, match="trained on a 16-bit base"):
        quant_settings(bare, "nf4")


def test_a_16bit_adapter_without_a_record_is_never_merged_into_nf4(adapter, tmp_path, capsys):
    """It used to be merged into the NF4 base and pass the check (its reference made the same guess)."""
    folder = copy_adapter(adapter, tmp_path)
    (folder / RECORD_FILE).unlink()
    code, err, out = run_merge(capsys, tmp_path, "--adapter", folder, "--no_check")
    assert_refused(code, err, out, "cannot tell whether", "--trained_on 4bit", "--trained_on 16bit")
    assert cli.main(["merge", "--adapter", str(folder), "--out", str(out), "--trained_on", "16bit"]) == 0
    assert "into the 16-bit base" in capsys.readouterr().out
    marker = json.loads((out / MARKER_FILE).read_text())
    assert marker["quantization"] is None and marker["requantized_layers"] == 0


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json"])
def test_a_symlink_in_the_adapter_is_never_followed(name, adapter, tiny_models, tmp_path, capsys):
    folder = copy_adapter(adapter, tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("not a tokenizer")
    (folder / name).symlink_to(secret)
    code, err, out = run_merge(capsys, tmp_path, "--adapter", folder, "--no_check")
    assert_refused(code, err, out, f"{name} is a symbolic link", "only regular files")
    assert not out.exists()


@pytest.mark.slow  # seconds: a process killed or waiting on the Hub's retries (make test-fast: under a minute)
def test_a_file_size_limit_is_one_line_and_leaves_nothing(adapter, tmp_path):
    """`ulimit -f`: the shard write fails with EFBIG, which safetensors raises as its own error."""
    import resource
    import subprocess
    import sys

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    proc = subprocess.run([str(Path(sys.executable).parent / "qlora-plugin"), "merge", "--adapter", str(adapter),
                           "--out", "merged", "--no_check", "--dtype", "float32"], cwd=tmp_path, env=_env(None),
                          capture_output=True, text=True, timeout=600, preexec_fn=limit)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = [ln for ln in proc.stderr.splitlines() if "qlora-plugin: error:" in ln]
    assert len(line) == 1 and "largest size allowed" in line[0] and "--max_shard_size" in line[0], proc.stderr
    assert list(tmp_path.iterdir()) == []


CRAFTED_RECORDS = {  # case -> (key, value, what the message says is allowed)
    "weight_dtype load": ("weight_dtype", "load", "float32, float16, bfloat16"),
    "blocksize 0": ("blocksize", 0, "power of two"),
    "blocksize 64.0": ("blocksize", 64.0, "power of two"),
    "quant type int8": ("bnb_4bit_quant_type", "int8", "nf4 or fp4"),
    "load_in_4bit yes": ("load_in_4bit", "yes", "true or false"),
    "layers_4bit -1": ("layers_4bit", -1, "whole number"),
}


@pytest.mark.parametrize("case", list(CRAFTED_RECORDS))
def test_a_crafted_quantization_record_is_refused_before_writing(case, adapter, tmp_path, capsys):
    key, value, allowed = CRAFTED_RECORDS[case]
    folder = copy_adapter(adapter, tmp_path)
    record = {"version": 1, "load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
              "blocksize": 64, "weight_dtype": "float32", "device_type": "cpu", "layers_4bit": 14}
    (folder / RECORD_FILE).write_text(json.dumps({**record, key: value}))
    code, err, out = run_merge(capsys, tmp_path, "--adapter", folder)
    assert_refused(code, err, out, f"`{key}` is {value!r}", allowed)
    assert len(err.strip().splitlines()) == 1


KILLED_MERGE = ("import sys, time\nfrom qlora_plugin.merge.writer import staged_folder\n"
                "with staged_folder(sys.argv[1], False) as tmp:\n    print('staged', flush=True)\n    time.sleep(120)\n")


def test_a_killed_merges_staging_folder_is_removed_by_the_next_merge(tmp_path, caplog):
    """kill -9 leaves `.<out>.merging-*` beside `--out` (issue 24, item 9): the next merge to that `--out` removes it
    (its owner is gone), and the staging record never reaches the merged folder."""
    import os
    import signal
    import subprocess
    import sys

    from qlora_plugin.merge.writer import staged_folder
    from qlora_plugin.quant.cache_lock import OWNER_FILE

    out = tmp_path / "merged"
    child = subprocess.Popen([sys.executable, "-c", KILLED_MERGE, str(out)], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "QLORA_PLUGIN_LOAD": ""})
    try:
        assert child.stdout.readline().strip() == "staged"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    left = [p.name for p in tmp_path.iterdir() if p.name.startswith(".merged.merging-")]
    assert len(left) == 1  # what kill -9 leaves behind
    with caplog.at_level("WARNING"), staged_folder(str(out), False) as tmp:
        (Path(tmp) / "config.json").write_text("{}")
    assert "Removed 1 staging folder(s) left in the output's folder" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]
    assert sorted(p.name for p in out.iterdir()) == ["config.json"] and not (out / OWNER_FILE).exists()
