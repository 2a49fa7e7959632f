"""Options and summary lines a plugin adds (`qlora_register_options`, `qlora_summary_lines`): the same paths as a
built-in option (command line, YAML, QLORA_PLUGIN_OPTIONS, the Python API, `qlora-plugin options`), the same
checks, and the CPU features' own options and lines living in their plugins."""

from __future__ import annotations

import json

import pytest

from qlora_plugin import QLoRAPluginError, get_plugin_manager, hookimpl
from qlora_plugin.integration import activation
from qlora_plugin.plugin.manager import collect_options
from qlora_plugin.plugin.resolution import resolve
from qlora_plugin.core.request import StrategyRequest

HOOK = '''
from qlora_plugin import hookimpl


@hookimpl
def qlora_register_options(register):
    register("warmup_note", str, "off", "Say something at warmup.", choices=("off", "short", "long"))
    register("extra_rank", int, 0, "Extra rank for a test.")
'''


@pytest.fixture
def hook_file(tmp_path):
    path = tmp_path / "feature.py"
    path.write_text(HOOK)
    return str(path)


def _activated(argv, environ=None):
    request, rest = activation.request_from_process(argv, environ or {})
    rest = activation.take_plugin_options(request, rest)
    return resolve(request).options, rest


def test_a_plugin_option_comes_from_the_command_line_yaml_env_and_api(hook_file, tmp_path):
    options, rest = _activated(["--strategy", "qlora", "--qlora_hooks", hook_file, "--warmup_note", "long",
                                "--extra_rank=3", "--output_dir", "out"])
    assert (options.warmup_note, options.extra_rank, options.lora_r) == ("long", 3, 64)
    assert rest == ["--output_dir", "out"]  # the script's parser never sees the plugin's flags

    config = tmp_path / "run.yaml"
    config.write_text(f"strategy: qlora\nqlora_hooks: [{hook_file}]\nwarmup_note: short\n")
    assert _activated(["--config", str(config)])[0].warmup_note == "short"

    env = {"QLORA_PLUGIN_OPTIONS": json.dumps({"extra_rank": 5})}
    assert _activated(["--strategy", "qlora", "--qlora_hooks", hook_file], env)[0].extra_rank == 5

    api = resolve(StrategyRequest("qlora", {"warmup_note": "short"}, hook_files=(hook_file,))).options
    assert api.warmup_note == "short" and api.extra_rank == 0


BAD_VALUES = {
    "not a choice": ({"warmup_note": "loud"}, "`warmup_note` must be one of off, short, long; got 'loud'."),
    "wrong type": ({"extra_rank": "three"}, "`extra_rank` must be an integer; got 'three' (str)."),
    "misspelled": ({"warmup_nte": "off"}, "Unknown strategy option(s): warmup_nte. Did you mean warmup_note?"),
}


@pytest.mark.parametrize("case", BAD_VALUES)
def test_a_plugin_option_is_checked_like_a_built_in_one(hook_file, case):
    given, message = BAD_VALUES[case]
    with pytest.raises(QLoRAPluginError) as caught:
        resolve(StrategyRequest("qlora", given, hook_files=(hook_file,)))
    assert message in str(caught.value)


BAD_REGISTRATIONS = {
    "built-in name": (("lora_r", int, 8, "clash"), "registers option 'lora_r', which qlora-plugin already defines"),
    "another plugin's name": (("cpu_fast_dropout", bool, True, "clash"),
                              "qlora_plugin.cpu.options both register option"),
    "bad name": (("Loud", bool, False, "x"), "an option name must be a lowercase identifier"),
    "bad type": (("odd", list, [], "x"), "of type <class 'list'>; allowed: bool, int, float, str"),
    "bad default": (("odd", int, "1", "x"), "with default '1', not an integer"),
    "no help": (("odd", bool, False, " "), "without a help text"),
}


@pytest.mark.parametrize("case", BAD_REGISTRATIONS)
def test_a_bad_registration_names_the_plugin(case):
    args, message = BAD_REGISTRATIONS[case]
    class Bad:
        @hookimpl
        def qlora_register_options(self, register):
            register(*args)

    pm = get_plugin_manager(load_entrypoints=False)
    pm.register(Bad(), name="bad-plugin")
    with pytest.raises(QLoRAPluginError) as caught:
        collect_options(pm)
    assert "bad-plugin" in str(caught.value) and message in str(caught.value)


def test_the_cpu_features_options_come_from_their_plugins(monkeypatch):
    """Not in the core dataclass: registered by the CPU paths' catalog plugin (so a listing loads no training stack);
    unregister it and the options are gone (an unknown option, a hint)."""
    from qlora_plugin.core.options import OPTION_NAMES

    assert "cpu_fast_dropout" not in OPTION_NAMES and "cpu_dequant_buffer" not in OPTION_NAMES
    pm = get_plugin_manager(load_entrypoints=False)
    owners = {o.name: o.plugin for o in collect_options(pm)}
    assert owners == {"cpu_fast_dropout": "qlora_plugin.cpu.options", "cpu_dequant_buffer": "qlora_plugin.cpu.options"}
    assert resolve(StrategyRequest("qlora", {"cpu_fast_dropout": False}), pm).options.cpu_fast_dropout is False
    pm.unregister(name="qlora_plugin.cpu.options")
    with pytest.raises(QLoRAPluginError, match="Unknown strategy option.*cpu_fast_dropout"):
        resolve(StrategyRequest("qlora", {"cpu_fast_dropout": False}), pm)


def test_options_listing_includes_a_hook_files_options(hook_file, monkeypatch, capsys):
    from qlora_plugin import cli

    monkeypatch.setenv("QLORA_PLUGIN_HOOKS", hook_file)
    assert cli.main(["options"]) == 0
    rows = [row for row in capsys.readouterr().out.splitlines() if row.startswith("| `warmup_note`")]
    assert len(rows) == 1 and "Choices: off, short, long." in rows[0] and "(plugin `hook-file:" in rows[0]


def test_summary_lines_come_from_the_plugins(monkeypatch):
    """The summary prints what `qlora_summary_lines` returned, aligned as the core's lines; the CPU features' lines
    come from their plugins' hooks."""
    from qlora_plugin.cpu import cpu_dropout, dequant_buffer, malloc_tunables
    from qlora_plugin.training.report import format_summary

    facts = {"strategy": "qlora", "plugin": "p", "source": "api", "quantization": None, "model": {"dtype": "float32"},
             "adapter": {"r": 8, "alpha": 16, "dropout": 0.1, "layers": 2, "target_modules": ["q_proj"],
                         "trainable_params": 10, "total_params": 100, "fast_dropout_layers": 2},
             "optimizer": {"name": "adamw_torch"}, "recipe_applied": {}, "user_kept": [], "fallbacks": [],
             "runtime": {"malloc_tunables": "applied: GLIBC_TUNABLES=x (set at start)"}}
    assert "dropout    :" not in format_summary(facts)  # nothing hard-coded for a feature in the core
    facts["quantization"] = {"dequant_buffer_layers": 3}
    lines = [*cpu_dropout.qlora_summary_lines(facts), *dequant_buffer.qlora_summary_lines(facts),
             *malloc_tunables.qlora_summary_lines(facts)]
    facts["quantization"] = None
    text = format_summary({**facts, "summary_lines": lines})
    assert "  dropout    : masks for 2 LoRA layers drawn with one 32-bit draw per element (cpu_fast_dropout)" in text
    assert "  dequantize : 3 large 4-bit layers into one reused buffer (cpu_dequant_buffer)" in text
    assert "  host malloc: glibc small-block caches off" in text
