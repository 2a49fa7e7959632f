"""The extension surface: plugin manager factory, built-ins registered like plugins, hook files, entry points."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO, TRAIN_FLAGS, run_command, run_python

from qlora_plugin import QLoRAPluginError, Strategy, get_plugin_manager, hookimpl
from qlora_plugin.plugin.manager import collect_strategies, get_strategy


def test_builtin_strategies_come_through_the_hooks():
    pm = get_plugin_manager(load_entrypoints=False)
    assert pm.get_plugin("qlora_plugin.strategies.presets") is not None
    strategies = collect_strategies(pm)
    assert set(strategies) == {"qlora", "lora-int8", "lora"}
    assert strategies["qlora"].plugin == "qlora_plugin.strategies.presets"
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


def test_each_strategy_names_the_plugin_that_registered_it():
    """Owners come from the `register` bound per plugin: two instances of one plugin class (one code object) each
    get their own name, and a registration made through a helper names the plugin whose hook called it."""
    class Family:
        def __init__(self, name):
            self.name = name

        @hookimpl
        def qlora_register_strategies(self, register):
            _register_through_a_helper(register, Strategy(self.name, "test", {}))

    pm = get_plugin_manager(load_entrypoints=False)
    pm.register(Family("first"), name="plugin-a")
    pm.register(Family("second"), name="plugin-b")
    strategies = collect_strategies(pm)
    assert (strategies["first"].plugin, strategies["second"].plugin) == ("plugin-a", "plugin-b")
    assert strategies["qlora"].plugin == "qlora_plugin.strategies.presets"


def _register_through_a_helper(register, strategy):
    register(strategy)


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


@pytest.mark.slow
def test_qdora_hook_file(tiny_models, tmp_path):
    from datasets import load_dataset
    from trl import SFTConfig

    from qlora_plugin import make_trainer

    trainer = make_trainer(
        "qdora", hook_files=[str(REPO / "hooks" / "qdora.py")], model=tiny_models["llama"],
        train_dataset=load_dataset(str(REPO / "tests" / "data" / "skills"))["train"],
        args=SFTConfig(output_dir=str(tmp_path), max_steps=2, report_to="none", use_cpu=True, save_strategy="no",
                       max_length=64),
        plugin_manager=get_plugin_manager([str(REPO / "hooks" / "qdora.py")], load_entrypoints=False),
    )
    assert trainer.model.peft_config["default"].use_dora is True
    assert getattr(trainer.model, "is_loaded_in_4bit", False)
    assert any("lora_magnitude_vector" in n for n, _ in trainer.model.named_parameters())
    trainer.train()


@pytest.mark.slow
def test_memory_report_packaged_hook_by_name(tiny_models, dataset_dir, tmp_path):
    out = tmp_path / "out"
    proc = run_python(["-m", "trl.scripts.sft", "--model_name_or_path", tiny_models["llama"], "--dataset_name",
                       dataset_dir, "--output_dir", str(out), "--strategy", "qlora", "--qlora_hooks",
                       "memory_report", *TRAIN_FLAGS], tmp_path)  # the packaged hook, by name
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


@pytest.mark.slow
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


@pytest.mark.slow
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
            from qlora_plugin.quant.config import model_init_kwargs

            return {**model_init_kwargs(options, init_kwargs, runtime), "attn_implementation": "eager"}

    pm = get_plugin_manager(load_entrypoints=False)
    pm.register(SGDPlugin())
    trainer = make_trainer("qlora", plugin_manager=pm, model=tiny_models["llama"],
                           train_dataset=load_dataset(str(REPO / "tests" / "data" / "skills"))["train"],
                           args=SFTConfig(output_dir=str(tmp_path), max_steps=1, report_to="none", use_cpu=True,
                                          save_strategy="no", max_length=64))
    trainer.create_optimizer()
    assert isinstance(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer,
                      torch.optim.SGD)
    assert trainer.model.config._attn_implementation == "eager"
    assert getattr(trainer.model, "is_loaded_in_4bit", False)


def _skills():
    from datasets import load_dataset

    return load_dataset(str(REPO / "tests" / "data" / "skills"))["train"]


@pytest.mark.slow
def test_lifecycle_hooks_load_observe_recipe_and_facts(tiny_models, tmp_path):
    """qlora_load_model, qlora_model_loaded, qlora_training_defaults and qlora_run_facts, answered by a plugin, in
    the order the pipeline calls them; the user's explicit choice still beats the plugin's recipe."""
    from trl import SFTConfig

    from qlora_plugin import make_trainer

    calls = []

    class Lifecycle:
        @hookimpl(tryfirst=True)
        def qlora_load_model(self, model_id, init_kwargs):
            from transformers import AutoModelForCausalLM

            calls.append("load")
            return AutoModelForCausalLM.from_pretrained(model_id, **init_kwargs)  # no cache, no TRL loader

        @hookimpl
        def qlora_model_loaded(self, model):
            calls.append("loaded:" + ("peft" if hasattr(model, "peft_config") else "base"))

        @hookimpl
        def qlora_training_defaults(self, num_params, runtime):
            from qlora_plugin.strategies.recipe import training_defaults

            calls.append("defaults")
            return {**training_defaults(num_params, runtime), "lr_scheduler_type": "cosine", "max_grad_norm": 0.7}

        @hookimpl
        def qlora_run_facts(self, explicit_options):
            calls.append("facts")
            return {"fallbacks": [f"lifecycle plugin saw {sorted(explicit_options)}"], "adapter": {"note": "x"}}

    pm = get_plugin_manager(load_entrypoints=False)
    pm.register(Lifecycle())
    args = SFTConfig(output_dir=str(tmp_path), max_steps=1, report_to="none", use_cpu=True, save_strategy="no",
                     max_length=32, max_grad_norm=0.5)
    trainer = make_trainer("qlora", options={"lora_r": 4}, plugin_manager=pm, model=tiny_models["llama"],
                           train_dataset=_skills(), args=args)
    assert calls == ["load", "loaded:base", "defaults", "facts"]
    assert getattr(trainer.model, "is_loaded_in_4bit", False)
    assert str(getattr(trainer.args.lr_scheduler_type, "value", trainer.args.lr_scheduler_type)) == "cosine"
    assert trainer.args.max_grad_norm == 0.5  # set in Python: the user's, not the plugin's recipe
    trainer.train()
    report = json.loads((tmp_path / "qlora_plugin_report.json").read_text())
    assert "lifecycle plugin saw ['lora_r']" in report["fallbacks"]
    assert report["adapter"]["note"] == "x" and report["adapter"]["r"] == 4  # merged into the built-in section
    assert report["quantization"]["cached_base"] is None  # the plugin loaded it: the cache did not


@pytest.mark.slow
def test_features_are_default_plugins_a_user_can_unregister(tiny_models, tmp_path):
    """Every feature is registered like a third-party plugin; taking one out takes out exactly its effect."""
    from trl import SFTConfig

    from qlora_plugin import make_trainer
    from qlora_plugin.plugin.manager import DEFAULT_PLUGINS

    pm = get_plugin_manager(load_entrypoints=False)
    assert [name for name in DEFAULT_PLUGINS if pm.get_plugin(name) is None] == []
    pm.unregister(name="qlora_plugin.training.report")
    args = SFTConfig(output_dir=str(tmp_path), max_steps=1, report_to="none", use_cpu=True, save_strategy="no",
                     max_length=32)
    make_trainer("qlora", plugin_manager=pm, model=tiny_models["llama"], train_dataset=_skills(), args=args).train()
    assert not (tmp_path / "qlora_plugin_report.json").exists()
    assert (tmp_path / "qlora_plugin_quantization.json").exists()  # the record plugin still ran


def test_plan_counts_the_adapter_a_plugin_wraps(tiny_models):
    """`plan` builds its skeleton through qlora_wrap_model: a plugin's own adapter is what it counts."""
    from qlora_plugin.plan.estimate import PlanSettings, make_plans

    class TinyAdapter:
        @hookimpl
        def qlora_register_strategies(self, register):
            register(Strategy("tiny-adapter", "rank 2 on q_proj, by its own wrap hook", {"load_in_4bit": True}))

        @hookimpl
        def qlora_wrap_model(self, strategy, model):
            if strategy.name != "tiny-adapter":
                return None
            from peft import LoraConfig, get_peft_model

            return get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))

    pm = get_plugin_manager(load_entrypoints=False)
    pm.register(TinyAdapter())
    settings = PlanSettings(batch_size=1, seq_len=16, device="cpu", dtype="float32")
    tiny, qlora = make_plans(tiny_models["llama"], ["tiny-adapter", "qlora"], settings, {}, pm=pm)
    hidden, layers = 64, 2  # the tiny llama: q_proj is 64 -> 64
    assert tiny.details["trainable_params"] == layers * 2 * (hidden * 2)  # A (2 x 64) + B (64 x 2) per layer
    assert qlora.details["trainable_params"] > 50 * tiny.details["trainable_params"]


@pytest.mark.slow
def test_packaged_hooks_load_by_name(tiny_models, tmp_path):
    """The ready hooks ship in the wheel: `--qlora_hooks qdora` works without a path; a wrong name says which exist."""
    from qlora_plugin.plugin.manager import packaged_hooks

    assert set(packaged_hooks()) == {"qdora", "memory_report"}
    pm = get_plugin_manager(["qdora"], load_entrypoints=False)
    assert collect_strategies(pm)["qdora"].plugin == "qlora_plugin.hooks.qdora"
    with pytest.raises(QLoRAPluginError, match="No packaged hook named 'qdoar'. Packaged hooks: memory_report, qdora"):
        get_plugin_manager(["qdoar"], load_entrypoints=False)
    listing = run_command(["qlora-plugin", "strategies"], tmp_path)
    assert listing.returncode == 0, listing.stderr
    assert "  qdora: QDoRA = QLoRA + DoRA" in listing.stdout and "  memory_report: Observe training" in listing.stdout


@pytest.mark.slow
def test_architecture_examples_work_as_written(tiny_models, tmp_path):
    """docs/architecture.md's strategy and feature plugin, copied from the page, as hook files of a real run: the
    feature's own option turns it on, and its summary line is printed and kept in the report."""
    from trl import SFTConfig

    from qlora_plugin import make_trainer

    page = (REPO / "docs" / "architecture.md").read_text()
    blocks = [block.split("```")[0] for block in page.split("```python\n")[1:]]
    strategy, feature = (tmp_path / "strategy.py"), (tmp_path / "feature.py")
    strategy.write_text(next(b for b in blocks if "qlora_register_strategies" in b))
    feature.write_text(next(b for b in blocks if "qlora_register_options" in b))
    trainer = make_trainer("qlora-r16", hook_files=[str(strategy), str(feature)], options={"train_final_norm": True},
                           model=tiny_models["llama"], train_dataset=_skills(),
                           args=SFTConfig(output_dir=str(tmp_path / "out"), max_steps=1, report_to="none",
                                          use_cpu=True, save_strategy="no", max_length=32))
    config = trainer.model.peft_config["default"]
    assert config.r == 16 and set(config.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    trained = {n for n, p in trainer.model.named_parameters() if p.requires_grad and "lora_" not in n}
    assert trained == {"base_model.model.model.norm.weight"}
    trainer.train()
    report = json.loads((tmp_path / "out" / "qlora_plugin_report.json").read_text())
    assert report["adapter"]["final_norm_trained"] is True and report["strategy"] == "qlora-r16"
    assert ["final norm", "trained beside the adapter (train_final_norm)"] in report["summary_lines"]


@pytest.mark.parametrize("typed", ["QLoRA", "Qlora", "QLORA", "qlora"])
def test_strategy_names_match_regardless_of_case(typed):
    """`--strategy QLoRA` (the paper's spelling) or a one-letter case slip is the 4-bit strategy, never `lora`."""
    assert get_strategy(get_plugin_manager(load_entrypoints=False), typed).name == "qlora"


def test_a_suggestion_names_the_family_of_each_close_strategy():
    """A typo close to both `qlora` and `lora` offers both, each with what it trains on: never one family for the
    other silently."""
    pm = get_plugin_manager(load_entrypoints=False)
    with pytest.raises(QLoRAPluginError) as caught:
        get_strategy(pm, "qloar")
    message = str(caught.value)
    assert "'qlora' (4-bit base)" in message and "'lora' (16-bit base)" in message, message
    with pytest.raises(QLoRAPluginError, match=r"Did you mean 'lora' \(16-bit base\) or 'qlora' \(4-bit base\)\?"):
        get_strategy(pm, "Lroa")


def test_strategy_names_differing_only_in_case_are_refused():
    class Clash:
        @hookimpl
        def qlora_register_strategies(self, register):
            register(Strategy("QLoRA", "impostor", {}))

    pm = get_plugin_manager(load_entrypoints=False)
    pm.register(Clash())
    with pytest.raises(QLoRAPluginError, match="is registered twice .*as '(qlora|QLoRA)'"):
        collect_strategies(pm)
