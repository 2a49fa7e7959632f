"""Loading the base model a strategy trains: the loading hooks, for a model named to `SFTTrainer` and for a script
that calls `from_pretrained` itself.

Both paths end in `load_model`: `qlora_model_init_kwargs`, the source checks (before any weight is read), then
`qlora_load_model`. While it runs, `strategy_loading()` is true, so the `from_pretrained` interception
(`integration.model_loading`) lets the loaders' own `from_pretrained` calls through untouched.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os

from qlora_plugin.core.errors import QLoRAPluginError
from qlora_plugin.plugin import resolution
from qlora_plugin.quant.backends import (backend_for, backend_of_model, check_asked_quantization, check_options_apply,
                                         describe)
from qlora_plugin.quant.cache import recorded_base
from qlora_plugin.core.request import StrategyRequest
from qlora_plugin.ecosystem.runtime import detect_runtime
from qlora_plugin.strategies.trl_args import is_strategy_quantization_config
from qlora_plugin.training.model_checks import check_causal_lm, check_model_source, load_error

logger = logging.getLogger(__name__)

TRL_DEFAULT_DTYPES = ("float32", "torch.float32")  # what TRL's ModelConfig passes as `dtype` when none was named
SCRIPT_LOADED = "_qlora_plugin_strategy"  # attribute set on a model the strategy loaded for a script

_loading = contextvars.ContextVar("qlora_plugin_loading", default=False)


def strategy_loading() -> bool:
    """True while a strategy loads its base (its loaders' `from_pretrained` calls are not to be intercepted)."""
    return _loading.get()


@contextlib.contextmanager
def _loading_now():
    token = _loading.set(True)
    try:
        yield
    finally:
        _loading.reset(token)


class Hooks:
    """The manager's hooks with the run's common arguments (strategy, options, runtime) bound once."""

    def __init__(self, pm, **common):
        self._pm, self._common = pm, common

    def __getattr__(self, name):
        caller = getattr(self._pm.hook, name)
        return lambda **kwargs: caller(**self._common, **kwargs)


def script_init_kwargs(kwargs: dict, explicit, options) -> dict:
    """The script's loading kwargs as the strategy starts from them: a `dtype` that is only TRL's default and a
    4-bit config derived from the strategy's own values are dropped (the strategy decides those); the user's own
    choices stay."""
    kwargs = dict(kwargs)
    if "torch_dtype" in kwargs and "dtype" not in kwargs:
        kwargs["dtype"] = kwargs.pop("torch_dtype")
    if str(kwargs.get("dtype")) in TRL_DEFAULT_DTYPES and "dtype" not in explicit:
        del kwargs["dtype"]
    quantization = kwargs.get("quantization_config")
    check_asked_quantization(quantization, options)
    if is_strategy_quantization_config(quantization, options):
        del kwargs["quantization_config"]
    elif quantization is not None:
        logger.warning("Using the quantization_config you passed instead of the strategy's.")
    return kwargs


def _causal_path(architecture) -> bool:
    """True when the model is loaded for SFT's causal path: named to `SFTTrainer` (TRL picks the class from the
    config) or by a script's `AutoModelForCausalLM.from_pretrained`; a script's own choice of class stays its own."""
    return architecture is None or getattr(architecture, "__name__", "") == "AutoModelForCausalLM"


def load_model(hooks, model_id: str, init_kwargs: dict, options, trust_remote_code: bool):
    """`qlora_model_init_kwargs`, the source checks, then `qlora_load_model`; loading errors said in plain words."""
    kwargs = hooks.qlora_model_init_kwargs(model_id=model_id, init_kwargs=init_kwargs)
    kwargs.setdefault("trust_remote_code", trust_remote_code)  # the user's choice, never turned on by us
    subfolder = kwargs.get("subfolder")
    checked = os.path.join(model_id, subfolder) if subfolder and os.path.isdir(model_id) else model_id
    check_model_source(checked, backend_for(options), bool(kwargs["trust_remote_code"]))
    if _causal_path(kwargs.get("architecture")):
        check_causal_lm(checked)
    try:
        with _loading_now():
            model = hooks.qlora_load_model(model_id=model_id, init_kwargs=kwargs)
    except (OSError, ValueError) as err:
        if isinstance(err, QLoRAPluginError):
            raise
        friendly = load_error(model_id, err)
        if friendly is None:
            raise
        raise friendly from None
    if kwargs.get("subfolder"):  # transformers names the root; the weights (LoftQ's, the adapter's base) are below
        model.config.name_or_path = model.name_or_path = recorded_base(model_id, kwargs)
    return model


def resolve(request: StrategyRequest, pm=None):
    """(plugin manager, strategy, options) for a request: options are dataclass defaults < the strategy's < the
    user's explicit values. Built once per request (`plugin.resolution`); the options checked against the
    strategy's quantization backend."""
    resolved = resolution.resolve(request, pm)
    check_options_apply(resolved.options, request.options, resolved.strategy.name)
    return resolved.pm, resolved.strategy, resolved.options


def load_for_script(request: StrategyRequest, architecture, model_id: str, kwargs: dict):
    """The model a script loads with `architecture.from_pretrained(model_id, **kwargs)`, loaded as the strategy
    loads it (4-bit config, dtype, device map, the quantized cache), keeping the script's other kwargs."""
    pm, strategy, options = resolve(request)
    hooks = Hooks(pm, strategy=strategy, options=options, runtime=detect_runtime(), trainer_kind=None)  # not built yet
    init = script_init_kwargs(kwargs, request.explicit_training_args, options)
    trust_remote_code = bool(init.pop("trust_remote_code", False))
    model = load_model(hooks, model_id, {**init, "architecture": architecture}, options, trust_remote_code)
    setattr(model, SCRIPT_LOADED, strategy.name)
    logger.info("Loaded %s for strategy %s (%s).", model_id, strategy.name,
                describe(backend_of_model(model)))
    return model
