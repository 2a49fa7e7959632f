"""The strategy request this process runs under, and its copy in the environment for the processes it launches.

Kept apart from `activation` so the TRL patches can ask "is a strategy active?" without importing activation.
"""

from __future__ import annotations

import json
import os

from qlora_plugin.plugin.manager import HOOKS_ENV
from qlora_plugin.core.request import StrategyRequest

STRATEGY_ENV = "QLORA_PLUGIN_STRATEGY"
OPTIONS_ENV = "QLORA_PLUGIN_OPTIONS"  # JSON, set for child processes
EXPLICIT_ENV = "QLORA_PLUGIN_EXPLICIT_ARGS"  # JSON list, set for child processes
SOURCE_ENV = "QLORA_PLUGIN_SOURCE"  # where the parent process found the strategy

_active: StrategyRequest | None = None
_model_claimed = False  # the training model's from_pretrained has been taken over once (integration.model_loading)


def active_request() -> StrategyRequest | None:
    """The request this process runs under, or None (TRL untouched)."""
    return _active


def set_active(request: StrategyRequest | None) -> None:
    """Make `request` this process's strategy (None: TRL's patched methods pass straight through)."""
    global _active, _model_claimed
    _active, _model_claimed = request, False


def claim_model() -> bool:
    """True the first time it is called under the active request: only one model is the one being trained."""
    global _model_claimed
    first, _model_claimed = not _model_claimed, True
    return first


def publish(request: StrategyRequest) -> None:
    """Write the request to the environment so processes this one launches run under it too."""
    os.environ[STRATEGY_ENV] = request.strategy
    os.environ[OPTIONS_ENV] = json.dumps(request.options)
    os.environ[EXPLICIT_ENV] = json.dumps(sorted(request.explicit_training_args))
    os.environ[SOURCE_ENV] = request.source
    if request.hook_files:
        os.environ[HOOKS_ENV] = os.pathsep.join(request.hook_files)
