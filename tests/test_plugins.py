"""The extension surface: plugin manager factory, built-ins registered like plugins, hook files, entry points."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO, TRAIN_FLAGS, run_command, run_python

from qlora_plugin import QLoRAPluginError, Strategy, get_plugin_manager, hookimpl
from qlora_plugin.plugins import collect_strategies, get_strategy


def test_builtin_strategies_come_through_the_hooks():
    pm = get_plugin_manager(load_entrypoints=False)
    assert pm.get_plugin("qlora_plugin.builtin") is not None
    strategies = collect_strategies(pm)
    assert set(strategies) == {"qlora", "lora"}
    assert strategies["qlora"].plugin == "qlora_plugin.builtin"
    assert strategies["lora"].option_defaults["load_in_4bit"] is False


def test_each_manager_is_fresh():
    class Extra:
        @hookimpl
        def qlora_register_strategies(self, register):
            register(Strategy("extra", "test", {}))

    first = get_plugin_manager(load_entrypoints=False)
    extra = Extra()
    first.register(extra)
    try:
        assert "extra" in collect_strategies(first)
        assert "extra" not in collect_strategies(get_plugin_manager(load_entrypoints=False))
    finally:
        first.unregister(extra)


def test_a_plugin_overrides_a_builtin_hook():
    """Built-in implementations are trylast: a plugin's answer to a firstresult hook comes first."""
    sentinel = object()

    class Override:
        @hookimpl
        def qlora_wrap_model(self, strategy, model):
            return sentinel if strategy.name == "qlora" else None

    pm = get_plugin_manager(load_entrypoints=False)
    pm.register(Override())
    qlora = get_strategy(pm, "qlora")
    assert pm.hook.qlora_wrap_model(strategy=qlora, options=None, model=None, runtime=None) is sentinel


def test_duplicate_strategy_names_are_refused():
    class Clash:
        @hookimpl
        def qlora_register_strategies(self, register):
            register(Strategy("qlora", "impostor", {}))

    pm = get_plugin_manager(load_entrypoints=False)
    pm.register(Clash())
    with pytest.raises(QLoRAPluginError, match="registered twice"):
        collect_strategies(pm)


def test_strategy_with_unknown_option_is_refused():
    with pytest.raises(QLoRAPluginError, match="unknown option"):
        Strategy("odd", "x", {"lora_rank": 8})


def test_qdora_hook_file(tiny_models, tmp_path):
    from datasets import load_dataset
    from trl import SFTConfig

    from qlora_plugin import make_trainer

    trainer = make_trainer(
        "qdora", hook_files=[str(REPO / "hooks" / "qdora.py")], model=tiny_models["llama"],
        train_dataset=load_dataset(str(REPO / "examples" / "data" / "skills"))["train"],
        args=SFTConfig(output_dir=str(tmp_path), max_steps=2, report_to="none", use_cpu=True, save_strategy="no",
                       max_length=64),
        plugin_manager=get_plugin_manager([str(REPO / "hooks" / "qdora.py")], load_entrypoints=False),
    )
    assert trainer.model.peft_config["default"].use_dora is True
    assert getattr(trainer.model, "is_loaded_in_4bit", False)
    assert any("lora_magnitude_vector" in n for n, _ in trainer.model.named_parameters())
    trainer.train()


def test_memory_report_hook_file(tiny_models, dataset_dir, tmp_path):
    out = tmp_path / "out"
    proc = run_python(["-m", "trl.scripts.sft", "--model_name_or_path", tiny_models["llama"], "--dataset_name",
                       dataset_dir, "--output_dir", str(out), "--strategy", "qlora", "--qlora_hooks",
                       str(REPO / "hooks" / "memory_report.py"), *TRAIN_FLAGS], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("[memory_report] step")]
    assert len(lines) == 3  # logging_steps=1, max_steps=3
    assert all("peak_mem_mb=" in line for line in lines) and "tokens_per_s=" in lines[-1]
    peak = float(lines[0].split("peak_mem_mb=")[1].split(",")[0])
    assert 50 < peak < 20_000


PLUGIN_PYPROJECT = """
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "qlora-plugin-wide"
version = "0.0.1"

[project.entry-points.qlora_plugin]
wide = "qlora_plugin_wide"
"""

PLUGIN_MODULE = '''
from qlora_plugin import Strategy, hookimpl


@hookimpl
def qlora_register_strategies(register):
    register(Strategy("wide", "qlora with rank 4 on attention only", {"lora_r": 4, "lora_target_modules": ["q_proj", "v_proj"]}))
'''


def test_installed_entry_point_adds_a_strategy(tiny_models, dataset_dir, tmp_path):
    """pip-install a tiny third-party package; its strategy is then usable as `--strategy wide`."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "pyproject.toml").write_text(PLUGIN_PYPROJECT)
    (src / "qlora_plugin_wide.py").write_text(PLUGIN_MODULE)
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(src)], check=True, capture_output=True, text=True)
    env = {"PYTHONPATH": str(site), "QLORA_PLUGIN_LOAD": "wide"}

    listing = run_command(["qlora-plugin", "strategies"], tmp_path, env)
    assert listing.returncode == 0, listing.stderr
    assert "wide  [wide]" in listing.stdout

    out = tmp_path / "out"
    proc = run_python(["-m", "trl.scripts.sft", "--model_name_or_path", tiny_models["llama"], "--dataset_name",
                       dataset_dir, "--output_dir", str(out), "--strategy", "wide", *TRAIN_FLAGS], tmp_path, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    facts = json.loads((out / "qlora_plugin_report.json").read_text())
    assert facts["strategy"] == "wide" and facts["plugin"] == "wide"
    assert facts["adapter"]["r"] == 4 and facts["adapter"]["target_modules"] == ["q_proj", "v_proj"]
    assert facts["quantization"]["layers_4bit"] == 14


def test_plugin_answers_the_optimizer_and_loading_hooks(tiny_models, tmp_path):
    """A plugin's qlora_create_optimizer and qlora_model_init_kwargs answers replace the built-in ones."""
    import torch
    from datasets import load_dataset
    from trl import SFTConfig

    from qlora_plugin import make_trainer

    class SGDPlugin:
        @hookimpl
        def qlora_create_optimizer(self, training_args):
            return torch.optim.SGD, {"lr": training_args.learning_rate, "momentum": 0.9}

        @hookimpl
        def qlora_model_init_kwargs(self, options, init_kwargs, runtime):
            from qlora_plugin.quantization import model_init_kwargs

            return {**model_init_kwargs(options, init_kwargs, runtime), "attn_implementation": "eager"}

    pm = get_plugin_manager(load_entrypoints=False)
    pm.register(SGDPlugin())
    trainer = make_trainer("qlora", plugin_manager=pm, model=tiny_models["llama"],
                           train_dataset=load_dataset(str(REPO / "examples" / "data" / "skills"))["train"],
                           args=SFTConfig(output_dir=str(tmp_path), max_steps=1, report_to="none", use_cpu=True,
                                          save_strategy="no", max_length=64))
    trainer.create_optimizer()
    assert isinstance(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer,
                      torch.optim.SGD)
    assert trainer.model.config._attn_implementation == "eager"
    assert getattr(trainer.model, "is_loaded_in_4bit", False)
