"""The plugin manager factory: built-in strategies, installed entry points, and hook files the user names.

Each call builds a fresh manager (no module-level global), so tests and embedders get isolated registries.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import os
import sys
from pathlib import Path

import pluggy

from . import hookspecs
from .errors import QLoRAPluginError
from .strategy import Strategy, unknown_strategy_error

ENTRY_POINT_GROUP = "qlora_plugin"
HOOKS_ENV = "QLORA_PLUGIN_HOOKS"
LOAD_ENV = "QLORA_PLUGIN_LOAD"  # comma-separated entry-point names to load; empty string: none


def get_plugin_manager(hook_files=(), load_entrypoints: bool = True) -> pluggy.PluginManager:
    """Build a manager: the built-in plugin, then installed entry points, then `hook_files` in order."""
    from . import builtin, cpu_dropout, dequant_buffer, dequant_reuse

    pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(hookspecs)
    pm.register(builtin, name="qlora_plugin.builtin")
    pm.register(dequant_reuse, name="qlora_plugin.dequant_reuse")
    pm.register(dequant_buffer, name="qlora_plugin.dequant_buffer")
    pm.register(cpu_dropout, name="qlora_plugin.cpu_dropout")
    if load_entrypoints:
        _load_entrypoints(pm)
    for path in hook_files:
        name = f"hook-file:{Path(path).expanduser().resolve()}"
        if pm.has_plugin(name):
            continue  # the same file named twice (e.g. on the command line and in QLORA_PLUGIN_HOOKS)
        module = load_hook_file(path)
        _check_undecorated_hooks(module, path)
        try:
            pm.register(module, name=name)
        except pluggy.PluginValidationError as err:
            raise QLoRAPluginError(f"Hook file {path!r}: {err}. {_hooks_help()}") from None
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as err:
        raise QLoRAPluginError(f"{err}. {_hooks_help()}") from None
    return pm


def _hooks_help() -> str:
    import inspect

    specs = [f"{name}({', '.join(inspect.signature(fn).parameters)})"
             for name, fn in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("qlora_")]
    return f"The hooks are: {'; '.join(specs)} (an implementation may take fewer arguments). See docs/hooks.md."


def _check_undecorated_hooks(module, path) -> None:
    """A function named like a hook but without `@hookimpl` would never run: say so instead of ignoring it."""
    marker = f"{ENTRY_POINT_GROUP}_impl"
    forgotten = sorted(name for name in vars(hookspecs) if name.startswith("qlora_")
                       and callable(getattr(module, name, None)) and not hasattr(getattr(module, name), marker))
    if forgotten:
        raise QLoRAPluginError(
            f"Hook file {path!r} defines {', '.join(forgotten)} without `@hookimpl`, so it would never be called. "
            "Decorate it: `from qlora_plugin import hookimpl` then `@hookimpl` above the function."
        )


def _load_entrypoints(pm: pluggy.PluginManager) -> None:
    """Installed plugins (the `qlora_plugin` entry-point group), all or those named in QLORA_PLUGIN_LOAD."""
    from importlib.metadata import entry_points

    installed = sorted({ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})
    allowed = os.environ.get(LOAD_ENV)
    names = installed if allowed is None else sorted({n.strip() for n in allowed.split(",") if n.strip()})
    missing = [name for name in names if name not in installed]
    if missing:
        raise QLoRAPluginError(
            f"{LOAD_ENV} names {', '.join(missing)}, which no installed package provides (entry-point group "
            f"`{ENTRY_POINT_GROUP}`). Installed: {', '.join(installed) or 'none'}. Install the plugin's package, or "
            f"set {LOAD_ENV} to a comma-separated list of installed ones (empty: none)."
        )
    for name in names:
        try:
            pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP, name=name)
        except Exception as err:  # a broken third-party package: name it rather than show its traceback
            raise QLoRAPluginError(
                f"The installed plugin {name!r} failed to load ({type(err).__name__}: {err}). Upgrade or uninstall "
                f"it, or leave it out with {LOAD_ENV}=<comma-separated plugins to load>."
            ) from None


def hook_files_from_env() -> list[str]:
    """`QLORA_PLUGIN_HOOKS=path.py[:path2.py]` (os.pathsep-separated)."""
    value = os.environ.get(HOOKS_ENV, "")
    return [p for p in value.split(os.pathsep) if p.strip()]


def load_hook_file(path: str):
    """Import a hook module from a file the user named. Only such files and entry points are ever executed."""
    file = Path(path).expanduser()
    if file.suffix != ".py":
        raise QLoRAPluginError(f"Hook file {path!r} must be a Python file ending in .py.")
    if not file.is_file():
        raise QLoRAPluginError(
            f"Hook file {path!r} does not exist. Pass an existing .py file via --qlora_hooks, the YAML key "
            f"`qlora_hooks`, or {HOOKS_ENV}."
        )
    resolved = file.resolve()
    module_name = f"qlora_plugin_hook_{resolved.stem}_{hashlib.sha1(str(resolved).encode()).hexdigest()[:8]}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, resolved)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # the user's file: report, do not crash with their traceback
        raise QLoRAPluginError(
            f"Hook file {path!r} failed to import: {type(err).__name__}: {err}. Fix the file or remove it from "
            f"the hooks list."
        ) from None
    sys.modules[module_name] = module
    return module


def collect_strategies(pm: pluggy.PluginManager) -> dict[str, Strategy]:
    """Every strategy registered through `qlora_register_strategies`, by name. Two with one name is an error."""
    found: dict[str, Strategy] = {}

    for impl in pm.hook.qlora_register_strategies.get_hookimpls():

        def register(strategy: Strategy, _plugin=impl.plugin_name) -> None:
            if not isinstance(strategy, Strategy):
                raise QLoRAPluginError(f"Plugin {_plugin} registered {strategy!r}, not a Strategy.")
            if strategy.name in found:
                raise QLoRAPluginError(
                    f"Strategy {strategy.name!r} is registered twice ({found[strategy.name].plugin} and "
                    f"{_plugin}). Uninstall or rename one."
                )
            found[strategy.name] = dataclasses.replace(strategy, plugin=_plugin)

        impl.function(register=register)
    return found


def get_strategy(pm: pluggy.PluginManager, name: str) -> Strategy:
    strategies = collect_strategies(pm)
    if name not in strategies:
        raise unknown_strategy_error(name, list(strategies))
    return strategies[name]
