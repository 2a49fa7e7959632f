"""The Python API, for projects that wire TRL's trainers themselves.

    from qlora_plugin import make_trainer
    trainer = make_trainer("qlora", model="path/or/hub-id", args=SFTConfig(...), train_dataset=ds)
    trainer = make_trainer("qlora", trainer=DPOTrainer, model=..., args=DPOConfig(...), train_dataset=pairs)
    trainer.train()

`trainer` is any class of `trainer_kinds.KINDS` (SFT, DPO, KTO, reward, GRPO, RLOO, or your subclass of one); the
default is `SFTTrainer`. To keep constructing an SFT trainer yourself: `SFTTrainer(**apply_strategy(kwargs,
"qlora"))`. The other trainers need the strategy finished after their `__init__` (TRL's reference adapter, the
optimizer they take no argument for: `training.trainer_setup.finish_trainer`), so they are built by `make_trainer`.
"""

from __future__ import annotations

from qlora_plugin.ecosystem.compat import check_at_activation
from qlora_plugin.core.errors import QLoRAPluginError
from qlora_plugin.ecosystem.hub_code import refuse_hub_kernels
from qlora_plugin.core.request import StrategyRequest
from qlora_plugin.integration.trl_patches import unsupported_trainer_message
from qlora_plugin.core.trainer_kinds import KINDS, TrainerKind, kind_of_class
from qlora_plugin.training.checkpointing import patch_trainer_class
from qlora_plugin.training.pipeline import prepare_trainer_kwargs


def _hook_file_list(hook_files) -> tuple:
    """A path or a list of paths (a bare string is one file, not a sequence of characters)."""
    files = (hook_files,) if isinstance(hook_files, str) else hook_files
    if not isinstance(files, (list, tuple)) or not all(isinstance(f, str) for f in files):
        raise QLoRAPluginError(f"`hook_files` must be a list of .py file paths; got {hook_files!r}.")
    return tuple(files)


def _trainer_kind(trainer, strategy: str) -> TrainerKind:
    """The kind of the trainer class asked for (default SFT); any other is refused as the CLI refuses it."""
    if trainer is None:
        return KINDS["sft"]
    if not isinstance(trainer, type):
        raise QLoRAPluginError(f"`trainer` must be a TRL trainer class such as trl.DPOTrainer; got {trainer!r}.")
    kind = kind_of_class(trainer)
    if kind is None:
        raise QLoRAPluginError(unsupported_trainer_message(trainer.__name__, strategy))
    return kind


def apply_strategy(trainer_kwargs: dict, strategy: str = "qlora", options: dict | None = None,
                   hook_files=(), plugin_manager=None, trainer=None) -> dict:
    """Return `SFTTrainer` keyword arguments with `strategy` applied (model loaded in 4-bit, LoRA added,
    recipe defaults for the `SFTConfig` fields you left at their defaults, paged AdamW).

    `options` are strategy options by name (see `qlora-plugin strategies`); `hook_files` are hook modules to load.
    Raises `QLoRAPluginError` (a `ValueError`) for bad input. The trainer you build from these is not the plugin's
    to reach, so resume and atomic saves come from wrappers on `transformers.Trainer` that pass straight through
    for trainers without a strategy; `make_trainer` wraps its one trainer instead. `trainer` other than
    SFTTrainer: use `make_trainer`.
    """
    kind = _trainer_kind(trainer, strategy if isinstance(strategy, str) else "?")
    if kind.name != "sft":
        raise QLoRAPluginError(
            f"apply_strategy returns SFTTrainer arguments only: under {kind.class_name} the strategy is finished after "
            f"the trainer's __init__ (its reference adapter, its optimizer). Use make_trainer({strategy!r}, "
            f"trainer={kind.class_name}, ...) instead.")
    kwargs = _prepare(trainer_kwargs, strategy, options, hook_files, plugin_manager, kind)
    patch_trainer_class()
    return kwargs


def _prepare(trainer_kwargs, strategy, options, hook_files, plugin_manager, kind: TrainerKind) -> dict:
    if not isinstance(strategy, str):
        raise QLoRAPluginError(f"`strategy` must be a strategy name such as 'qlora'; got {strategy!r}.")
    if not isinstance(options or {}, dict):
        raise QLoRAPluginError(f"`options` must be a dict of strategy options, e.g. {{'lora_r': 16}}; got {options!r}.")
    if not isinstance(trainer_kwargs, dict):
        raise QLoRAPluginError(f"`trainer_kwargs` must be a dict of {kind.class_name} arguments; "
                               f"got {trainer_kwargs!r}.")
    refuse_hub_kernels()
    check_at_activation()  # supported releases (compat)
    request = StrategyRequest(strategy, dict(options or {}), frozenset(), _hook_file_list(hook_files), "api")
    return prepare_trainer_kwargs(request, trainer_kwargs, pm=plugin_manager, trainer_kind=kind.name)


def make_trainer(strategy: str = "qlora", options: dict | None = None, hook_files=(), plugin_manager=None,
                 trainer=None, **trainer_kwargs):
    """Build a TRL trainer (`trainer`, a class; default `SFTTrainer`) with `strategy` applied whole; keyword
    arguments are the trainer's own. Any trainer the strategy is not applied to is refused, before a weight is read."""
    import inspect

    from qlora_plugin.training.trainer_setup import finish_trainer, split_unaccepted

    kind = _trainer_kind(trainer, strategy if isinstance(strategy, str) else "?")
    if trainer is None:
        from trl import SFTTrainer as trainer
    prepared = _prepare(trainer_kwargs, strategy, options, hook_files, plugin_manager, kind)
    prepared, after_init = split_unaccepted(prepared, inspect.signature(trainer.__init__))
    built = trainer(**prepared)
    finish_trainer(built, kind, after_init)  # resume and atomic saves on this trainer only, and the reference
    return built
