"""Script activation: turn `--strategy NAME` (CLI), `strategy: NAME` (YAML) or `QLORA_PLUGIN_STRATEGY` into a
`StrategyRequest`, take the plugin's own flags out of `sys.argv` so the script's parser never sees them, and patch
TRL so its `SFTTrainer` applies the strategy. Runs once, when a process first imports `trl`.

Precedence: command line > YAML `--config` > environment. The request is also written to the environment so
child processes (`trl sft` re-launches through `accelerate launch`) inherit it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from . import malloc_tunables
from .errors import QLoRAPluginError, install_excepthook, report_and_exit
from .options import OPTION_NAMES, StrategyOptions
from .request import StrategyRequest
from .yaml_config import read as read_yaml_config

STRATEGY_ENV = "QLORA_PLUGIN_STRATEGY"
OPTIONS_ENV = "QLORA_PLUGIN_OPTIONS"  # JSON, set for child processes
EXPLICIT_ENV = "QLORA_PLUGIN_EXPLICIT_ARGS"  # JSON list, set for child processes
SOURCE_ENV = "QLORA_PLUGIN_SOURCE"  # where the parent process found the strategy
HOOKS_KEY = "qlora_hooks"
# TRL ModelConfig flags a strategy answers for: `use_peft` is implied, `load_in_8bit` contradicts every strategy.
TRL_ANSWERED_FLAGS = ("use_peft", "load_in_8bit")
OWN_KEYS = frozenset(("strategy", HOOKS_KEY, *OPTION_NAMES, *TRL_ANSWERED_FLAGS))

_active: StrategyRequest | None = None


def active_request() -> StrategyRequest | None:
    """The request this process runs under, or None (TRL untouched)."""
    return _active


@dataclasses.dataclass
class _ActivationFlags:
    strategy: str | None = dataclasses.field(default=None, metadata={"help": "QLoRA-plugin strategy name."})
    qlora_hooks: list[str] | None = dataclasses.field(default=None, metadata={"help": "Hook files to load."})
    use_peft: bool = False
    load_in_8bit: bool = False


def _flag_parser() -> argparse.ArgumentParser:
    from transformers import HfArgumentParser

    parser = HfArgumentParser((_ActivationFlags, StrategyOptions), prog="qlora-plugin", add_help=False)
    parser.allow_abbrev = False
    parser.usage = "--strategy NAME [strategy options] (`qlora-plugin strategies` lists them)"
    for action in parser._actions:
        action.default = argparse.SUPPRESS  # the namespace then holds only what was given
        action.required = False
    return parser


def parse_own_flags(argv: list[str]) -> tuple[dict, list[str]]:
    """Split argv into the plugin's flags (only those given) and everything else, in order."""
    parser = _flag_parser()
    namespace, rest = parser.parse_known_args(argv)
    return vars(namespace), rest


def given_flag_names(argv: list[str]) -> set[str]:
    """Names of `--name value` / `--name=value` flags on a command line (what the user set explicitly)."""
    names = set()
    for token in argv:
        if token.startswith("--") and len(token) > 2:
            name = token[2:].split("=", 1)[0].replace("-", "_")
            names.add(name[3:] if name.startswith("no_") else name)
    return names


def request_from_process(argv: list[str], environ) -> tuple[StrategyRequest | None, list[str]]:
    """Work out the request from a command line, its YAML config and the environment. Returns (request, new argv).

    Without a strategy anywhere, returns (None, argv unchanged).
    """
    config, config_problem = read_yaml_config(argv)
    config_env = config.get("env") or {}
    cli_strategy = _cli_strategy(argv)
    strategy = cli_strategy or config.get("strategy") or config_env.get(STRATEGY_ENV) or environ.get(STRATEGY_ENV)
    if not strategy:
        return None, argv
    if config_problem:
        raise QLoRAPluginError(config_problem)
    if not isinstance(strategy, str):
        raise QLoRAPluginError(f"`strategy` must be a name such as qlora; got {strategy!r}.")
    _check_env_block(config_env)
    flags, rest = parse_own_flags(argv)
    source = "cli" if cli_strategy else "yaml" if config.get("strategy") or config_env.get(STRATEGY_ENV) else None
    source = source or environ.get(SOURCE_ENV, "env")

    options = _json_from_env(environ, OPTIONS_ENV, dict, 'a JSON object of strategy options, e.g. {"lora_r": 16}')
    options.update({k: v for k, v in config.items() if k in OPTION_NAMES})
    options.update({k: v for k, v in flags.items() if k in OPTION_NAMES})
    _check_contradictions({**config, **flags})

    hooks = flags.get("qlora_hooks") or config.get(HOOKS_KEY) or []
    if isinstance(hooks, str):
        hooks = [hooks]
    if not isinstance(hooks, list) or not all(isinstance(h, str) for h in hooks):
        raise QLoRAPluginError(f"`{HOOKS_KEY}` must be a list of .py file paths; got {hooks!r}.")
    from .plugins import hook_files_from_env

    hook_files = tuple(dict.fromkeys([*hooks, *hook_files_from_env()]))

    explicit = set(_json_from_env(environ, EXPLICIT_ENV, list, "a JSON list of argument names (set by the plugin)"))
    explicit |= given_flag_names(rest) | {k for k in config if k not in OWN_KEYS and k != "env"}
    return StrategyRequest(strategy, options, frozenset(explicit), hook_files, source), rest


def _cli_strategy(argv: list[str]) -> str | None:
    for i, token in enumerate(argv):
        if token == "--strategy":
            if i + 1 >= len(argv) or argv[i + 1].startswith("--") or not argv[i + 1]:
                raise QLoRAPluginError("`--strategy` needs a name, e.g. `--strategy qlora`.")
            return argv[i + 1]
        if token.startswith("--strategy="):
            if token == "--strategy=":
                raise QLoRAPluginError("`--strategy` needs a name, e.g. `--strategy qlora`.")
            return token.split("=", 1)[1]
    return None


def _json_from_env(environ, name: str, kind: type, what: str):
    """A JSON value of type `kind` from an environment variable (empty or unset: an empty one)."""
    raw = environ.get(name)
    if not raw:
        return kind()
    try:
        value = json.loads(raw)
    except ValueError:
        value = None
    if not isinstance(value, kind) or (kind is list and not all(isinstance(v, str) for v in value)):
        raise QLoRAPluginError(f"{name} must be {what}; got {raw!r}. Fix or unset it.")
    return value


def _check_env_block(config_env: dict) -> None:
    """Only QLORA_PLUGIN_STRATEGY works in a YAML `env:` block: TRL applies the block after the plugin has read
    its settings, so anything else there would be silently ignored."""
    misplaced = sorted(str(k) for k in config_env
                       if k in OWN_KEYS or (str(k).startswith("QLORA_PLUGIN_") and k != STRATEGY_ENV))
    if misplaced:
        raise QLoRAPluginError(
            f"{', '.join(misplaced)} in the YAML `env:` block would be ignored: only {STRATEGY_ENV} is read there. "
            "Put strategy options and `qlora_hooks` at the top level of the YAML file (e.g. `lora_r: 16`), and "
            "other QLORA_PLUGIN_* variables in the shell environment."
        )


def _check_contradictions(given: dict) -> None:
    if given.get("load_in_8bit") in (True, "true", "True"):
        raise QLoRAPluginError(
            "`--load_in_8bit` contradicts `--strategy`: strategies load the base in 4-bit (qlora) or 16-bit (lora). "
            "Remove `--load_in_8bit`, or drop `--strategy` to use TRL's own 8-bit loading."
        )


def validate(request: StrategyRequest) -> None:
    """Fail early, before the script does any work: the strategy exists, options and hook files are valid."""
    from .options import build_options
    from .plugins import get_plugin_manager, get_strategy

    pm = get_plugin_manager(request.hook_files)
    strategy = get_strategy(pm, request.strategy)
    build_options(dict(strategy.option_defaults), request.options)
    if not strategy.option_defaults.get("load_in_4bit", True) and request.options.get("load_in_4bit") is True:
        raise QLoRAPluginError(
            f"`--load_in_4bit` contradicts `--strategy {strategy.name}` (16-bit). Use `--strategy qlora` for a 4-bit "
            "base."
        )


def publish(request: StrategyRequest) -> None:
    """Write the request to the environment so processes this one launches run under it too."""
    os.environ[STRATEGY_ENV] = request.strategy
    os.environ[OPTIONS_ENV] = json.dumps(request.options)
    os.environ[EXPLICIT_ENV] = json.dumps(sorted(request.explicit_training_args))
    os.environ[SOURCE_ENV] = request.source
    if request.hook_files:
        from .plugins import HOOKS_ENV

        os.environ[HOOKS_ENV] = os.pathsep.join(request.hook_files)


def activate(request: StrategyRequest) -> None:
    """Make `request` this process's strategy and patch TRL (now, or when the modules are imported)."""
    global _active
    _active = request
    from . import _bootstrap, trl_patches

    w = _bootstrap.watcher()
    w.watch("trl.trainer.sft_trainer", trl_patches.patch_sft_trainer)
    w.watch("trl.scripts.utils", trl_patches.patch_trl_parser)


def deactivate() -> None:
    """Forget the active request (patched TRL methods then pass straight through)."""
    global _active
    _active = None


def _use_cpu(argv: list[str]) -> bool:
    """`--use_cpu` given and true, on the command line or in the YAML `--config` (TRL's own flag)."""
    value = read_yaml_config(argv)[0].get("use_cpu", False)
    for i, arg in enumerate(argv):
        if arg in ("--use_cpu", "--use-cpu"):
            following = argv[i + 1] if i + 1 < len(argv) else ""
            value = following if following and not following.startswith("-") else True
        elif arg.startswith(("--use_cpu=", "--use-cpu=")):
            value = arg.split("=", 1)[1]
    if isinstance(value, str):
        return value.strip().lower() in ("true", "t", "yes", "y", "1")
    return bool(value)


def activate_from_process() -> None:
    """Called when `trl` is first imported. User errors end the script with a message and status 2."""
    if getattr(sys, "_qlora_plugin_own_cli", False):
        return  # `qlora-plugin ...` has flags of its own
    try:
        request, argv = request_from_process(sys.argv[1:], os.environ)
        if request is None:
            return
        # Before the strategy and its libraries load (3 s here), so a re-execution repeats as little as possible.
        malloc_tunables.apply_at_activation(malloc_tunables.wanted(request.options), _use_cpu(argv))
        validate(request)
    except QLoRAPluginError as err:
        report_and_exit(err)
    except SystemExit:
        raise
    sys.argv[1:] = argv
    publish(request)
    install_excepthook()
    activate(request)
