"""The built-in strategies' hooks (`qlora`, `lora-int8` and `lora`: their presets are in `presets.py`), answered
through the same hooks as any third-party plugin.

Every implementation here is `trylast`, so a plugin can answer any hook first, for its own strategy or for all.
"""

from __future__ import annotations

import logging

from qlora_plugin.plugin.specs import hookimpl
from qlora_plugin.quant.config import model_init_kwargs
from qlora_plugin.strategies.adapters import KeepAdapterDtype, wrap_with_lora
from qlora_plugin.strategies.calibration import CalibratedLoftQ
from qlora_plugin.strategies.engine_checks import engine_warnings
from qlora_plugin.strategies.optimizer import CPU_PAGING_NOTE, bitsandbytes_optimizer, optim_name
from qlora_plugin.strategies.recipe import training_defaults
from qlora_plugin.strategies.presets import LORA, LORA_INT8, QLORA  # noqa: F401 - where callers find them

logger = logging.getLogger(__name__)

@hookimpl(trylast=True)
def qlora_model_init_kwargs(options, init_kwargs, runtime):
    return model_init_kwargs(options, init_kwargs, runtime)


@hookimpl(trylast=True)
def qlora_load_model(model_id, init_kwargs):
    from trl.trainer.utils import create_model_from_path  # TRL's own loader, as SFTTrainer would call it

    kwargs = dict(init_kwargs)
    if kwargs.get("subfolder") and kwargs.get("architecture") is None:
        kwargs["architecture"] = _subfolder_architecture(model_id, kwargs)
    return create_model_from_path(model_id, **kwargs)


def _subfolder_architecture(model_id: str, kwargs: dict):
    """The model class named by the config in `subfolder`: TRL 1.16's `create_model_from_path` picks it from the
    root's config.json, whatever model (or none) is there."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_id, subfolder=kwargs["subfolder"], revision=kwargs.get("revision"),
                                        trust_remote_code=kwargs.get("trust_remote_code", False))
    return getattr(transformers, (config.architectures or [""])[0], None) or AutoModelForCausalLM


@hookimpl(trylast=True)
def qlora_wrap_model(options, model, runtime):
    return wrap_with_lora(model, options, runtime)


@hookimpl(trylast=True)
def qlora_training_defaults(num_params, runtime, trainer_kind):
    return training_defaults(num_params, runtime, trainer_kind)


@hookimpl(trylast=True)
def qlora_create_optimizer(training_args):
    return bitsandbytes_optimizer(training_args)


def precision_note(runtime, training_args) -> str | None:
    """What the summary says on a CUDA GPU without native bf16 (pre-Ampere: T4, V100)."""
    if runtime.device_type != "cuda" or runtime.bf16_native:
        return None
    gpu = f"this GPU (compute capability {'.'.join(map(str, runtime.capability or ()))})"
    if training_args.bf16:
        return f"bf16 was asked for, but {gpu} only emulates it: steps are slow; drop --bf16 to train in fp16"
    if training_args.fp16:
        return (f"no native bf16 on {gpu}: fp16 compute, adapters kept in fp32, fp16 mixed precision with loss "
                "scaling")
    return None


@hookimpl(trylast=True)
def qlora_run_facts(training_args, runtime):
    notes = []
    if runtime.device_type == "cpu" and optim_name(training_args).startswith("paged"):
        notes.append(CPU_PAGING_NOTE)
    precision = precision_note(runtime, training_args)
    if precision:
        notes.append(precision)
    for problem in engine_warnings(runtime, optim_name(training_args)):
        logger.warning("%s.", problem)
        notes.append(problem)
    return {"fallbacks": notes}


@hookimpl(trylast=True)
def qlora_trainer_callbacks(options, facts):
    callbacks = [KeepAdapterDtype(facts["adapter"]["dtype"])]
    if facts["adapter"]["init"].get("pending"):
        callbacks.append(CalibratedLoftQ(facts["adapter"]["init"], options.init_lora_weights != "auto"))
    return callbacks
