"""The plugin manager factory: default plugins, installed entry points, packaged hooks and hook files the user names.

Each call builds a fresh manager (no module-level global), so tests and embedders get isolated registries. The
built-in strategies and every built-in feature are plugins registered exactly like third-party ones, from
`DEFAULT_PLUGINS` (module names, imported here by name as simonw/llm does), so each can be overridden or wrapped.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
from pathlib import Path

import pluggy

from qlora_plugin.core.errors import QLoRAPluginError
from qlora_plugin.core.options import PluginOption, check_plugin_option
from qlora_plugin.plugin import specs
from qlora_plugin.core.strategy import Strategy, resolve_name, unknown_strategy_error

ENTRY_POINT_GROUP = "qlora_plugin"
HOOKS_ENV = "QLORA_PLUGIN_HOOKS"
LOAD_ENV = "QLORA_PLUGIN_LOAD"  # comma-separated entry-point names to load; empty string: none
PACKAGED_HOOKS = "qlora_plugin.hooks"  # ready hooks shipped in the wheel, named without `.py`: `--qlora_hooks qdora`

# The built-in plugins that only register strategies and options, importing no machine-learning library: all a
# listing needs (`qlora-plugin strategies`, `options`: `get_plugin_manager(catalog_only=True)`).
CATALOG_PLUGINS = (
    "qlora_plugin.strategies.presets",  # the qlora, lora-int8 and lora strategies
    "qlora_plugin.cpu.options",  # the CPU paths' options
)
# In registration order, after the catalog; pluggy calls later registrations first, and the built-in answers are
# `trylast`.
DEFAULT_PLUGINS = (
    "qlora_plugin.strategies.builtin",  # the qlora and lora strategies: loading kwargs, LoRA, paged AdamW, recipe
    "qlora_plugin.quant.cache",  # quantize a local base once, load the packed 4-bit copy on later runs
    "qlora_plugin.quant.cpu_guard",  # keep bitsandbytes' CPU repacking away from training
    "qlora_plugin.quant.record",  # qlora_plugin_quantization.json beside every adapter (what merge rebuilds)
    "qlora_plugin.cpu.dequant_reuse",
    "qlora_plugin.cpu.dequant_buffer",
    "qlora_plugin.cpu.cpu_dropout",
    "qlora_plugin.cpu.host_memory",
    "qlora_plugin.cpu.malloc_tunables",
    "qlora_plugin.training.report",  # the summary and qlora_plugin_report.json
    "qlora_plugin.training.finite_guard",  # stop at the first logged step whose loss or gradient norm is NaN/inf
)


def get_plugin_manager(hook_files=(), load_entrypoints: bool = True, catalog_only: bool = False
                       ) -> pluggy.PluginManager:
    """Build a manager: `CATALOG_PLUGINS`, `DEFAULT_PLUGINS` (not with `catalog_only`: a listing's manager, which
    answers the registration hooks only), then installed entry points, then `hook_files` (paths to .py files, or
    names of packaged hooks) in order."""
    pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(specs)
    for name in CATALOG_PLUGINS + (() if catalog_only else DEFAULT_PLUGINS):
        pm.register(importlib.import_module(name), name=name)
    if load_entrypoints:
        _load_entrypoints(pm)
    for hook in hook_files:
        module, name = _hook_module(hook)
        if pm.has_plugin(name):
            continue  # the same hook named twice (e.g. on the command line and in QLORA_PLUGIN_HOOKS)
        _check_undecorated_hooks(module, hook)
        try:
            pm.register(module, name=name)
        except pluggy.PluginValidationError as err:
            raise QLoRAPluginError(f"Hook file {hook!r}: {err}. {_hooks_help()}") from None
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as err:
        raise QLoRAPluginError(f"{err}. {_hooks_help()}") from None
    return pm


def loaded_plugins(pm: pluggy.PluginManager) -> dict[str, list[str]]:
    """What a manager loaded beyond `DEFAULT_PLUGINS`: hook files (resolved paths), packaged hooks and installed
    plugins (entry-point names), in registration order (for the run's summary and report)."""
    names = [name for name, _ in pm.list_name_plugin() if name not in CATALOG_PLUGINS + DEFAULT_PLUGINS]
    packaged = f"{PACKAGED_HOOKS}."
    return {"hook_files": [n.split(":", 1)[1] for n in names if n.startswith("hook-file:")],
            "packaged_hooks": [n[len(packaged):] for n in names if n.startswith(packaged)],
            "installed": [n for n in names if not n.startswith(("hook-file:", packaged))]}


def packaged_hooks() -> dict[str, str]:
    """{name: first docstring line} of the ready hooks installed with the package (`qlora_plugin/hooks/`), read from
    their source: listing them imports none (a hook may load the training stack)."""
    folder = Path(importlib.util.find_spec(PACKAGED_HOOKS).origin).parent
    found = {}
    for file in sorted(folder.glob("*.py")):
        if file.stem != "__init__":
            doc = ast.get_docstring(ast.parse(file.read_text(encoding="utf-8"))) or ""
            found[file.stem] = doc.splitlines()[0] if doc else ""
    return found


def _hook_module(hook: str):
    """(module, plugin name) for a packaged hook's name (`qdora`) or a hook file's path (`hooks/mine.py`)."""
    if hook.isidentifier():
        available = packaged_hooks()
        if hook not in available:
            raise QLoRAPluginError(
                f"No packaged hook named {hook!r}. Packaged hooks: {', '.join(available) or 'none'}; or pass the "
                "path of your own .py hook file."
            )
        name = f"{PACKAGED_HOOKS}.{hook}"
        return importlib.import_module(name), name
    return load_hook_file(hook), f"hook-file:{Path(hook).expanduser().resolve()}"


def _hooks_help() -> str:
    names = [f"{name}({', '.join(inspect.signature(fn).parameters)})"
             for name, fn in inspect.getmembers(specs, inspect.isfunction) if name.startswith("qlora_")]
    return f"The hooks are: {'; '.join(names)} (an implementation may take fewer arguments). See docs/hooks.md."


def _check_undecorated_hooks(module, path) -> None:
    """A function named like a hook but without `@hookimpl` would never run: say so instead of ignoring it."""
    marker = f"{ENTRY_POINT_GROUP}_impl"
    forgotten = sorted(name for name in vars(specs) if name.startswith("qlora_")
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
    """`QLORA_PLUGIN_HOOKS=path.py[:name]` (os.pathsep-separated hook files or packaged hook names)."""
    value = os.environ.get(HOOKS_ENV, "")
    return [p for p in value.split(os.pathsep) if p.strip()]


def load_hook_file(path: str):
    """Import a hook module from a file the user named. Only such files and entry points are ever executed."""
    file = Path(path).expanduser()
    if file.suffix != ".py":
        raise QLoRAPluginError(
            f"Hook file {path!r} must be a Python file ending in .py (or the name of a packaged hook: "
            f"{', '.join(packaged_hooks())})."
        )
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
    """Every strategy registered through the `qlora_register_strategies` hook, by name. Two with one name (its
    case and `-`/`_` aside) is an error.

    Each plugin's implementation is called through pluggy (`per_plugin`) with a `register` bound to that plugin,
    so a strategy names the plugin that registered it."""
    found: dict[str, Strategy] = {}

    def register_for(plugin: str):
        def register(strategy: Strategy) -> None:
            if not isinstance(strategy, Strategy):
                raise QLoRAPluginError(f"Plugin {plugin} registered {strategy!r}, not a Strategy.")
            same = resolve_name(strategy.name, found)  # names match regardless of case and `-`/`_`
            if same in found:
                raise QLoRAPluginError(
                    f"Strategy {strategy.name!r} is registered twice ({found[same].plugin} and {plugin}"
                    f"{'' if same == strategy.name else f', as {same!r}'}). Uninstall or rename one."
                )
            found[strategy.name] = dataclasses.replace(strategy, plugin=plugin)

        return register

    for plugin, call in per_plugin(pm, "qlora_register_strategies"):
        call(register=register_for(plugin))
    return found


def collect_options(pm: pluggy.PluginManager) -> tuple[PluginOption, ...]:
    """The options plugins add through `qlora_register_options`, each checked (`options.check_plugin_option`) and
    naming the plugin that registered it, in the order pluggy calls the plugins."""
    found: dict[str, PluginOption] = {}

    def register_for(plugin: str):
        def register(name, type, default, help, choices=()):  # noqa: A002 - the hook's documented parameter names
            option = PluginOption(name, type, default, help, tuple(choices), plugin)
            check_plugin_option(option, {n: o.plugin for n, o in found.items()})
            found[name] = option

        return register

    for plugin, call in per_plugin(pm, "qlora_register_options"):
        call(register=register_for(plugin))
    return tuple(found.values())


def per_plugin(pm: pluggy.PluginManager, hook: str):
    """(plugin name, a caller of that plugin's implementation alone) for each implementation of `hook`, in the order
    pluggy calls them (later registrations first, `tryfirst`/`trylast` honoured), each through pluggy
    (`subset_hook_caller`: its argument handling and tracing): for registration hooks whose callback must know
    which plugin calls it."""
    impls = [impl for impl in getattr(pm.hook, hook).get_hookimpls() if not (impl.wrapper or impl.hookwrapper)]
    for impl in reversed(impls):
        others = [i.plugin for i in impls if i is not impl]
        yield impl.plugin_name, pm.subset_hook_caller(hook, remove_plugins=others)


def get_strategy(pm: pluggy.PluginManager, name: str) -> Strategy:
    """The strategy registered as `name` (its case and `-`/`_` aside: `resolve_name`); unknown: an error naming
    the close ones."""
    strategies = collect_strategies(pm)
    name = resolve_name(name, strategies)
    if name not in strategies:
        raise unknown_strategy_error(name, strategies)
    return strategies[name]
