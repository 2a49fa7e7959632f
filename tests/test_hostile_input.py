"""Hostile input, one case per row of docs/troubleshooting.md: each gets a message naming what was wrong and what
is allowed, a non-zero exit (status 2 at activation) and no traceback.

Most cases run the activation in-process (`activation.activate_from_process`, exactly what a script runs when it
imports `trl`); the cases whose error comes later in the script run as real processes (`run_python`).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from conftest import DATA, TRAIN_FLAGS, run_command, run_python

from qlora_plugin import QLoRAPluginError
from qlora_plugin.integration import activation, state


@pytest.fixture
def activate(monkeypatch, capsys, tmp_path):
    """Run the activation of a script started as `python sft.py ARGV` with `env`; return its stderr."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delattr(sys, "_qlora_plugin_own_cli", raising=False)

    def run(argv, env=None):
        monkeypatch.setattr(sys, "argv", ["sft.py", *argv])
        for name, value in (env or {}).items():
            monkeypatch.setenv(name, value)
        with pytest.raises(SystemExit) as exit_:
            activation.activate_from_process()
        err = capsys.readouterr().err
        assert exit_.value.code == 2
        assert "Traceback" not in err and "qlora-plugin: error" in err, err
        assert state.active_request() is None
        return err

    return run


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return path.name


# --- command line -------------------------------------------------------------------------------------------------

CLI = {
    "negative rank": (["--lora_r", "-3"], "`lora_r` must be a positive integer"),
    "fractional rank": (["--lora_r", "8.5"], "invalid int value: '8.5'"),
    "zero alpha": (["--lora_alpha", "0"], "`lora_alpha` must be a positive number"),
    "bad quant storage": (["--bnb_4bit_quant_storage", "int3"], "invalid choice: 'int3'"),
    "bad boolean": (["--use_dora", "maybe"], "Truthy value expected"),
    "target modules without names": (["--lora_target_modules"], "expected at least one argument"),
    "empty strategy": (["--strategy="], "`--strategy` needs a name"),
}


@pytest.mark.parametrize("case", CLI)
def test_command_line(case, activate):
    argv, fragment = CLI[case]
    assert fragment in activate(["--strategy", "qlora", *argv] if case != "empty strategy" else argv)


def test_trl_dtype_choice_is_trls_message(capsys):
    """`--dtype fp8` is TRL's flag: TRL's parser refuses it (status 2, its own message, no traceback)."""
    from trl.scripts.sft import make_parser

    with pytest.raises(SystemExit) as exit_:
        make_parser().parse_args_and_config(["--dtype", "fp8", "--output_dir", "o"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "argument --dtype: invalid choice: 'fp8'" in err and "Traceback" not in err


@pytest.mark.slow
def test_misspelled_flag_gets_a_suggestion(tiny_models, tmp_path):
    out = tmp_path / "out"
    proc = run_python(["-m", "trl.scripts.sft", "--model_name_or_path", tiny_models["llama"], "--dataset_name",
                       str(DATA), "--output_dir", str(out), "--strategy", "qlora", "--lora_rank", "8", *TRAIN_FLAGS],
                     tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "qlora-plugin: error: Unknown argument(s) --lora_rank 8" in proc.stderr
    assert "Did you mean --lora_r?" in proc.stderr and not out.exists()


COMMAND = {
    "strategies with a missing hook file": (["strategies", "--hooks", "missing.py"],
                                            "Hook file 'missing.py' does not exist"),
    "tiny-model with a missing data file": (["tiny-model", "out", "--data", "missing.jsonl"],
                                            "Data file 'missing.jsonl' cannot be read"),
    "tiny-model with a data file not JSONL": (["tiny-model", "out", "--data", "notes.jsonl"],
                                              "Data file 'notes.jsonl', line 2: not a JSON object"),
    "tiny-model with a zero size": (["tiny-model", "out", "--hidden-size", "0"],
                                    "--hidden-size: must be a positive integer, got '0'"),
    "tiny-model with a size the heads do not divide": (["tiny-model", "out", "--hidden-size", "66"],
                                                       "hidden size 66 must be a multiple of the 4 attention heads"),
    "a misspelled command": (["strategy"], "unknown command 'strategy': did you mean `qlora-plugin strategies`?"),
    "a command that does not exist": (["train"], "unknown command 'train': The commands are: strategies, options"),
}


def test_a_listing_cut_short_by_its_reader_is_not_an_error(tmp_path):
    """`qlora-plugin options | head -1`: the reader closes the pipe; the command ends quietly with status 0."""
    import subprocess

    proc = subprocess.run(f"'{sys.executable}' -m qlora_plugin.cli options | head -1", shell=True, cwd=tmp_path,
                          capture_output=True, text=True, executable="/bin/bash",
                          env={**os.environ, "PYTHONUNBUFFERED": "0"})
    assert proc.stdout.count("\n") == 1 and "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, \
        proc.stderr


@pytest.mark.parametrize("case", COMMAND)
def test_qlora_plugin_command(case, monkeypatch, capsys, tmp_path):
    """The plugin's own command: a user error is a message and status 2, and no output folder."""
    monkeypatch.setattr(sys, "_qlora_plugin_own_cli", True, raising=False)  # what importing cli sets; undone after
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.jsonl").write_text('{"text": "fine"}\nnot json\n')
    from qlora_plugin import cli

    argv, fragment = COMMAND[case]
    try:
        status = cli.main(argv)
    except SystemExit as exit_:  # argparse
        status = exit_.code
    err = capsys.readouterr().err
    assert status == 2 and "error: " in err and fragment in err and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.jsonl"]


@pytest.mark.slow  # seconds: a process killed or waiting on the Hub's retries (make test-fast: under a minute)
@pytest.mark.parametrize("hub", ["offline", "unreachable"])
def test_plan_on_a_hub_id_without_the_hub(tmp_path, hub):
    """`plan` on a Hub id with no Hub: at most one line while huggingface_hub retries (not a pair per retry), then
    one message that ends each sentence once and says nothing about custom code (not the problem here)."""
    env = ({"HF_HUB_OFFLINE": "1"} if hub == "offline" else
           {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")})
    proc = run_command(["qlora-plugin", "plan", "someone/not-cached-model"], tmp_path, env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == (1 if hub == "offline" else 2) and "Retrying in" not in proc.stderr, proc.stderr
    assert lines[-1].startswith("qlora-plugin: error: Could not read the config of 'someone/not-cached-model': ")
    assert ".." not in lines[-1] and "custom code" not in lines[-1], lines[-1]
    if hub == "unreachable":
        assert lines[0].startswith("[qlora-plugin] http://127.0.0.1:9 cannot be reached")


# --- YAML --config ------------------------------------------------------------------------------------------------

YAML = {
    "unreadable file": (None, "cannot be read (No such file or directory)"),
    "invalid YAML": ("strategy: qlora\nlora_r: [8\n", "is not valid YAML"),
    "not a mapping": ("- strategy\n- qlora\n", "must hold a YAML mapping"),
    "wrong type": ("strategy: qlora\nlora_r: eight\n", "`lora_r` must be an integer; got 'eight'"),
    "list option not a list": ("strategy: qlora\nlora_target_modules: 5\n", "`lora_target_modules` must be a list"),
    "unknown strategy": ("strategy: qlroa\n",
                         "Unknown strategy 'qlroa'. Did you mean 'qlora' (4-bit base) or 'lora' (16-bit base)?"),
    "strategy not a name": ("strategy: [qlora]\n", "`strategy` must be a name"),
    "option in env block": ("strategy: qlora\nenv:\n  lora_r: 16\n", "lora_r in the YAML `env:` block"),
    "plugin variable in env block": ("env:\n  QLORA_PLUGIN_STRATEGY: qlora\n  QLORA_PLUGIN_OPTIONS: '{}'\n",
                                     "QLORA_PLUGIN_OPTIONS in the YAML `env:` block would be ignored"),
    "env block not a mapping": ("strategy: qlora\nenv: 5\n", "`env` in the config file 'cfg.yaml' must be a mapping"),
    "hooks not a list": ("strategy: qlora\nqlora_hooks: 5\n", "`qlora_hooks` must be a list of .py file paths"),
}


@pytest.mark.parametrize("case", YAML)
def test_yaml_config(case, activate, tmp_path):
    text, fragment = YAML[case]
    if text is not None:
        write(tmp_path / "cfg.yaml", text)
    strategy = [] if "strateg" in case else ["--strategy", "qlora"]  # those cases are about the YAML's strategy
    assert fragment in activate([*strategy, "--config", "cfg.yaml"])


@pytest.mark.slow
def test_yaml_misspelled_key(tiny_models, tmp_path):
    """TRL's sft.py drops unknown YAML keys silently; one that looks like a plugin key is an error instead."""
    write(tmp_path / "cfg.yaml", "strategy: qlora\nlora_rank: 8\n")
    out = tmp_path / "out"
    proc = run_python(["-m", "trl.scripts.sft", "--config", "cfg.yaml", "--model_name_or_path", tiny_models["llama"],
                       "--dataset_name", str(DATA), "--output_dir", str(out), *TRAIN_FLAGS], tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "Unknown key(s) in the YAML config" in proc.stderr and "lora_rank: Did you mean --lora_r?" in proc.stderr
    assert not out.exists()


# --- misspelled plugin settings: an error whether or not a strategy is active -------------------------------------

MISSPELLED = {  # (command line, environment, YAML --config text, message)
    "YAML strategy key": ([], {}, "stratgy: qlora\n", "`stratgy` in the YAML config: did you mean `strategy`?"),
    "YAML hooks key with a dash": ([], {}, "strategy: qlora\nqlora-hooks: [mine.py]\n",
                                   "`qlora-hooks` in the YAML config: did you mean `qlora_hooks`?"),
    "variable in the YAML env block": ([], {}, "env:\n  QLORA_PLUGN_STRATEGY: qlora\n",
                                       "`QLORA_PLUGN_STRATEGY` in the YAML `env:` block: did you mean "
                                       "`QLORA_PLUGIN_STRATEGY`?"),
    "strategy flag": (["--stratgy", "qlora"], {}, None, "`--stratgy`: did you mean `--strategy`?"),
    "strategy flag with one dash": (["-strategy", "qlora"], {}, None, "`-strategy`: did you mean `--strategy`?"),
    "strategy flag with a typographic dash": (["\u2014strategy", "qlora"], {}, None,
                                              "`\u2014strategy`: did you mean `--strategy`?"),
    "strategy flag with a colon": (["--strategy:qlora"], {}, None, "did you mean `--strategy qlora`?"),
    "hooks flag": (["--strategy", "qlora", "--qlora_hook", "mine.py"], {}, None,
                   "`--qlora_hook`: did you mean `--qlora_hooks`?"),
    "environment variable": ([], {"QLORA_PLUGIN_STRATEGIE": "qlora"}, None,
                             "`QLORA_PLUGIN_STRATEGIE` in the environment: did you mean `QLORA_PLUGIN_STRATEGY`?"),
}


@pytest.mark.parametrize("case", MISSPELLED)
def test_misspelled_plugin_setting(case, activate, tmp_path):
    argv, env, text, fragment = MISSPELLED[case]
    if text is not None:
        argv = [*argv, "--config", write(tmp_path / "cfg.yaml", text)]
    err = activate(argv, env)
    assert fragment in err and "would go without the strategy or hook files you meant" in err


@pytest.mark.slow
def test_misspelled_strategy_key_in_a_yaml_recipe(tiny_models, tmp_path):
    """`stratgy: qlora` used to train a full, unquantized model and exit 0 (TRL drops unknown keys)."""
    out = tmp_path / "out"
    write(tmp_path / "cfg.yaml", f"model_name_or_path: {tiny_models['llama']}\ndataset_name: {DATA}\n"
                                 f"output_dir: {out}\nstratgy: qlora\nmax_steps: 1\nuse_cpu: true\n")
    proc = run_python(["-m", "trl.scripts.sft", "--config", "cfg.yaml"], tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "qlora-plugin: error: Misspelled qlora-plugin setting(s): `stratgy` in the YAML config" in proc.stderr
    assert not out.exists()


# --- environment variables ----------------------------------------------------------------------------------------

ENV = {
    "unknown strategy": ({"QLORA_PLUGIN_STRATEGY": "qlroa"}, "Unknown strategy 'qlroa'"),
    "options not an object": ({"QLORA_PLUGIN_OPTIONS": "[8]"}, "QLORA_PLUGIN_OPTIONS must be a JSON object"),
    "unknown option": ({"QLORA_PLUGIN_OPTIONS": '{"lora_rank": 8}'},
                       "Unknown strategy option(s): lora_rank. Did you mean lora_r?"),
    "option of the wrong type": ({"QLORA_PLUGIN_OPTIONS": '{"lora_r": "8"}'}, "`lora_r` must be an integer"),
    "missing hook file": ({"QLORA_PLUGIN_HOOKS": "missing.py"}, "Hook file 'missing.py' does not exist"),
    "plugin not installed": ({"QLORA_PLUGIN_LOAD": "nope"},
                             "QLORA_PLUGIN_LOAD names nope, which no installed package provides"),
    "corrupt explicit args": ({"QLORA_PLUGIN_EXPLICIT_ARGS": "{"}, "QLORA_PLUGIN_EXPLICIT_ARGS must be a JSON list"),
}


@pytest.mark.parametrize("case", ENV)
def test_environment(case, activate):
    env, fragment = ENV[case]
    assert fragment in activate([], {"QLORA_PLUGIN_STRATEGY": "qlora", **env})


# --- hook files ---------------------------------------------------------------------------------------------------

HOOKS = {
    "syntax error": ("def broken(:\n", "failed to import: SyntaxError"),
    "raises on import": ("raise RuntimeError('boom')\n", "failed to import: RuntimeError: boom"),
    "unknown hook name": ("from qlora_plugin import hookimpl\n\n@hookimpl\ndef qlora_wrap_modle(model):\n"
                          "    return model\n", "unknown hook 'qlora_wrap_modle'"),
    "wrong hook arguments": ("from qlora_plugin import hookimpl\n\n@hookimpl\ndef qlora_wrap_model(modle):\n"
                             "    return modle\n", "Argument(s) {'modle'} are declared in the hookimpl"),
    "hook without @hookimpl": ("def qlora_trainer_callbacks(training_args):\n    return []\n",
                               "defines qlora_trainer_callbacks without `@hookimpl`"),
    "registers a non-strategy": ("from qlora_plugin import hookimpl\n\n@hookimpl\n"
                                 "def qlora_register_strategies(register):\n    register('fast')\n",
                                 "registered 'fast', not a Strategy"),
    "strategy name taken": ("from qlora_plugin import Strategy, hookimpl\n\n@hookimpl\n"
                            "def qlora_register_strategies(register):\n    register(Strategy('qlora', 'mine'))\n",
                            "Strategy 'qlora' is registered twice"),
}


@pytest.mark.parametrize("case", HOOKS)
def test_hook_file(case, activate, tmp_path):
    text, fragment = HOOKS[case]
    name = write(tmp_path / f"hook_{case.replace(' ', '_').replace('@', '')}.py", text)
    err = activate(["--strategy", "qlora", "--qlora_hooks", name])
    assert fragment in err
    if "hook" in case:
        assert "The hooks are: qlora_create_optimizer(" in err or "@hookimpl" in err


# --- Python API ---------------------------------------------------------------------------------------------------

API = {
    "strategy not a name": (dict(strategy=None), "`strategy` must be a strategy name"),
    "unknown strategy": (dict(strategy="qlroa"), "Unknown strategy 'qlroa'"),
    "options not a dict": (dict(options=[("lora_r", 8)]), "`options` must be a dict"),
    "unknown option": (dict(options={"lora_rank": 8}), "Did you mean lora_r?"),
    "option of the wrong type": (dict(options={"lora_dropout": "high"}), "`lora_dropout` must be a number"),
    "hook files not paths": (dict(hook_files=[3]), "`hook_files` must be a list of .py file paths"),
    "model not a model": (dict(model=42), "`model` must be a model id or folder"),
    "dtype not a dtype": (dict(dtype="fp8"), "`dtype` must be one of auto, bfloat16, float16, float32"),
}


@pytest.mark.parametrize("case", API)
def test_python_api(case, tiny_models, tmp_path):
    from trl import SFTConfig

    from qlora_plugin import apply_strategy

    arguments = dict(strategy="qlora", options=None, hook_files=(), model=tiny_models["llama"], dtype=None)
    arguments.update(API[case][0])
    dtype = arguments.pop("dtype")
    args = SFTConfig(str(tmp_path / "out"), report_to="none", use_cpu=True,
                     model_init_kwargs={"dtype": dtype} if dtype else None)
    with pytest.raises(QLoRAPluginError) as err:
        apply_strategy({"model": arguments.pop("model"), "args": args}, **arguments)
    assert API[case][1] in str(err.value)


# --- model folders ------------------------------------------------------------------------------------------------


def model_folder(tmp_path, source, config_changes=None, weights=True, config=True) -> str:
    folder = tmp_path / "model"
    folder.mkdir()
    if config:
        data = json.loads((Path(source) / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**data, **(config_changes or {})}))
    if weights:
        shutil.copy(Path(source) / "model.safetensors", folder)
    return str(folder)


MODELS = {
    "folder missing": (None, "does not exist"),
    "path is a file": ("file", "is a file, not a model folder"),
    "no config.json": (dict(config=False), "has no config.json"),
    "config not JSON": ("badjson", "is not valid JSON"),
    "no weights": (dict(weights=False), "no file named model.safetensors"),
    "unknown model_type": (dict(config_changes={"model_type": "mystery"}), "model_type 'mystery', which transformers"),
    "8-bit checkpoint": (dict(config_changes={"quantization_config": {"quant_method": "bitsandbytes",
                                                                      "load_in_8bit": True}}),
                         "already quantized (bitsandbytes 8-bit"),
    "GPTQ checkpoint": (dict(config_changes={"quantization_config": {"quant_method": "gptq", "bits": 4}}),
                        "already quantized (gptq"),
}


@pytest.mark.parametrize("case", MODELS)
def test_model_folder(case, tiny_models, tmp_path):
    from trl import SFTConfig

    from qlora_plugin import apply_strategy

    spec, fragment = MODELS[case]
    if spec is None:
        path = str(tmp_path / "no" / "such" / "model")
    elif spec == "file":
        path = str(tmp_path / "model.safetensors")
        shutil.copy(Path(tiny_models["llama"]) / "model.safetensors", path)
    elif spec == "badjson":
        path = model_folder(tmp_path, tiny_models["llama"], config=False)
        (Path(path) / "config.json").write_text("{not json")
    else:
        path = model_folder(tmp_path, tiny_models["llama"], **spec)
    with pytest.raises(QLoRAPluginError) as err:
        apply_strategy({"model": path, "args": SFTConfig(str(tmp_path / "out"), report_to="none", use_cpu=True)})
    assert fragment in str(err.value)
    assert not (tmp_path / "out").exists()


def test_4bit_checkpoint_with_the_16bit_strategy(tiny_models, tmp_path):
    from trl import SFTConfig

    from qlora_plugin import apply_strategy

    path = model_folder(tmp_path, tiny_models["llama"], {"quantization_config": {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}})
    with pytest.raises(QLoRAPluginError, match="use `--strategy qlora` for a 4-bit checkpoint"):
        apply_strategy({"model": path, "args": SFTConfig(str(tmp_path / "out"), report_to="none", use_cpu=True)},
                       "lora")


# --- datasets -----------------------------------------------------------------------------------------------------

DATASETS = {
    "no text column": ({"foo": ["a"], "bar": ["b"]}, "has columns ['foo', 'bar']; SFTTrainer needs `text`"),
    "prompt without completion": ({"prompt": ["a"]}, "`prompt` + `completion`"),
}


@pytest.mark.parametrize("case", DATASETS)
def test_dataset_columns(case, tiny_models, tmp_path, monkeypatch):
    """Refused from the column names, before the model is loaded."""
    from datasets import Dataset
    from trl import SFTConfig

    from qlora_plugin import apply_strategy
    from qlora_plugin.training import pipeline as trainer

    monkeypatch.setattr(trainer, "load_model", lambda *a: pytest.fail("the model was loaded"))
    columns, fragment = DATASETS[case]
    with pytest.raises(QLoRAPluginError) as err:
        apply_strategy({"model": tiny_models["llama"], "train_dataset": Dataset.from_dict(columns),
                        "args": SFTConfig(str(tmp_path / "out"), report_to="none", use_cpu=True)})
    assert fragment in str(err.value) and "--dataset_text_field" in str(err.value)


@pytest.mark.slow
def test_dataset_columns_in_a_script(tiny_models, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text('{"question": "a", "answer": "b"}\n' * 4)
    out = tmp_path / "out"
    proc = run_python(["-m", "trl.scripts.sft", "--model_name_or_path", tiny_models["llama"], "--dataset_name",
                       str(tmp_path / "data"), "--output_dir", str(out), "--strategy", "qlora", *TRAIN_FLAGS],
                      tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "The train_dataset has columns ['question', 'answer']" in proc.stderr and not out.exists()


@pytest.mark.slow
def test_dataset_path_missing(tiny_models, tmp_path):
    """`datasets` raises in the user's script; the active strategy's excepthook says it without the traceback."""
    out = tmp_path / "out"
    proc = run_python(["-m", "trl.scripts.sft", "--model_name_or_path", tiny_models["llama"], "--dataset_name",
                       str(tmp_path / "no_data"), "--output_dir", str(out), "--strategy", "qlora", *TRAIN_FLAGS],
                      tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "qlora-plugin: error: The dataset could not be loaded: Couldn't find any data file" in proc.stderr
    assert "trl/scripts/sft.py" in proc.stderr and not out.exists()


@pytest.mark.parametrize("offline", ["0", "1"])
@pytest.mark.slow
def test_dataset_relative_path_missing(tiny_models, tmp_path, offline):
    """A relative path that does not exist: online it is no valid Hub id either (huggingface_hub's 26-line
    `HFValidationError`), offline `datasets` says it cannot reach it on the Hub. One line says what it is."""
    proc = run_python(["-m", "trl.scripts.sft", "--model_name_or_path", tiny_models["llama"], "--dataset_name",
                       "./nodata", "--output_dir", "out", "--strategy", "qlora", *TRAIN_FLAGS], tmp_path,
                      {"HF_HUB_OFFLINE": offline, "HF_DATASETS_OFFLINE": offline})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert (f"qlora-plugin: error: The dataset could not be loaded: './nodata' is not a folder or file (looked in "
            f"{tmp_path})") in proc.stderr
    assert (", nor a Hub dataset id" in proc.stderr) is (offline == "0")
    assert proc.stderr.strip().count("\n") == 0 and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_dataset_on_an_unreachable_hub(tiny_models, tmp_path):
    """A Hub-like name with the Hub out of reach: huggingface_hub's retry lines become one line, then the message."""
    proc = run_python(["-m", "trl.scripts.sft", "--model_name_or_path", tiny_models["llama"], "--dataset_name",
                       "someone/no-such-data", "--output_dir", "out", "--strategy", "qlora", *TRAIN_FLAGS], tmp_path,
                      {"HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2 and "Retrying in" not in proc.stderr, proc.stderr
    assert lines[0].startswith("[qlora-plugin] http://127.0.0.1:9 cannot be reached")
    assert "HF_HUB_OFFLINE=1 uses local files only and fails at once" in lines[0]
    assert lines[1].startswith("qlora-plugin: error: The dataset could not be loaded: Couldn't reach "
                               "'someone/no-such-data' on the Hub")
    assert "HF_HUB_OFFLINE=1 makes this fail at once, without the retries." in lines[1]


# --- errors libraries raise in the user's script, shown by the excepthook --------------------------------------


@pytest.fixture
def excepthook(monkeypatch, capsys):
    """The excepthook an active strategy installs; returns what it prints for an exception (and checks that it
    ends the process with the user-error status, 2)."""
    from qlora_plugin.integration import excepthook as module

    monkeypatch.setattr(sys, "excepthook", lambda *exc_info: pytest.fail(f"not handled: {exc_info[1]!r}"))
    codes = []
    monkeypatch.setattr(module, "exit_now", codes.append)
    module.install_excepthook()

    def show(excinfo) -> str:
        sys.excepthook(excinfo.type, excinfo.value, excinfo.tb)
        assert codes.pop() == 2
        return capsys.readouterr().err

    return show


def test_bf16_on_a_machine_without_it(excepthook, monkeypatch, tmp_path):
    """TRL asks for bf16 by default; on a CPU-only machine transformers refuses it unless `--use_cpu`."""
    import transformers.training_args
    from trl import SFTConfig

    monkeypatch.setattr(transformers.training_args, "is_torch_bf16_gpu_available", lambda: False)
    with pytest.raises(ValueError) as err:
        SFTConfig(str(tmp_path / "out"), report_to="none")
    assert "qlora-plugin: error: Your setup doesn't support bf16/gpu" in excepthook(err)
    assert "Add `--use_cpu`" in excepthook(err)


@pytest.mark.slow
def test_resume_from_missing_checkpoint(tiny_models, tmp_path, excepthook):
    """A checkpoint that is not there: named, with what to pass instead (checked before training starts)."""
    from datasets import load_dataset
    from trl import SFTConfig

    from qlora_plugin import make_trainer

    trainer = make_trainer("qlora", model=tiny_models["llama"], train_dataset=load_dataset(str(DATA))["train"],
                           args=SFTConfig(str(tmp_path / "out"), report_to="none", use_cpu=True, max_steps=1,
                                          max_length=32))
    with pytest.raises(ValueError) as err:
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-9"))
    stderr = excepthook(err)
    assert "qlora-plugin: error: --resume_from_checkpoint" in stderr and "is not a folder" in stderr
    assert "checkpoint-500" in stderr and "Traceback" not in stderr


@pytest.mark.parametrize("folder", ["alone", "shared"])
def test_dataset_name_is_one_file(excepthook, tmp_path, monkeypatch, folder):
    """TRL users pass a data file; `load_dataset(NAME)` reads folders and Hub ids only. The message says exactly
    what works (its folder, or a folder of its own when others lie beside it), never "folder or file"."""
    from datasets import load_dataset

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    data = tmp_path / "data"
    data.mkdir()
    for name in ["train.jsonl", *(["test.jsonl"] if folder == "shared" else [])]:
        (data / name).write_text('{"prompt": "a", "completion": "b"}\n')
    with pytest.raises(OSError) as err:
        load_dataset(str(data / "train.jsonl"))
    message = excepthook(err)
    assert f"The dataset could not be loaded: '{data / 'train.jsonl'}' is a file" in message, message
    assert f'load_dataset("json", data_files=\'{data / "train.jsonl"}\')' in message
    assert "folder or file" not in message and message.count("\n") == 1
    if folder == "shared":
        assert "Move it into a folder of its own" in message and "other data files" in message
    else:
        assert f"Pass its folder instead: --dataset_name {data} " in message
        assert "train" in load_dataset(str(data))  # what the message says works, works


def test_a_training_childs_status_is_the_commands(excepthook):
    """`trl sft` / `accelerate launch` re-raise the child's exit: its status (2 for bad input) is the command's."""
    import subprocess

    with pytest.raises(subprocess.CalledProcessError) as err:
        raise subprocess.CalledProcessError(2, ["accelerate", "launch", "sft.py"])
    assert "the training process exited with status 2" in excepthook(err)


def test_unknown_exceptions_keep_their_traceback(monkeypatch, capsys):
    """Only bad input is shortened: any other exception (perhaps a bug) goes to Python's own hook."""
    from qlora_plugin.integration.excepthook import install_excepthook

    seen = []
    monkeypatch.setattr(sys, "excepthook", lambda *exc_info: seen.append(exc_info[1]))
    install_excepthook()
    with pytest.raises(KeyError) as err:
        {}["text"]
    sys.excepthook(err.type, err.value, err.tb)
    assert seen == [err.value] and capsys.readouterr().err == ""
