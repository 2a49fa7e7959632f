"""Applying a strategy to `SFTTrainer` arguments: the lifecycle hooks, called in order for one trainer.

`prepare_trainer_kwargs` is what the TRL patch calls and what the Python API exposes; it returns keyword
arguments for an unmodified `SFTTrainer`. Everything a strategy or a feature does happens in a hook
implementation (`plugin.specs`); this module only checks the input, calls the hooks and gathers the facts.
"""

from __future__ import annotations

import logging
import os

from transformers import set_seed

from qlora_plugin.errors import QLoRAPluginError
from qlora_plugin.notices import library_deprecations
from qlora_plugin.options import build_options
from qlora_plugin.plan.estimate import predict_for_run
from qlora_plugin.plugin.manager import get_plugin_manager, get_strategy, loaded_plugins
from qlora_plugin.quant.layers import quantization_facts
from qlora_plugin.request import StrategyRequest
from qlora_plugin.runtime import detect_runtime
from qlora_plugin.strategies.adapters import adapter_facts, count_parameters
from qlora_plugin.strategies.optimizer import optim_name
from qlora_plugin.strategies.recipe import apply_training_defaults, user_set
from qlora_plugin.training.checkpointing import enable_resume
from qlora_plugin.training.dataset_checks import check_sft_datasets
from qlora_plugin.training.model_checks import check_model_argument, check_model_source, load_error

logger = logging.getLogger(__name__)

TRL_DEFAULT_DTYPE = "float32"  # what TRL's sft.py passes as `dtype` when the user named none


def _default_args(model):
    from trl import SFTConfig

    name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
    with library_deprecations():  # TRL's default `gradient_checkpointing=True`, not a name the user chose
        return SFTConfig(f"{str(name).rstrip('/').split('/')[-1]}-SFT")


def _init_kwargs(args, explicit) -> dict:
    kwargs = dict(args.model_init_kwargs or {})
    if kwargs.get("dtype") == TRL_DEFAULT_DTYPE and "dtype" not in explicit:
        del kwargs["dtype"]  # TRL's default, not the user's: the strategy picks the dtype
    return kwargs


def _load_model(hooks, model_id, args, explicit, options):
    """`qlora_model_init_kwargs`, the source checks (before any weight is read), then `qlora_load_model`."""
    kwargs = hooks.qlora_model_init_kwargs(model_id=model_id, init_kwargs=_init_kwargs(args, explicit))
    kwargs.setdefault("trust_remote_code", args.trust_remote_code)  # the user's choice, never turned on by us
    check_model_source(model_id, options.load_in_4bit, bool(kwargs["trust_remote_code"]))
    try:
        return hooks.qlora_load_model(model_id=model_id, init_kwargs=kwargs)
    except (OSError, ValueError) as err:
        friendly = load_error(model_id, err)
        if friendly is None:
            raise
        raise friendly from None


def record_local_base(model) -> None:
    """Name a base loaded from a local folder by its absolute, resolved path, which peft records in the adapter
    (`base_model_name_or_path`) and `qlora-plugin merge` or `PeftModel.from_pretrained` read back: a relative path
    as typed (`--model_name_or_path tiny`) works only from the folder training ran in. A Hub id stays as it is."""
    name = getattr(model, "name_or_path", None)
    if isinstance(name, str) and name and os.path.isdir(os.path.expanduser(name)):
        model.name_or_path = model.config.name_or_path = os.path.realpath(os.path.expanduser(name))


class _Hooks:
    """The manager's hooks with the run's common arguments (strategy, options, runtime) bound once."""

    def __init__(self, pm, **common):
        self._pm, self._common = pm, common

    def __getattr__(self, name):
        caller = getattr(self._pm.hook, name)
        return lambda **kwargs: caller(**self._common, **kwargs)


def _merge_facts(facts: dict, extra: dict | None) -> None:
    """One plugin's `qlora_run_facts` into the run's: sections merged, notes appended."""
    for key, value in (extra or {}).items():
        if key == "fallbacks":
            facts["fallbacks"].extend(value)
        elif isinstance(value, dict):
            facts[key] = {**(facts.get(key) or {}), **value}
        else:
            facts[key] = value


def prepare_trainer_kwargs(request: StrategyRequest, trainer_kwargs: dict, pm=None) -> dict:
    """Return `SFTTrainer` keyword arguments with the strategy applied. `trainer_kwargs` is not modified.

    The model is loaded and wrapped here (so `quantization_config`/`peft_config` are no longer passed on);
    a `peft_config` or `quantization_config` you pass yourself wins over the strategy's.
    """
    kwargs = dict(trainer_kwargs)
    pm = pm or get_plugin_manager(request.hook_files)
    strategy = get_strategy(pm, request.strategy)
    options = build_options(dict(strategy.option_defaults), request.options)
    explicit = set(request.explicit_training_args)
    model = kwargs.get("model")
    check_model_argument(model)
    args = kwargs.get("args") or _default_args(model)
    check_sft_datasets(kwargs, args)  # before the model is loaded: a wrong column fails in seconds, not minutes
    runtime = detect_runtime()
    hooks = _Hooks(pm, strategy=strategy, options=options, runtime=runtime)
    set_seed(args.seed)  # as SFTTrainer does before building the model: `--seed` fixes the LoRA initialisation
    enable_resume(args)  # a bad --resume_from_checkpoint fails here, before the model loads

    user_quant = kwargs.pop("quantization_config", None)
    user_peft = kwargs.pop("peft_config", None)
    if user_quant is not None and getattr(user_quant, "load_in_8bit", False):
        raise QLoRAPluginError(
            "A `quantization_config` with load_in_8bit contradicts the strategy (4-bit or 16-bit base). "
            "Remove it, or drop the strategy."
        )
    if isinstance(model, str):
        if user_quant is not None:
            logger.warning("Using the quantization_config you passed instead of strategy %s's.", strategy.name)
            args.model_init_kwargs = {**(args.model_init_kwargs or {}), "quantization_config": user_quant}
        model = _load_model(hooks, model, args, explicit, options)
        args.model_init_kwargs = None  # consumed here; TRL must not warn that they are ignored
    elif options.load_in_4bit and not getattr(model, "is_loaded_in_4bit", False):
        raise QLoRAPluginError(
            f"Strategy {strategy.name!r} loads the base model in 4-bit itself, but SFTTrainer got an already "
            "loaded 16-bit model. Pass the model's name or folder (a string) as `model`, or use `--strategy lora`."
        )
    record_local_base(model)
    hooks.qlora_model_loaded(model=model)

    if hasattr(model, "peft_config"):
        logger.warning("The model already has a PEFT adapter; strategy %s adds none.", strategy.name)
    elif user_peft is not None:
        from peft import get_peft_model

        logger.warning("Using the peft_config you passed instead of strategy %s's LoRA options.", strategy.name)
        with library_deprecations():
            model = get_peft_model(model, user_peft)
    else:
        model = hooks.qlora_wrap_model(model=model)

    num_params = count_parameters(model)
    defaults = hooks.qlora_training_defaults(num_params=num_params) or {}
    applied = apply_training_defaults(args, defaults, explicit)
    kept = sorted(name for name in defaults if name not in applied and user_set(args, name, explicit))

    optimizer_class = None
    if kwargs.get("optimizers", (None, None))[0] is None and kwargs.get("optimizer_cls_and_kwargs") is None:
        answer = hooks.qlora_create_optimizer(model=model, training_args=args)
        if answer is not None:
            kwargs["optimizer_cls_and_kwargs"] = answer
            optimizer_class = answer[0].__name__

    quantization = quantization_facts(model)
    facts = {
        "strategy": strategy.name,
        "plugin": strategy.plugin,
        "source": request.source,
        "plugins": loaded_plugins(pm),
        "model": {"name_or_path": getattr(model.config, "_name_or_path", None), "params": num_params,
                  "dtype": str(model.dtype).replace("torch.", "")},
        "runtime": {"device": runtime.device_type, "bf16_native": runtime.bf16_native, "engine": runtime.engine,
                    "processes": runtime.num_processes},
        "quantization": quantization,
        "adapter": adapter_facts(model, quantization and quantization["compute_dtype"]),
        "optimizer": {"name": optim_name(args), "class": optimizer_class},
        "recipe_applied": applied,
        "user_kept": kept,
        "fallbacks": [],
    }
    for extra in reversed(hooks.qlora_run_facts(explicit_options=dict(request.options), model=model,
                                                training_args=args)):
        _merge_facts(facts, extra)  # in registration order: the built-in notes first
    facts["memory"] = predict_for_run(model.config, strategy, options, args, runtime.device_type,
                                      facts["adapter"]["dtype"], pm)
    callbacks = list(kwargs.get("callbacks") or [])
    for extra in hooks.qlora_trainer_callbacks(training_args=args, facts=facts):
        callbacks.extend(extra or [])
    kwargs.update(model=model, args=args, callbacks=callbacks)
    return kwargs
