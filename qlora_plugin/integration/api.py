"""The Python API, for projects that wire `SFTTrainer` themselves.

    from qlora_plugin import make_trainer
    trainer = make_trainer("qlora", model="path/or/hub-id", args=SFTConfig(...), train_dataset=ds)
    trainer.train()

or, to keep constructing the trainer yourself: `SFTTrainer(**apply_strategy(kwargs, "qlora"))`.
"""

from __future__ import annotations

from qlora_plugin.compat import check_at_activation
from qlora_plugin.errors import QLoRAPluginError
from qlora_plugin.hub_code import refuse_hub_kernels
from qlora_plugin.request import StrategyRequest
from qlora_plugin.training.checkpointing import install, patch_trainer_class
from qlora_plugin.training.pipeline import prepare_trainer_kwargs


def _hook_file_list(hook_files) -> tuple:
    """A path or a list of paths (a bare string is one file, not a sequence of characters)."""
    files = (hook_files,) if isinstance(hook_files, str) else hook_files
    if not isinstance(files, (list, tuple)) or not all(isinstance(f, str) for f in files):
        raise QLoRAPluginError(f"`hook_files` must be a list of .py file paths; got {hook_files!r}.")
    return tuple(files)


def apply_strategy(trainer_kwargs: dict, strategy: str = "qlora", options: dict | None = None,
                   hook_files=(), plugin_manager=None) -> dict:
    """Return `SFTTrainer` keyword arguments with `strategy` applied (model loaded in 4-bit, LoRA added,
    recipe defaults for the `SFTConfig` fields you left at their defaults, paged AdamW).

    `options` are strategy options by name (see `qlora-plugin strategies`); `hook_files` are hook modules to load.
    Raises `QLoRAPluginError` (a `ValueError`) for bad input. The trainer you build from these is not the plugin's
    to reach, so resume and atomic saves come from wrappers on `transformers.Trainer` that pass straight through
    for trainers without a strategy; `make_trainer` wraps its one trainer instead.
    """
    kwargs = _prepare(trainer_kwargs, strategy, options, hook_files, plugin_manager)
    patch_trainer_class()
    return kwargs


def _prepare(trainer_kwargs, strategy, options, hook_files, plugin_manager) -> dict:
    if not isinstance(strategy, str):
        raise QLoRAPluginError(f"`strategy` must be a strategy name such as 'qlora'; got {strategy!r}.")
    if not isinstance(options or {}, dict):
        raise QLoRAPluginError(f"`options` must be a dict of strategy options, e.g. {{'lora_r': 16}}; got {options!r}.")
    if not isinstance(trainer_kwargs, dict):
        raise QLoRAPluginError(f"`trainer_kwargs` must be a dict of SFTTrainer arguments; got {trainer_kwargs!r}.")
    refuse_hub_kernels()
    check_at_activation()  # supported releases (compat)
    request = StrategyRequest(strategy, dict(options or {}), frozenset(), _hook_file_list(hook_files), "api")
    return prepare_trainer_kwargs(request, trainer_kwargs, pm=plugin_manager)


def make_trainer(strategy: str = "qlora", options: dict | None = None, hook_files=(), plugin_manager=None,
                 **trainer_kwargs):
    """Build a TRL `SFTTrainer` with `strategy` applied; keyword arguments are `SFTTrainer`'s own."""
    from trl import SFTTrainer

    trainer = SFTTrainer(**_prepare(trainer_kwargs, strategy, options, hook_files, plugin_manager))
    install(trainer)  # resume and atomic saves on this trainer only
    return trainer
