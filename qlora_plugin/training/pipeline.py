"""Applying a strategy to a TRL trainer's arguments: the lifecycle hooks, called in order for one trainer.

`prepare_trainer_kwargs` is what the TRL patches call (for every trainer in `trainer_kinds.KINDS`) and what the
Python API exposes; it returns keyword arguments for the unmodified trainer. Everything a strategy or a feature
does happens in a hook implementation (`plugin.specs`); this module only checks the input, calls the hooks and
gathers the facts.
"""

from __future__ import annotations

import copy
import functools
import logging
import os

from transformers import set_seed

from qlora_plugin.core.errors import QLoRAPluginError
from qlora_plugin.ecosystem import hub_code
from qlora_plugin.ecosystem.notices import library_deprecations
from qlora_plugin.plan.budget import budget_bytes, choose, memory_in_use, settings_for_run
from qlora_plugin.plan.estimate import predict_for_run
from qlora_plugin.plan.skeleton import drop_skeletons
from qlora_plugin.plan.trainer_passes import passes_for_args, peaks_for, planner
from qlora_plugin.plugin.manager import loaded_plugins
from qlora_plugin.quant.backends import backend_for, backend_of_model, check_asked_quantization, model_facts
from qlora_plugin.core.request import StrategyRequest
from qlora_plugin.ecosystem.runtime import detect_runtime
from qlora_plugin.strategies.adapters import adapter_facts, count_parameters
from qlora_plugin.strategies.optimizer import optim_name
from qlora_plugin.strategies.recipe import apply_training_defaults, user_set
from qlora_plugin.strategies.trl_args import is_strategy_peft_config
from qlora_plugin.training.checkpointing import enable_resume
from qlora_plugin.training.dataset_checks import check_sft_datasets
from qlora_plugin.training.loading import (
    SCRIPT_LOADED, Hooks, load_model, resolve, script_init_kwargs,
)
from qlora_plugin.training.model_checks import check_model_argument
from qlora_plugin.training.trainer_setup import (
    check_kind_options, init_method, load_kwargs_for_kind, note_zero_start, options_for_kind, reference_fact,
)
from qlora_plugin.core.trainer_kinds import KINDS, TrainerKind

logger = logging.getLogger(__name__)

def _default_args(model, kind: TrainerKind):
    """The config the trainer would make itself when built without `args` (TRL names the folder `<model>-<KIND>`)."""
    import trl

    name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
    with library_deprecations():  # TRL's default `gradient_checkpointing=True`, not a name the user chose
        return getattr(trl, kind.config_class)(
            f"{str(name).rstrip('/').split('/')[-1]}-{kind.class_name.removesuffix('Trainer')}")


def record_local_base(model) -> None:
    """Name a base loaded from a local folder by its absolute, resolved path, which peft records in the adapter
    (`base_model_name_or_path`) and `qlora-plugin merge` or `PeftModel.from_pretrained` read back: a relative path
    as typed (`--model_name_or_path tiny`) works only from the folder training ran in. A Hub id stays as it is."""
    name = getattr(model, "name_or_path", None)
    if isinstance(name, str) and name and os.path.isdir(os.path.expanduser(name)):
        model.name_or_path = model.config.name_or_path = os.path.realpath(os.path.expanduser(name))


def _fit_to_budget(model, strategy, options, args, runtime, explicit, compute: str, pm, kind: TrainerKind) -> dict:
    """`memory_budget`: set the batch sizes the plan predicts to fit (yours are checked, not changed)."""
    names = ("per_device_train_batch_size", "gradient_accumulation_steps", "per_device_eval_batch_size")
    chosen_by_user = {name: getattr(args, name) for name in names if user_set(args, name, explicit)}
    budget, how = budget_bytes(options.memory_budget, runtime.device_type)
    # the effective batch you asked for (per device, per optimizer step), TRL's default batch where you set none:
    # the choice keeps it (docs/plan.md: with only the accumulation set, it may be raised to keep it)
    samples = args.per_device_train_batch_size * args.gradient_accumulation_steps
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    choice = choose(config, strategy.name, strategy, options, settings_for_run(args, runtime.device_type, compute,
                                                                               optim_name(args)),
                    budget, samples, args.per_device_eval_batch_size, chosen_by_user.get("per_device_train_batch_size"),
                    chosen_by_user.get("per_device_eval_batch_size"), options.strict_budget, pm,
                    memory_in_use(runtime.device_type, model), peaks_for(passes_for_args(kind.name, args)))
    batch_is_yours = "per_device_train_batch_size" in chosen_by_user
    for name in names:
        accumulation = name == "gradient_accumulation_steps"
        if (name in chosen_by_user and not accumulation) or (accumulation and batch_is_yours):
            choice[name] = getattr(args, name)  # yours: checked, kept
            continue
        if accumulation and name in chosen_by_user and choice[name] != args.gradient_accumulation_steps:
            choice["notes"].append(
                f"gradient_accumulation_steps {choice[name]} instead of your {args.gradient_accumulation_steps}: "
                f"it keeps your effective batch of {samples} samples per device and step at the per-device batch "
                f"{choice['per_device_train_batch_size']} that fits (set --per_device_train_batch_size too to keep "
                "both)")
        setattr(args, name, choice[name])
    for note in choice["notes"]:
        logger.warning("%s.", note)
    return {**choice, "how": how}


def _merge_facts(facts: dict, extra: dict | None) -> None:
    """One plugin's `qlora_run_facts` into the run's: sections merged, notes appended."""
    for key, value in (extra or {}).items():
        if key == "fallbacks":
            facts["fallbacks"].extend(value)
        elif isinstance(value, dict):
            facts[key] = {**(facts.get(key) or {}), **value}
        else:
            facts[key] = value


def prepare_trainer_kwargs(request: StrategyRequest, trainer_kwargs: dict, pm=None, trainer_kind: str = "sft") -> dict:
    """Return keyword arguments for the TRL trainer of `trainer_kind` (`trainer_kinds.KINDS`: sft, dpo, kto, reward,
    grpo, rloo) with the strategy applied. `trainer_kwargs` is not modified.

    The model is loaded and wrapped here (so `quantization_config`/`peft_config` are no longer passed on);
    a `peft_config` or `quantization_config` you pass yourself wins over the strategy's.
    """
    kwargs = dict(trainer_kwargs)
    kind = KINDS[trainer_kind]
    pm, strategy, options = resolve(request, pm)
    auto_init = options.init_lora_weights == "auto"
    options = options_for_kind(options, kind, request.options)
    check_kind_options(options, kind)
    explicit = set(request.explicit_training_args)
    model = kwargs.get("model")
    check_model_argument(model)
    args = kwargs.get("args") or _default_args(model, kind)
    if kind.name == "sft":
        check_sft_datasets(kwargs, args)  # before the model is loaded: a wrong column fails in seconds, not minutes
    runtime = detect_runtime()
    hooks = Hooks(pm, strategy=strategy, options=options, runtime=runtime, trainer_kind=kind.name)
    set_seed(args.seed)  # as SFTTrainer does before building the model: `--seed` fixes the LoRA initialisation
    user_quant = kwargs.pop("quantization_config", None)
    user_peft = kwargs.pop("peft_config", None)
    if is_strategy_peft_config(user_peft, options):
        user_peft = None  # built from the arguments the strategy filled in (`get_peft_config`): the strategy's own
    # a bad --resume_from_checkpoint fails here, before the model loads
    resume_guard = enable_resume(args, options, own_quantization=user_quant is None, own_adapter=user_peft is None,
                                 loading=isinstance(model, str))
    if isinstance(model, str):
        loaded_by = "strategy"
        init = {**(args.model_init_kwargs or {}), **({"quantization_config": user_quant} if user_quant else {})}
        init = load_kwargs_for_kind(script_init_kwargs(init, explicit, options), kind)
        trust_remote_code = bool(init.pop("trust_remote_code", args.trust_remote_code))
        model = load_model(hooks, model, init, options, trust_remote_code)
        args.model_init_kwargs = None  # consumed here; TRL must not warn that they are ignored
    else:
        loaded_by = "strategy, in the script's from_pretrained" if getattr(model, SCRIPT_LOADED, None) else "script"
        check_asked_quantization(user_quant, options)
        backend = backend_for(options)
        held = backend_of_model(model)
        if backend is not None and held is not backend:
            raise QLoRAPluginError(
                f"Strategy {strategy.name!r} trains a {backend.label} base, but {kind.class_name} got a "
                f"{held.label if held else '16-bit'} model object the plugin did not load (built in code, loaded "
                "before `import trl`, or not the model named by --model_name_or_path). Load it after `import trl` "
                f"with `from_pretrained(<model>)` (the strategy then loads it in {backend.label}), pass its name or "
                "folder as `model`, or use `--strategy lora`."
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
        note_zero_start(model, kind, auto_init)

    num_params = count_parameters(model)
    defaults = hooks.qlora_training_defaults(num_params=num_params) or {}
    applied = apply_training_defaults(args, defaults, explicit)
    kept = sorted(name for name in defaults if name not in applied and user_set(args, name, explicit))
    quantization = model_facts(model)
    compute = quantization["compute_dtype"] if quantization else str(model.dtype).replace("torch.", "")
    budget = _fit_to_budget(model, strategy, options, args, runtime, explicit, compute, pm, kind) \
        if options.memory_budget else None

    optimizer_class = None
    if kwargs.get("optimizers", (None, None))[0] is None and kwargs.get("optimizer_cls_and_kwargs") is None:
        answer = hooks.qlora_create_optimizer(model=model, training_args=args)
        if answer is not None:
            kwargs["optimizer_cls_and_kwargs"] = answer
            optimizer_class = answer[0].__name__

    facts = {
        "strategy": strategy.name,
        "trainer_kind": kind.name,
        "trainer": kind.class_name,
        "plugin": strategy.plugin,
        "source": request.source,
        "loaded_by": loaded_by,
        "plugins": loaded_plugins(pm),
        "model": {"name_or_path": getattr(model.config, "_name_or_path", None), "params": num_params,
                  "dtype": str(model.dtype).replace("torch.", "")},
        "runtime": {"device": runtime.device_type, "bf16_native": runtime.bf16_native, "engine": runtime.engine,
                    "processes": runtime.num_processes, "capability": runtime.capability,
                    "mixed_precision": "fp16" if args.fp16 else "bf16" if args.bf16 else "no"},
        "quantization": quantization,
        "adapter": adapter_facts(model, compute, bool(args.fp16), runtime.shards_parameters),
        "optimizer": {"name": optim_name(args), "class": optimizer_class},
        "recipe_applied": applied,
        "user_kept": kept,
        "fallbacks": [],
        "memory_budget": budget,
        "reference": reference_fact(kind, kwargs.get("ref_model"), init_method(model), args),
    }
    facts["fallbacks"].extend(budget["notes"] if budget else [])
    if hub_code.status():
        facts["fallbacks"].append(hub_code.status())
    for extra in reversed(hooks.qlora_run_facts(explicit_options=dict(request.options), model=model,
                                                training_args=args)):
        _merge_facts(facts, extra)  # in registration order: the built-in notes first
    # other trainers: their rows, reference and generation passes (`plan.trainer_passes`); GRPO/RLOO's prompt
    # length is unbounded, so their report says why it has no prediction
    plan_for_run = functools.partial(predict_for_run, model.config, strategy, options, args, runtime.device_type,
                                     compute, pm, planner(passes_for_args(kind.name, args), args))
    facts["memory"] = plan_for_run()
    if facts["memory"].get("predicted_peak_bytes") is not None:  # the report re-plans at the longest row trained,
        facts["_memory_at"] = plan_for_run                      # when shorter (never written)
    drop_skeletons(pm)  # the budget choice and the prediction shared them; planning for this run is done
    facts["summary_lines"] = [list(line) for lines in reversed(hooks.qlora_summary_lines(facts=facts))
                              for line in lines or ()]  # in registration order, as the facts
    callbacks = [*(kwargs.get("callbacks") or []), resume_guard]
    for extra in hooks.qlora_trainer_callbacks(training_args=args, facts=facts):
        callbacks.extend(extra or [])
    kwargs.update(model=model, args=args, callbacks=callbacks)
    return kwargs
