"""Security: the plugin never turns on `trust_remote_code`, runs code only from installed `qlora_plugin` entry
points and hook files the user names, writes weights as safetensors, and reaches no network at import."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest

from conftest import DATA, REPO, run_python

from qlora_plugin import QLoRAPluginError
from qlora_plugin.integration import activation
from qlora_plugin.plugin.manager import collect_strategies, get_plugin_manager

SENTINEL_CODE = "from pathlib import Path\nPath({marker!r}).write_text('ran')\n"


def remote_code_model(tmp_path, source) -> Path:
    """A model folder whose config.json asks for custom code (`auto_map`); the code leaves a marker if it runs."""
    folder = tmp_path / "custom"
    folder.mkdir()
    marker = tmp_path / "custom_code_ran"
    (folder / "configuration_mystery.py").write_text(
        SENTINEL_CODE.format(marker=str(marker)) +
        "from transformers import LlamaConfig\n\nclass MysteryConfig(LlamaConfig):\n    model_type = 'mystery'\n")
    (folder / "modeling_mystery.py").write_text(
        "from transformers import LlamaForCausalLM\nfrom .configuration_mystery import MysteryConfig\n\n"
        "class MysteryForCausalLM(LlamaForCausalLM):\n    config_class = MysteryConfig\n")
    config = json.loads((Path(source) / "config.json").read_text())
    config.update(model_type="mystery", architectures=["MysteryForCausalLM"], auto_map={
        "AutoConfig": "configuration_mystery.MysteryConfig",
        "AutoModelForCausalLM": "modeling_mystery.MysteryForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))
    shutil.copy(Path(source) / "model.safetensors", folder)
    return folder


@pytest.mark.slow
def test_remote_code_runs_only_when_the_user_allows_it(tiny_models, tmp_path):
    from trl import SFTConfig

    from qlora_plugin import apply_strategy

    folder = remote_code_model(tmp_path, tiny_models["llama"])
    args = SFTConfig(str(tmp_path / "out"), report_to="none", use_cpu=True)
    with pytest.raises(QLoRAPluginError, match="never turns on `trust_remote_code`") as err:
        apply_strategy({"model": str(folder), "args": args})
    assert "configuration_mystery.py, modeling_mystery.py" in str(err.value)
    assert not (tmp_path / "custom_code_ran").exists()

    args = SFTConfig(str(tmp_path / "out"), report_to="none", use_cpu=True, trust_remote_code=True)
    model = apply_strategy({"model": str(folder), "args": args})["model"]
    assert (tmp_path / "custom_code_ran").exists()  # the user allowed it: it ran, and the model is 4-bit
    assert type(model.base_model.model).__name__ == "MysteryForCausalLM" and model.is_loaded_in_4bit


def test_models_load_with_trust_remote_code_off(tiny_models, tmp_path, monkeypatch):
    """What reaches `from_pretrained` when the user said nothing: trust_remote_code=False."""
    import trl.trainer.utils
    from trl import SFTConfig

    from qlora_plugin import apply_strategy

    seen = {}

    def capture(model_id, **kwargs):
        seen.update(kwargs)
        raise OSError("stop here")

    monkeypatch.setattr(trl.trainer.utils, "create_model_from_path", capture)
    with pytest.raises(QLoRAPluginError, match="stop here"):
        apply_strategy({"model": tiny_models["llama"],
                        "args": SFTConfig(str(tmp_path / "out"), report_to="none", use_cpu=True)})
    assert seen["trust_remote_code"] is False


def sets_trust_remote_code(source: str) -> list[int]:
    """Lines of Python `source` whose code (not strings or comments) sets trust_remote_code to True."""
    import io
    import tokenize

    words, lines = [], []
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
            continue
        text = token.string
        if token.type == tokenize.STRING:
            text = "trust_remote_code" if text.strip("\"'") == "trust_remote_code" else "STR"
        words.append(text)
        lines.append(token.start[0])
    code = " ".join(words)
    pattern = re.compile(r"trust_remote_code (?:\] )?[=:,] True\b")
    return [lines[code[:m.start()].count(" ")] for m in pattern.finditer(code)]


def test_no_code_sets_trust_remote_code():
    """Over everything the project ships: no code sets trust_remote_code=True (messages may mention it)."""
    for setter in ("f(trust_remote_code=True)", "kw['trust_remote_code'] = True", "{'trust_remote_code': True}",
                   "kw.setdefault('trust_remote_code', True)"):
        assert sets_trust_remote_code(setter) == [1], setter
    assert sets_trust_remote_code("print('pass `trust_remote_code=True` yourself')  # trust_remote_code=True") == []
    files = [p for d in ("qlora_plugin", "hooks", "examples") for p in (REPO / d).rglob("*.py")]
    assert len(files) > 20
    offenders = [f"{p.relative_to(REPO)}:{n}" for p in files for n in sets_trust_remote_code(p.read_text())]
    assert offenders == []


# --- where code is loaded from ------------------------------------------------------------------------------------

PLUGIN = ("from qlora_plugin import Strategy, hookimpl\n{marker}\n@hookimpl\n"
          "def qlora_register_strategies(register):\n    register(Strategy({name!r}, 'test plugin', {{}}))\n")


@pytest.fixture
def installed_plugins(tmp_path, monkeypatch):
    """A site folder with one installed distribution: a `qlora_plugin` entry point `fake`, a broken one
    `broken`, and an entry point of another group (`sneaky`) that must never be loaded."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "qlora_plugin_fake.py").write_text(PLUGIN.format(marker="", name="fake"))
    (site / "qlora_plugin_broken.py").write_text("raise ImportError('needs libfoo')\n")
    (site / "qlora_plugin_sneaky.py").write_text(PLUGIN.format(marker=SENTINEL_CODE.format(
        marker=str(tmp_path / "sneaky_ran")), name="sneaky"))
    info = site / "qlora_plugin_fake-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: qlora-plugin-fake\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[qlora_plugin]\nfake = qlora_plugin_fake\nbroken = qlora_plugin_broken\n\n"
                                           "[console_scripts]\nsneaky = qlora_plugin_sneaky:main\n")
    monkeypatch.syspath_prepend(str(site))
    return tmp_path


def test_entry_points_load_only_from_the_group_and_as_allowed(installed_plugins, monkeypatch):
    monkeypatch.setenv("QLORA_PLUGIN_LOAD", "")
    assert set(collect_strategies(get_plugin_manager())) == {"qlora", "lora-int8", "lora"}
    monkeypatch.setenv("QLORA_PLUGIN_LOAD", "fake")
    assert set(collect_strategies(get_plugin_manager())) == {"qlora", "lora-int8", "lora", "fake"}
    monkeypatch.delenv("QLORA_PLUGIN_LOAD")  # unset: every installed plugin, so the broken one is reported
    with pytest.raises(QLoRAPluginError) as err:
        get_plugin_manager()
    assert "installed plugin 'broken' failed to load (ImportError: needs libfoo" in str(err.value)
    assert not (installed_plugins / "sneaky_ran").exists()
    assert "qlora_plugin_sneaky" not in sys.modules


def test_hook_files_in_the_working_folder_are_not_loaded(tmp_path, monkeypatch, capsys):
    """Files that look like hooks, in the folder a script runs from (and on sys.path, as `python -m` puts it),
    never run unless the user names them."""
    for name in ("qlora_hooks.py", "hooks.py", "qlora_plugin_hooks.py", "plugins.py"):
        (tmp_path / name).write_text(PLUGIN.format(marker=SENTINEL_CODE.format(marker=str(tmp_path / name) + ".ran"),
                                                   name="sneaky"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delattr(sys, "_qlora_plugin_own_cli", raising=False)
    monkeypatch.setattr(sys, "argv", ["sft.py", "--strategy", "sneaky"])
    with pytest.raises(SystemExit) as exit_:
        activation.activate_from_process()
    assert exit_.value.code == 2 and "Unknown strategy 'sneaky'" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.ran"))


# --- files written ------------------------------------------------------------------------------------------------

TRAINER_STATE_PICKLES = {"training_args.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth", "scaler.pt"}


@pytest.mark.slow
def test_weights_are_written_as_safetensors(tiny_models, tmp_path):
    """After training with checkpoints and a final save, every weight file is safetensors. The only pickles are
    transformers' Trainer state (arguments, optimizer, scheduler, RNG), which the Trainer itself writes."""
    from datasets import load_dataset
    from safetensors import safe_open
    from trl import SFTConfig

    from qlora_plugin import make_trainer

    out = tmp_path / "out"
    trainer = make_trainer("qlora", model=tiny_models["llama"], train_dataset=load_dataset(str(DATA))["train"],
                           args=SFTConfig(str(out), report_to="none", use_cpu=True, max_steps=2, save_steps=1,
                                          save_strategy="steps", max_length=32, per_device_train_batch_size=4))
    trainer.train()
    trainer.save_model(str(out))
    files = [p for p in out.rglob("*") if p.is_file()]
    weights = [p for p in files if p.suffix == ".safetensors"]
    assert {p.relative_to(out).as_posix() for p in weights} == {
        "adapter_model.safetensors", "checkpoint-1/adapter_model.safetensors", "checkpoint-2/adapter_model.safetensors"}
    for path in weights:
        with safe_open(str(path), "pt") as f:
            assert any("lora_A" in key for key in f.keys())
    pickles = {p.name for p in files if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")}
    assert pickles <= TRAINER_STATE_PICKLES, pickles
    model_files = {p.name for p in Path(tiny_models["llama"]).iterdir()}
    assert "model.safetensors" in model_files and not {n for n in model_files if n.endswith((".bin", ".pt"))}


# --- network ------------------------------------------------------------------------------------------------------

NO_NETWORK = """
import socket, sys

def refuse(*args, **kwargs):
    sys.stderr.write(f"NETWORK ATTEMPT {args[:2]!r}\\n")
    raise OSError("network disabled by the test")

socket.socket.connect = socket.socket.connect_ex = refuse
socket.create_connection = socket.getaddrinfo = refuse
"""


@pytest.mark.slow
def test_nothing_reaches_the_network_at_import_and_activation(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(NO_NETWORK)
    script = ("import sys; import qlora_plugin; sys.argv[1:] = ['--strategy', 'qlora', '--lora_r', '8']; import trl\n"
              "from qlora_plugin.integration import state; request = state.active_request()\n"
              "assert request.strategy == 'qlora' and request.options == {'lora_r': 8}, request\n"
              "import trl.trainer.sft_trainer, trl.scripts.sft; print('activated')")
    proc = run_python(["-c", script], tmp_path, {"PYTHONPATH": str(tmp_path), "HF_HUB_OFFLINE": "0",
                                                 "HF_DATASETS_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0"})
    assert proc.returncode == 0 and "activated" in proc.stdout, proc.stderr[-3000:]
    assert "NETWORK ATTEMPT" not in proc.stderr


HUB_KERNEL_PROBE = """
import sys
import kernels

def fetched(repo, *args, **kwargs):  # stands in for a download from the Hub
    print(f"HUB KERNEL FETCHED {{repo}}")
    raise OSError("not fetched in this test")

kernels.get_kernel = fetched
sys.argv[1:] = {argv!r}
import trl, bitsandbytes
print("bitsandbytes imported")
"""


@pytest.mark.parametrize("strategy", [True, False], ids=["strategy", "no-strategy"])
@pytest.mark.slow
def test_bitsandbytes_fetches_no_hub_kernel_under_a_strategy(tmp_path, strategy):
    """bitsandbytes asks `kernels` for a CPU kernel from the Hub when it is imported (AVX512-BF16 CPUs); under a
    strategy `kernels` is hidden from that import. Without a strategy the library behaves as it always does, which
    shows this test would see a fetch."""
    import importlib.util

    from qlora_plugin.ecosystem.runtime import cpu_has_native_bf16

    if importlib.util.find_spec("kernels") is None or not cpu_has_native_bf16():
        pytest.skip("bitsandbytes asks for a Hub kernel only on AVX512-BF16 CPUs with `kernels` installed")
    argv = ["--strategy", "qlora"] if strategy else []
    proc = run_python(["-c", HUB_KERNEL_PROBE.format(argv=argv)], tmp_path)
    assert proc.returncode == 0 and "bitsandbytes imported" in proc.stdout, proc.stderr[-3000:]
    assert ("HUB KERNEL FETCHED" in proc.stdout) is (not strategy), proc.stdout
