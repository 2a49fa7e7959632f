"""One request, resolved once: its plugin manager, its strategy and its options, built the first time a step of the
run asks (activation's check, the trainer's pipeline, a script's own `from_pretrained`) and reused by the others.

Why: each step used to build its own manager (importing and registering every plugin, reading entry points and hook
files) and its own options, three times per run. The resolution is kept on the request itself
(`StrategyRequest.resolved`), so it lives exactly as long as the request and a new request starts afresh; `forget`
drops it explicitly (when a process deactivates its strategy).
"""

from __future__ import annotations

from dataclasses import dataclass

from qlora_plugin.core.options import PluginOption, StrategyOptions, build_options
from qlora_plugin.plugin.manager import collect_options, get_plugin_manager, get_strategy
from qlora_plugin.core.request import StrategyRequest
from qlora_plugin.core.strategy import Strategy


@dataclass(frozen=True)
class Resolved:
    """What a request resolves to: its manager, its strategy, its options (dataclass defaults < the strategy's
    < the user's explicit values), and the options its plugins added (`qlora_register_options`)."""

    pm: object
    strategy: Strategy
    options: StrategyOptions
    plugin_options: tuple[PluginOption, ...] = ()


def manager(request: StrategyRequest, pm=None):
    """The request's plugin manager: `pm` when given, else the one built for it (once, with its hook files)."""
    if pm is not None and pm is not request.manager:
        request.manager, request.resolved = pm, None
    if request.manager is None:
        request.manager = get_plugin_manager(request.hook_files)
    return request.manager


def resolve(request: StrategyRequest, pm=None) -> Resolved:
    """The request's resolution: built once (with `pm` when given, else a manager with the request's hook files),
    then the same object for every later call with no other manager."""
    pm = manager(request, pm)
    if request.resolved is None:
        strategy = get_strategy(pm, request.strategy)
        extra = collect_options(pm)
        request.resolved = Resolved(pm, strategy, build_options(dict(strategy.option_defaults), request.options, extra),
                                    extra)
    return request.resolved


def forget(request: StrategyRequest | None) -> None:
    """Drop a request's resolution (the next `resolve` builds a manager again)."""
    if request is not None:
        request.manager = request.resolved = None
