"""The model as a strategy trains it, built on the meta device from its config: no weights, no memory.

Quantized layers are stand-ins chosen by the run's backend (`quant/backends/`: transformers' own rule); the adapter
is added by the same `qlora_wrap_model` hook a training run calls, so a plugin's own adapter (DoRA, a custom
init, ...) is what `plan` counts, together with the feature plugins that wrap it (`cpu_fast_dropout`).

Skeletons made with a plugin manager are kept for that manager (one request: a training run's budget choice and
its prediction, one `plan` command), one per config, strategy, options, dtype and device, since the plans at
batch 1, batch 2 and the run's batch differ only in the batch; `drop_skeletons(pm)` ends that, and so does the
manager's end.
"""

from __future__ import annotations

import copy
import dataclasses
import weakref

from qlora_plugin.core.errors import QLoRAPluginError
from qlora_plugin.core.options import StrategyOptions
from qlora_plugin.plugin.manager import get_plugin_manager
from qlora_plugin.quant.backends import backend_for
from qlora_plugin.ecosystem.runtime import Runtime
from qlora_plugin.strategies.adapters import cast_trainable, embeddings_kept, trainable_dtype


def with_layers(config, layers: int):
    """A copy of `config` with `layers` decoder layers (per-layer lists such as `layer_types` cut to match)."""
    config = copy.deepcopy(config)
    text = config.get_text_config()
    for name, value in list(vars(text).items()):
        if isinstance(value, list) and len(value) == text.num_hidden_layers and name != "architectures":
            setattr(text, name, value[:layers])
    text.num_hidden_layers = layers
    return config


class QuantizedLinearStandIn:
    """Marker mix-in: this linear layer is 4-bit in the real model (see `skeleton`)."""


def _standin_class():
    import torch

    class Linear4bitStandIn(torch.nn.Linear, QuantizedLinearStandIn):
        """Meta-device stand-in for `bnb.nn.Linear4bit`: casts the input to the compute dtype for the matmul
        and the output back to the input's dtype, as bitsandbytes does (so the saved activations match)."""

        def forward(self, x):
            return torch.nn.functional.linear(x.to(self.weight.dtype), self.weight).to(x.dtype)

    return Linear4bitStandIn


_kept: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # plugin manager -> {key: skeleton}


def drop_skeletons(pm) -> None:
    """Forget the skeletons kept for `pm` (the request that built them is done with planning)."""
    _kept.pop(pm, None)


def skeleton(config, strategy, options: StrategyOptions, compute: str, pm=None, trust_remote_code: bool = False,
             device: str = "cpu"):
    """The model as `strategy` trains it on `device`, built on the meta device: 4-bit stand-ins, dtypes, trainable
    flags, and the adapter from the `qlora_wrap_model` hook (with the feature plugins that wrap it).

    `strategy` None means 16-bit full fine-tuning (everything trainable, no adapter). `pm` defaults to a manager
    with the built-in and installed plugins; with a given `pm`, the same arguments give the same skeleton (module
    docstring). Callers only read it and run meta-device forwards through it."""
    if pm is None:
        return _build(config, strategy, options, compute, get_plugin_manager(), trust_remote_code, device)
    key = (config.to_json_string(use_diff=False), getattr(strategy, "name", None),
           repr(sorted(dataclasses.asdict(options).items())), compute, trust_remote_code, device)
    kept = _kept.setdefault(pm, {})
    if key not in kept:
        kept[key] = _build(config, strategy, options, compute, pm, trust_remote_code, device)
    return kept[key]


def _build(config, strategy, options, compute, pm, trust_remote_code, device):
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    dtype = getattr(torch, compute)
    try:
        with init_empty_weights(), no_init_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, ImportError) as err:
        raise QLoRAPluginError(f"Could not build a causal LM from this config: {err}") from None
    model.tie_weights()  # not done under init_empty_weights; a tied head is one parameter, not two
    if strategy is None:
        model.requires_grad_(True)
        return model
    backend = backend_for(options)
    quantized = backend.quantized_module_names(model) if backend else []
    if quantized:
        standin = _standin_class()
        with embeddings_kept(model):  # as the strategy's k-bit preparation: embeddings and head stay 16-bit
            model.to(torch.float32)  # prepare_model_for_kbit_training upcasts everything else that is not 4-bit
        for name in quantized:
            old = model.get_submodule(name)
            in_f, out_f = (old.in_features, old.out_features) if hasattr(old, "in_features") else old.weight.shape
            with init_empty_weights():
                new = standin(in_f, out_f, bias=False, dtype=dtype)
            if getattr(old, "bias", None) is not None:
                new.bias = torch.nn.Parameter(old.bias.detach(), requires_grad=False)  # fp32, as peft upcasts it
            model.set_submodule(name, new)
    model.requires_grad_(False)
    runtime = Runtime(device, compute == "bfloat16", "none")
    with init_empty_weights():
        model = pm.hook.qlora_wrap_model(strategy=strategy, options=options, model=model, runtime=runtime,
                                         trainer_kind="sft")
    cast_trainable(model, trainable_dtype(compute, fp16_amp=False))  # as a training run keeps the adapter
    return model
