"""One request, resolved once: its plugin manager, its strategy and its options, built the first time a step of the
run asks (activation's check, the trainer's pipeline, a script's own `from_pretrained`) and reused by the others.

Why: each step used to build its own manager (importing and registering every plugin, reading entry points and hook
files) and its own options, three times per run. The resolution is kept on the request itself
(`StrategyRequest.resolved`), so it lives exactly as long as the request and a new request starts afresh; `forget`
drops it explicitly (when a process deactivates its strategy).
"""

from __future__ import annotations

from dataclasses import dataclass

from qlora_plugin.options import StrategyOptions, build_options
from qlora_plugin.plugin.manager import get_plugin_manager, get_strategy
from qlora_plugin.request import StrategyRequest
from qlora_plugin.strategy import Strategy


@dataclass(frozen=True)
class Resolved:
    """What a request resolves to: its manager, its strategy, and its options (dataclass defaults < the strategy's
    < the user's explicit values)."""

    pm: object
    strategy: Strategy
    options: StrategyOptions


def resolve(request: StrategyRequest, pm=None) -> Resolved:
    """The request's resolution: built once (with `pm` when given, else a manager with the request's hook files),
    then the same object for every later call with no other manager."""
    cached = request.resolved
    if cached is not None and (pm is None or pm is cached.pm):
        return cached
    pm = pm or get_plugin_manager(request.hook_files)
    strategy = get_strategy(pm, request.strategy)
    request.resolved = Resolved(pm, strategy, build_options(dict(strategy.option_defaults), request.options))
    return request.resolved


def forget(request: StrategyRequest | None) -> None:
    """Drop a request's resolution (the next `resolve` builds a manager again)."""
    if request is not None:
        request.resolved = None
