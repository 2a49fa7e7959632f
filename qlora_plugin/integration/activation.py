"""Script activation: turn `--strategy NAME` (CLI), `strategy: NAME` (YAML) or `QLORA_PLUGIN_STRATEGY` into a
`StrategyRequest`, take the plugin's own flags out of `sys.argv` so the script's parser never sees them, and patch
TRL so its trainers apply the strategy (`trainer_kinds`) and refuse it where it cannot apply whole. Runs once, when
a process first imports `trl`.

Precedence: command line > YAML `--config` > environment. The request is also written to the environment so
child processes (`trl sft` re-launches through `accelerate launch`) inherit it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from qlora_plugin.ecosystem.compat import TRL_VENDORED_PARSER_MODULE, check_at_activation
from qlora_plugin.core.errors import QLoRAPluginError, report_and_exit
from qlora_plugin.core.flags import given_flag_names, parse_bool, parse_own_flags
from qlora_plugin.integration import import_hook, model_loading, near_miss, script_args, state, trl_patches
from qlora_plugin.ecosystem.hub_code import refuse_hub_kernels
from qlora_plugin.integration.import_hook import DISABLE_ENV
from qlora_plugin.integration.excepthook import install_excepthook
from qlora_plugin.integration.state import EXPLICIT_ENV, OPTIONS_ENV, SOURCE_ENV, STRATEGY_ENV
from qlora_plugin.integration.yaml_config import read as read_yaml_config
from qlora_plugin.ecosystem.notices import leave_out_for_a_strategy_run
from qlora_plugin.core.options import HOOKS_KEY, OPTION_NAMES, OWN_KEYS
from qlora_plugin.cpu import malloc_tunables
from qlora_plugin.plugin.manager import HOOKS_ENV, LOAD_ENV, hook_files_from_env
from qlora_plugin.plugin.manager import collect_options
from qlora_plugin.plugin.resolution import forget, manager, resolve
from qlora_plugin.quant.backends import backend_named, check_asked_quantization, check_options_apply
from qlora_plugin.quant.cache import CACHE_DIR_ENV
from qlora_plugin.core.request import StrategyRequest
from qlora_plugin.core.trainer_kinds import KINDS

USER_ENV = (STRATEGY_ENV, OPTIONS_ENV, HOOKS_ENV, LOAD_ENV, DISABLE_ENV, CACHE_DIR_ENV)  # the variables users set
INTERNAL_ENV = (EXPLICIT_ENV, SOURCE_ENV, malloc_tunables.REEXEC_MARK_ENV)  # set by the plugin for child processes



def request_from_process(argv: list[str], environ) -> tuple[StrategyRequest | None, list[str]]:
    """Work out the request from a command line, its YAML config and the environment. Returns (request, new argv).

    Without a strategy anywhere, returns (None, argv unchanged).
    """
    config, config_problem = read_yaml_config(argv)
    config_env = config.get("env") or {}
    check_spelling(argv, config, config_env, environ)
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
    hook_files = tuple(dict.fromkeys([*hooks, *hook_files_from_env()]))

    explicit = set(_json_from_env(environ, EXPLICIT_ENV, list, "a JSON list of argument names (set by the plugin)"))
    explicit |= given_flag_names(rest) | {k for k in config if k not in OWN_KEYS and k != "env"}
    model = _flag_value(rest, "model_name_or_path") or config.get("model_name_or_path")
    return StrategyRequest(strategy, options, frozenset(explicit), hook_files, source,
                           model if isinstance(model, str) else None), rest


def _flag_value(argv: list[str], name: str) -> str | None:
    """The value of `--name VALUE` or `--name=VALUE` on a command line (the last one wins, as argparse does)."""
    value = None
    for i, token in enumerate(argv):
        if token in (f"--{name}", f"--{name.replace('_', '-')}") and i + 1 < len(argv):
            value = argv[i + 1]
        elif token.startswith((f"--{name}=", f"--{name.replace('_', '-')}=")):
            value = token.split("=", 1)[1]
    return value


def check_spelling(argv: list[str], config: dict, config_env: dict, environ) -> None:
    """Near misses of the plugin's own flags, YAML keys and variables are errors, strategy or not (`near_miss`)."""
    near_miss.check([
        *near_miss.command_line_problems(argv),
        *near_miss.key_problems(config, near_miss.OWN_FLAGS, "in the YAML config"),
        *near_miss.key_problems(config_env, USER_ENV, "in the YAML `env:` block", upper=True, known=INTERNAL_ENV),
        *near_miss.key_problems(environ, USER_ENV, "in the environment", upper=True, known=INTERNAL_ENV),
    ])


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
        check_asked_quantization(None, flag="load_in_8bit")


def take_plugin_options(request: StrategyRequest, argv: list[str]) -> list[str]:
    """The options plugins add (`qlora_register_options`), from the command line and the YAML config, into the
    request; returns argv without their flags. Runs after the built-in options are read (and after an opted-in
    re-execution, `cpu_malloc_tunables`): it loads the plugins, through the request's one manager."""
    extra = collect_options(manager(request))
    if not extra:
        return argv
    names = {option.name for option in extra}
    config = read_yaml_config(argv)[0]
    flags, rest = parse_own_flags(argv, extra)
    request.options.update({k: v for k, v in config.items() if k in names})
    request.options.update({k: v for k, v in flags.items() if k in names})
    return rest


def validate(request: StrategyRequest) -> None:
    """Fail early, before the script does any work: the strategy exists, options and hook files are valid. The
    manager and options built here are the run's (`resolve`: once per request)."""
    resolved = resolve(request)
    strategy = resolved.strategy
    check_options_apply(resolved.options, request.options, strategy.name)  # also: a backend the strategy cannot take
    if not strategy.option_defaults.get("load_in_4bit", True) and request.options.get("load_in_4bit") is True:
        own = backend_named(strategy.option_defaults.get("quant_backend"))
        raise QLoRAPluginError(
            f"`--load_in_4bit` contradicts `--strategy {strategy.name}` ({own.label if own else '16-bit'}). "
            "Use `--strategy qlora` for a 4-bit base."
        )


def activate(request: StrategyRequest) -> None:
    """Make `request` this process's strategy and patch TRL (now, or when its modules are imported)."""
    state.set_active(request)
    watcher = import_hook.watcher()
    for kind in KINDS.values():
        watcher.watch(kind.module, trl_patches.patch_trainer(kind))
    watcher.watch("trl.trainer.base_trainer", trl_patches.patch_base_trainer)
    watcher.watch("trl.scripts.utils", trl_patches.patch_trl_parser)
    watcher.watch("transformers.hf_argparser", script_args.patch_argument_parser)
    watcher.watch(TRL_VENDORED_PARSER_MODULE, script_args.patch_argument_parser)  # TrlParser's own copy
    watcher.watch("transformers.modeling_utils", model_loading.patch_from_pretrained)
    watcher.watch("transformers.models.auto.modeling_auto", model_loading.patch_auto_models)


def deactivate() -> None:
    """Forget the active request and its resolution (patched TRL methods then pass straight through)."""
    forget(state.active_request())
    state.set_active(None)


def _use_cpu(argv: list[str]) -> bool:
    """`--use_cpu` given and true, on the command line or in the YAML `--config` (TRL's own flag)."""
    value = read_yaml_config(argv)[0].get("use_cpu", False)
    for i, arg in enumerate(argv):
        if arg in ("--use_cpu", "--use-cpu"):
            following = argv[i + 1] if i + 1 < len(argv) else ""
            value = following if following and not following.startswith("-") else True
        elif arg.startswith(("--use_cpu=", "--use-cpu=")):
            value = arg.split("=", 1)[1]
    try:
        return parse_bool(value)
    except argparse.ArgumentTypeError:
        return False  # not a boolean: TRL's parser says so when the script parses it


def activate_from_process() -> None:
    """Called when `trl` is first imported. User errors end the script with a message and status 2."""
    if getattr(sys, "_qlora_plugin_own_cli", False):
        return  # `qlora-plugin ...` has flags of its own
    try:
        request, argv = request_from_process(sys.argv[1:], os.environ)
        if request is None:
            return
        # Before the strategy and its libraries load, so an opted-in re-execution repeats as little as possible.
        malloc_tunables.apply_at_activation(malloc_tunables.wanted(request.options), _use_cpu(argv))
        leave_out_for_a_strategy_run("gradient_checkpointing" in request.explicit_training_args)  # before imports
        refuse_hub_kernels()
        check_at_activation()  # supported releases, before any patch (compat)
        argv = take_plugin_options(request, argv)
        validate(request)
        trl_patches.check_trl_command(sys.argv, request.strategy)
    except QLoRAPluginError as err:
        report_and_exit(err)
    except SystemExit:
        raise
    sys.argv[1:] = argv
    state.publish(request)
    install_excepthook()
    activate(request)
