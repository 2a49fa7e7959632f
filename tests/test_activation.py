"""Reading the request from a process: command line > YAML > environment; our flags leave argv."""

from __future__ import annotations

import json

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from qlora_plugin import QLoRAPluginError
from qlora_plugin.integration.activation import request_from_process


def test_no_strategy_leaves_argv_alone():
    argv = ["--lora_r", "8", "--output_dir", "x"]
    assert request_from_process(argv, {}) == (None, argv)


def test_command_line_request_and_stripping():
    request, rest = request_from_process(
        ["--model_name_or_path", "m", "--strategy", "qlora", "--lora_r", "8", "--use_peft", "--learning_rate",
         "1e-3", "--lora_target_modules", "q_proj", "v_proj", "--output_dir", "o"], {})
    assert request.strategy == "qlora" and request.source == "cli"
    assert request.options == {"lora_r": 8, "lora_target_modules": ["q_proj", "v_proj"]}
    assert rest == ["--model_name_or_path", "m", "--learning_rate", "1e-3", "--output_dir", "o"]
    assert {"learning_rate", "model_name_or_path", "output_dir"} <= request.explicit_training_args


def test_precedence_cli_over_yaml_over_env(tmp_path):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"strategy": "lora", "lora_r": 4, "lora_alpha": 8,
                                                     "max_grad_norm": 1.0}))
    env = {"QLORA_PLUGIN_STRATEGY": "qlora", "QLORA_PLUGIN_OPTIONS": json.dumps({"lora_r": 2, "lora_dropout": 0.2})}
    request, _ = request_from_process(["--config", str(tmp_path / "c.yaml"), "--lora_r", "16"], env)
    assert request.strategy == "lora" and request.source == "yaml"
    assert request.options == {"lora_r": 16, "lora_alpha": 8, "lora_dropout": 0.2}
    assert "max_grad_norm" in request.explicit_training_args
    request, _ = request_from_process(["--config", str(tmp_path / "c.yaml"), "--strategy", "qlora"], env)
    assert request.strategy == "qlora" and request.source == "cli"


@pytest.mark.parametrize("argv, env, config", [
    (["--stratify", "3", "--save_strategy", "no", "--hub_strategy", "end", "--strategies", "x", "--hooks", "a.py",
      "--qlora", "1", "-s", "--", "--stratgy"], {}, {}),  # a script's own flags; after `--`, positional
    ([], {"QLORA_PLUGIN_SOURCE": "cli", "QLORA_PLUGIN_CACHE_DIR": "/c", "MY_STRATEGY": "x", "QLORA_HOME": "/q"}, {}),
    ([], {}, {"save_strategy": "no", "eval_strategy": "steps", "strategies": 2, "env": {"QLORA_PLUGIN_DISABLE": "0"}}),
])
def test_names_that_only_look_like_ours_are_left_alone(tmp_path, argv, env, config):
    if config:
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
        argv = ["--config", str(tmp_path / "c.yaml"), *argv]
    assert request_from_process(argv, env) == (None, argv)


def test_load_in_8bit_contradicts():
    with pytest.raises(QLoRAPluginError, match="contradicts"):
        request_from_process(["--strategy", "qlora", "--load_in_8bit"], {})


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(["--strategy", "--lora_r", "--lora_dropout", "--use_dora",
                                           "--bnb_4bit_quant_type", "--lora_target_modules", "--config", "qlora",
                                           "nf4", "-1", "0.5", "x", "--strategy=", "--"]), st.text(max_size=8)),
                max_size=8))
def test_option_parsing_never_crashes(argv):
    """Any command line either parses, or is a user error (QLoRAPluginError / argparse's SystemExit 2)."""
    try:
        request_from_process(["--strategy", "qlora", *argv], {})
    except QLoRAPluginError:
        pass
    except SystemExit as exit_:
        assert exit_.code == 2
