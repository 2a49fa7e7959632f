"""The places TRL is patched, only while a strategy is active (see `activation`).

- The `__init__` of each trainer in `trainer_kinds.KINDS` (SFT, DPO, KTO, reward, GRPO, RLOO): its arguments go
  through `training.pipeline.prepare_trainer_kwargs` first, and `training.trainer_setup.finish_trainer` after.
- `_BaseTrainer.__new__`: any other TRL trainer is refused before it is built (a strategy is never half-applied).
- `TrlParser.set_defaults_with_config`: the plugin's YAML keys are taken out, so TRL neither drops them silently
  nor hands them to `accelerate launch` as unknown flags; a misspelled plugin key (`lora_rank`) is an error.
All pass straight through when no strategy is active.
"""

from __future__ import annotations

import functools
import inspect

from qlora_plugin.ecosystem.compat import TRL_BASE_TRAINER
from qlora_plugin.core.errors import QLoRAPluginError, report_and_exit
from qlora_plugin.integration import state
from qlora_plugin.integration.known_errors import check_unused_yaml_keys
from qlora_plugin.core.options import OWN_KEYS
from qlora_plugin.core.trainer_kinds import KINDS, SUPPORTED, TrainerKind, kind_of_class

NOT_TRAINING = ("env", "vllm-serve", "vllm_serve")  # TRL commands and scripts that build no trainer


def patch_trainer(kind: TrainerKind):
    """The post-import patch for one supported trainer's module: its `__init__` applies the strategy whole."""
    def patch(module) -> None:
        _patch_init(getattr(module, kind.class_name), kind)
    return patch


def _patch_init(cls, kind: TrainerKind) -> None:
    original = cls.__init__
    if getattr(original, "_qlora_plugin", False):
        return
    signature = inspect.signature(original)

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        # Imported at the first trainer, not when `import trl` activates the plugin: it loads the training stack.
        from qlora_plugin.training.pipeline import prepare_trainer_kwargs
        from qlora_plugin.training.trainer_setup import finish_trainer, split_unaccepted

        request = state.active_request()
        bound = signature.bind(self, *args, **kwargs)
        arguments = dict(bound.arguments)
        arguments.pop("self")
        if request is None or _already_applied(arguments):
            return original(self, *args, **kwargs)
        prepared, after_init = split_unaccepted(prepare_trainer_kwargs(request, arguments, trainer_kind=kind.name),
                                                signature)
        original(self, **prepared)
        finish_trainer(self, kind, after_init)

    __init__._qlora_plugin = True
    cls.__init__ = __init__


def patch_base_trainer(module) -> None:
    """Refuse, while a strategy is active, every TRL trainer it is not applied to in full: in `__new__`, before the
    trainer's `__init__` can load or read a weight."""
    cls = getattr(module, TRL_BASE_TRAINER)
    if getattr(cls.__new__, "_qlora_plugin", False):
        return

    def __new__(klass, *args, **kwargs):
        if state.active_request() is not None and kind_of_class(klass) is None:
            # a script run with --strategy: one line and status 2, as for every other refusal at start
            report_and_exit(QLoRAPluginError(unsupported_trainer_message(klass.__name__,
                                                                         state.active_request().strategy)))
        return object.__new__(klass)

    __new__._qlora_plugin = True
    cls.__new__ = __new__


def unsupported_trainer_message(name: str, strategy: str) -> str:
    return (f"Strategy {strategy!r} is not applied to {name}: the plugin applies it whole (4-bit loading, LoRA, paged "
            f"AdamW, recipe, summary, report) only to {SUPPORTED}, and never half. Use one of those, or drop "
            "`--strategy` to run this trainer as TRL does.")


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
        remaining = original(self, **{k: v for k, v in kwargs.items()
                                      if k not in OWN_KEYS and k not in request.options})  # plugins' options too
        check_unused_yaml_keys(remaining[::2])  # `lora_rank: 8` would otherwise be dropped silently
        state.publish(request)  # TRL has just applied the YAML's `env:` block; child processes get the request
        return remaining

    set_defaults_with_config._qlora_plugin = True
    cls.set_defaults_with_config = set_defaults_with_config


def command_kind(argv: list[str]) -> str | None:
    """The TRL command a process runs: `trl NAME ...` (the CLI), or TRL's own `trl/scripts/NAME.py` (what the CLI
    launches through `accelerate launch`, or `python -m trl.scripts.NAME`); None for any other program."""
    import os

    program = os.path.normpath(argv[0]) if argv else ""
    if os.path.basename(program) in ("trl", "trl.exe") and len(argv) > 1 and not argv[1].startswith("-"):
        return argv[1]
    parent, name = os.path.split(program)
    if name.endswith(".py") and parent.endswith(os.path.join("trl", "scripts")):
        return name[:-3]
    return None


def check_trl_command(argv: list[str], strategy: str) -> None:
    """`trl distillation --strategy qlora` (any TRL training command without a trainer in `KINDS`) is refused at
    activation, before the script parses its arguments or reads a weight."""
    name = command_kind(argv)
    if name is None or name in KINDS or name in NOT_TRAINING or name.startswith("_") or name == "utils":
        return
    raise QLoRAPluginError(
        f"Strategy {strategy!r} is not applied to `trl {name}`: the plugin applies it whole only to "
        f"{', '.join(f'trl {k}' for k in KINDS)}, and never half. Use one of those, or drop `--strategy` to run "
        f"`trl {name}` as TRL does."
    )
