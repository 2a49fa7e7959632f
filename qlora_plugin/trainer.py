"""Applying a strategy to `SFTTrainer` arguments: load (hook), wrap (hook), recipe defaults, optimizer (hook).

`prepare_trainer_kwargs` is what the TRL patch calls and what the Python API exposes; it returns keyword
arguments for an unmodified `SFTTrainer`.
"""

from __future__ import annotations

import logging

from .errors import QLoRAPluginError
from .options import build_options
from .plugins import get_plugin_manager, get_strategy
from .request import StrategyRequest

logger = logging.getLogger("qlora_plugin")

TRL_DEFAULT_DTYPE = "float32"  # what TRL's sft.py passes as `dtype` when the user named none


def _default_args(model):
    from trl import SFTConfig

    name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
    return SFTConfig(f"{str(name).rstrip('/').split('/')[-1]}-SFT")


def _init_kwargs(args, explicit) -> dict:
    kwargs = dict(args.model_init_kwargs or {})
    if kwargs.get("dtype") == TRL_DEFAULT_DTYPE and "dtype" not in explicit:
        del kwargs["dtype"]  # TRL's default, not the user's: the strategy picks the dtype
    return kwargs


def _load_model(pm, strategy, options, model_id, args, runtime, explicit):
    """The model and, when the 4-bit base came from the quantized-base cache, the cache folder."""
    from trl.trainer.utils import create_model_from_path

    from .model_checks import check_model_source, load_error

    kwargs = pm.hook.qlora_model_init_kwargs(
        strategy=strategy, options=options, model_id=model_id, init_kwargs=_init_kwargs(args, explicit),
        runtime=runtime,
    )
    kwargs.setdefault("trust_remote_code", args.trust_remote_code)  # the user's choice, never turned on by us
    check_model_source(model_id, options.load_in_4bit, bool(kwargs["trust_remote_code"]))
    source = None
    if options.quantized_cache and not runtime.shards_parameters:
        from accelerate import PartialState

        from .quantized_cache import cached_base

        with PartialState().main_process_first():  # under DDP one rank quantizes, the others then read the cache
            source = cached_base(model_id, kwargs)
    try:
        if source is None:
            return create_model_from_path(model_id, **kwargs), None
        kwargs.pop("quantization_config", None)  # the cached copy's config.json carries it
        model = create_model_from_path(source, **kwargs)
        model.config._name_or_path = model.name_or_path = model_id  # what the adapter records as its base
        return model, source
    except (OSError, ValueError) as err:
        friendly = load_error(model_id, err)
        if friendly is None:
            raise
        raise friendly from None


def _quantization_facts(model) -> dict | None:
    from .dequant_buffer import buffered_layers
    from .report import four_bit_layers, quantized_bits_per_param

    layers = four_bit_layers(model)
    if not layers:
        return None
    first = layers[0]
    state = first.weight.quant_state
    return {
        "layers_4bit": len(layers),
        "quant_type": state.quant_type,
        "double_quant": getattr(state, "nested", False),
        "bits_per_param": quantized_bits_per_param(model),
        "compute_dtype": str(first.compute_dtype).replace("torch.", ""),
        "quant_storage": str(first.weight.quant_storage).replace("torch.", ""),
        "dequant_buffer_layers": buffered_layers(model),
    }


def _adapter_facts(model, quantization) -> dict:
    from .cpu_dropout import installed
    from .report import trainable_parameters

    trainable, total = trainable_parameters(model)
    config = model.peft_config[model.active_adapter] if hasattr(model, "peft_config") else None
    targets = sorted({name.rsplit(".", 1)[-1] for name in (config.target_modules or [])}) if config else []
    layers = sum(1 for name, _ in model.named_modules() if name.endswith(".lora_A"))
    return {
        "r": getattr(config, "r", None),
        "alpha": getattr(config, "lora_alpha", None),
        "dropout": getattr(config, "lora_dropout", None),
        "fast_dropout_layers": installed(model),
        "use_dora": getattr(config, "use_dora", False),
        "dtype": quantization["compute_dtype"] if quantization else str(model.dtype).replace("torch.", ""),
        "target_modules": targets,
        "layers": layers,
        "trainable_params": trainable,
        "total_params": total,
    }


def prepare_trainer_kwargs(request: StrategyRequest, trainer_kwargs: dict, pm=None) -> dict:
    """Return `SFTTrainer` keyword arguments with the strategy applied. `trainer_kwargs` is not modified.

    The model is loaded and wrapped here (so `quantization_config`/`peft_config` are no longer passed on);
    a `peft_config` or `quantization_config` you pass yourself wins over the strategy's.
    """
    from transformers import set_seed

    from .adapters import count_parameters
    from .checkpointing import enable_resume
    from .cpu_compat import make_cpu_inference_safe
    from .engine_checks import engine_warnings
    from .dataset_checks import check_sft_datasets
    from .model_checks import check_model_argument
    from .optimizer import CPU_PAGING_NOTE, optim_name
    from .planning import predict_for_run
    from .host_memory import ReleaseMemoryAfterLoad
    from .linear4bit_forward import inactive_path_notes
    from . import cpu_dropout, malloc_tunables
    from .quant_record import QuantizationRecordCallback
    from .recipe import apply_training_defaults, training_defaults, user_set
    from .report import StrategyReportCallback
    from .runtime import detect_runtime

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
    fallbacks: list[str] = []
    cached_from = None
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
        model, cached_from = _load_model(pm, strategy, options, model, args, runtime, explicit)
        args.model_init_kwargs = None  # consumed here; TRL must not warn that they are ignored
    elif options.load_in_4bit and not getattr(model, "is_loaded_in_4bit", False):
        raise QLoRAPluginError(
            f"Strategy {strategy.name!r} loads the base model in 4-bit itself, but SFTTrainer got an already "
            "loaded 16-bit model. Pass the model's name or folder (a string) as `model`, or use `--strategy lora`."
        )
    make_cpu_inference_safe(model)

    if hasattr(model, "peft_config"):
        logger.warning("The model already has a PEFT adapter; strategy %s adds none.", strategy.name)
    elif user_peft is not None:
        from peft import get_peft_model

        logger.warning("Using the peft_config you passed instead of strategy %s's LoRA options.", strategy.name)
        model = get_peft_model(model, user_peft)
    else:
        model = pm.hook.qlora_wrap_model(strategy=strategy, options=options, model=model, runtime=runtime)

    num_params = count_parameters(model)
    applied = apply_training_defaults(args, training_defaults(num_params, runtime), explicit)
    kept = sorted(
        name for name in training_defaults(num_params, runtime) if name not in applied and user_set(args, name, explicit)
    )

    optimizer_class = None
    if kwargs.get("optimizers", (None, None))[0] is None and kwargs.get("optimizer_cls_and_kwargs") is None:
        answer = pm.hook.qlora_create_optimizer(
            strategy=strategy, options=options, model=model, training_args=args, runtime=runtime
        )
        if answer is not None:
            kwargs["optimizer_cls_and_kwargs"] = answer
            optimizer_class = answer[0].__name__
    if runtime.device_type == "cpu" and optim_name(args).startswith("paged"):
        fallbacks.append(CPU_PAGING_NOTE)
    fallbacks.extend(inactive_path_notes(options, request.options, bool(args.gradient_checkpointing),
                                         runtime.device_type))
    malloc_fact = malloc_tunables.summary_fact()
    if request.options.get("cpu_malloc_tunables") is True and malloc_fact.startswith("not applied"):
        fallbacks.append("cpu_malloc_tunables " + malloc_fact)
    for problem in engine_warnings(runtime, optim_name(args)):
        logger.warning("%s.", problem)
        fallbacks.append(problem)

    quantization = _quantization_facts(model)
    if quantization:
        quantization["cached_base"] = cached_from
    adapter = _adapter_facts(model, quantization)
    dropout_note = cpu_dropout.inactive_note(request.options, runtime.device_type, adapter["dropout"],
                                             adapter["fast_dropout_layers"])
    if dropout_note:
        fallbacks.append(dropout_note)
    facts = {
        "strategy": strategy.name,
        "plugin": strategy.plugin,
        "source": request.source,
        "model": {"name_or_path": getattr(model.config, "_name_or_path", None), "params": num_params,
                  "dtype": str(model.dtype).replace("torch.", "")},
        "runtime": {"device": runtime.device_type, "bf16_native": runtime.bf16_native, "engine": runtime.engine,
                    "processes": runtime.num_processes, "malloc_tunables": malloc_fact},
        "quantization": quantization,
        "adapter": adapter,
        "optimizer": {"name": optim_name(args), "class": optimizer_class},
        "recipe_applied": applied,
        "user_kept": kept,
        "fallbacks": fallbacks,
    }
    facts["memory"] = predict_for_run(model.config, strategy, options, args, runtime.device_type,
                                      facts["adapter"]["dtype"])
    callbacks = list(kwargs.get("callbacks") or [])
    if options.release_memory_after_load:
        callbacks.append(ReleaseMemoryAfterLoad(facts))  # before the report's callback starts the peak
    callbacks.append(StrategyReportCallback(facts))
    callbacks.append(QuantizationRecordCallback())  # lets `qlora-plugin merge` rebuild the base training saw
    for extra in pm.hook.qlora_trainer_callbacks(strategy=strategy, options=options, training_args=args):
        callbacks.extend(extra or [])
    kwargs.update(model=model, args=args, callbacks=callbacks)
    return kwargs
