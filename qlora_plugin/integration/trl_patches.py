"""The two places TRL is patched, only while a strategy is active (see `activation`).

- `SFTTrainer.__init__`: its arguments go through `training.pipeline.prepare_trainer_kwargs` first.
- `TrlParser.set_defaults_with_config`: the plugin's YAML keys are taken out, so TRL neither drops them silently
  nor hands them to `accelerate launch` as unknown flags; a misspelled plugin key (`lora_rank`) is an error.
Both patches pass straight through when no strategy is active.
"""

from __future__ import annotations

import functools
import inspect

from qlora_plugin.integration import state
from qlora_plugin.integration.known_errors import check_unused_yaml_keys
from qlora_plugin.options import OWN_KEYS


def patch_sft_trainer(module) -> None:
    cls = module.SFTTrainer
    original = cls.__init__
    if getattr(original, "_qlora_plugin", False):
        return
    signature = inspect.signature(original)

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        # Imported at the first SFTTrainer, not when `import trl` activates the plugin: it loads the training stack.
        from qlora_plugin.training.pipeline import prepare_trainer_kwargs

        request = state.active_request()
        bound = signature.bind(self, *args, **kwargs)
        arguments = dict(bound.arguments)
        arguments.pop("self")
        if request is None or _already_applied(arguments):
            return original(self, *args, **kwargs)
        return original(self, **prepare_trainer_kwargs(request, arguments))

    __init__._qlora_plugin = True
    cls.__init__ = __init__


def _already_applied(arguments) -> bool:
    """True when the Python API already applied a strategy to these arguments."""
    from qlora_plugin.training.report import StrategyReportCallback  # with the training stack, as above

    return any(isinstance(cb, StrategyReportCallback) for cb in arguments.get("callbacks") or [])


def patch_trl_parser(module) -> None:
    cls = module.TrlParser
    original = cls.set_defaults_with_config
    if getattr(original, "_qlora_plugin", False):
        return

    @functools.wraps(original)
    def set_defaults_with_config(self, **kwargs):
        request = state.active_request()
        if request is None:
            return original(self, **kwargs)
        remaining = original(self, **{k: v for k, v in kwargs.items() if k not in OWN_KEYS})
        check_unused_yaml_keys(remaining[::2])  # `lora_rank: 8` would otherwise be dropped silently
        state.publish(request)  # TRL has just applied the YAML's `env:` block; child processes get the request
        return remaining

    set_defaults_with_config._qlora_plugin = True
    cls.set_defaults_with_config = set_defaults_with_config
