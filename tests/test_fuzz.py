"""Fuzzing the whole activation path a script runs when it imports `trl` (`activation.activate_from_process`):
random command lines, random YAML `--config` files and random QLORA_PLUGIN_* environments. Every input either
activates, or ends with status 2 and a `qlora-plugin: error` message; nothing else (no traceback) may escape.
In-process, so hundreds of cases take seconds.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from unittest import mock

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qlora_plugin.integration import activation
from qlora_plugin.core.options import OPTION_NAMES

FLAGS = ["--strategy", "--qlora_hooks", "--config", "--use_peft", "--load_in_8bit", "--load_in_4bit",
         *(f"--{name}" for name in OPTION_NAMES)]
WORDS = ["qlora", "lora", "nf4", "fp4", "all-linear", "q_proj", "float32", "auto", "true", "false", "0", "-1", "64",
         "0.5", "1e9", "", "--", "-", "=", "cfg.yaml"]
KEYS = ["strategy", "env", "qlora_hooks", "learning_rate", "QLORA_PLUGIN_STRATEGY", *OPTION_NAMES]
ENV_NAMES = ["QLORA_PLUGIN_STRATEGY", "QLORA_PLUGIN_OPTIONS", "QLORA_PLUGIN_HOOKS", "QLORA_PLUGIN_LOAD",
             "QLORA_PLUGIN_EXPLICIT_ARGS", "QLORA_PLUGIN_SOURCE"]
CASES = {"argv": 300, "yaml": 200, "env": 200}

env_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12)
argv_token = st.one_of(st.sampled_from(FLAGS + WORDS), env_text,
                       st.builds(lambda f, v: f"{f}={v}", st.sampled_from(FLAGS), st.sampled_from(WORDS)))
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(allow_nan=True),
                    st.sampled_from(WORDS), env_text)
yaml_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                            st.dictionaries(st.sampled_from(KEYS), inner, max_size=3)),
                           max_leaves=8)
yaml_mappings = st.dictionaries(st.one_of(st.sampled_from(KEYS), scalars), yaml_values, max_size=6)
with_strategy = st.builds(lambda d, name: {**d, "strategy": name}, yaml_mappings, st.sampled_from(["qlora", "lora"]))
yaml_documents = st.one_of(with_strategy, yaml_mappings, yaml_values)
json_options = st.dictionaries(st.sampled_from([*OPTION_NAMES, "lora_rank"]), scalars, max_size=3).map(json.dumps)
env_values = st.one_of(st.sampled_from(WORDS), env_text, json_options)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """An empty working folder: a random hook path can never name a real file."""
    return tmp_path_factory.mktemp("fuzz")


def activation_outcome(workdir, argv, env=None) -> None:
    """Run the activation like a script would; assert it activates or exits 2 with a message."""
    stderr = io.StringIO()
    env = {"QLORA_PLUGIN_LOAD": "", **(env or {})}
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.dict(os.environ, env))
        stack.enter_context(mock.patch.object(sys, "argv", ["sft.py", *argv]))
        stack.enter_context(mock.patch.object(sys, "excepthook", sys.excepthook))
        stack.enter_context(contextlib.redirect_stderr(stderr))
        cwd = os.getcwd()
        os.chdir(workdir)
        try:
            activation.activate_from_process()
        except SystemExit as exit_:
            assert exit_.code == 2, stderr.getvalue()
            assert "qlora-plugin: error" in stderr.getvalue()
        finally:
            os.chdir(cwd)
            activation.deactivate()


FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@settings(FUZZ, max_examples=CASES["argv"])
@given(st.lists(argv_token, max_size=10))
@pytest.mark.slow
def test_random_command_lines(workdir, monkeypatch, argv):
    monkeypatch.delattr(sys, "_qlora_plugin_own_cli", raising=False)
    activation_outcome(workdir, ["--strategy", "qlora", *argv])


@settings(FUZZ, max_examples=CASES["yaml"])
@given(st.one_of(yaml_documents.map(lambda d: yaml.safe_dump(d, allow_unicode=True)), env_text), st.booleans())
@pytest.mark.slow
def test_random_yaml_configs(workdir, monkeypatch, text, strategy_on_command_line):
    monkeypatch.delattr(sys, "_qlora_plugin_own_cli", raising=False)
    (workdir / "cfg.yaml").write_text(text, encoding="utf-8")
    activation_outcome(workdir, [*(["--strategy", "qlora"] if strategy_on_command_line else []),
                                 "--config", "cfg.yaml"])


@settings(FUZZ, max_examples=CASES["env"])
@given(st.dictionaries(st.sampled_from(ENV_NAMES), env_values, max_size=4))
@pytest.mark.slow
def test_random_environments(workdir, monkeypatch, env):
    monkeypatch.delattr(sys, "_qlora_plugin_own_cli", raising=False)
    activation_outcome(workdir, [], {"QLORA_PLUGIN_STRATEGY": "qlora", **env})
