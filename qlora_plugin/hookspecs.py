"""The hooks of qlora-plugin, in the order a training run calls them. Specs only: implementations live in plugins.

Every hook name starts with `qlora_`. An implementation may take any subset of a hook's parameters.
`firstresult` hooks stop at the first non-None answer; the built-in strategies answer last (`trylast`),
so any plugin can override them for its own strategy, or for all.
"""

import pluggy

hookspec = pluggy.HookspecMarker("qlora_plugin")
hookimpl = pluggy.HookimplMarker("qlora_plugin")


@hookspec
def qlora_register_strategies(register):
    """Called once when the plugin manager is built: call `register(Strategy(...))` for each strategy you add."""


@hookspec(firstresult=True)
def qlora_model_init_kwargs(strategy, options, model_id, init_kwargs, runtime):
    """Called before the base model is loaded by name: return the `from_pretrained` kwargs to load it with.

    `init_kwargs` are the script's own (`SFTConfig.model_init_kwargs`, read-only); the returned dict replaces them
    (start from a copy). The built-in implementation injects the `BitsAndBytesConfig`, dtype and device map.
    Stops at the first non-None result.
    """


@hookspec(firstresult=True)
def qlora_wrap_model(strategy, options, model, runtime):
    """Called right after the base model is loaded: return the model wrapped for training (e.g. a `PeftModel`).

    The built-in implementation prepares a k-bit model for training and adds the LoRA adapter.
    Stops at the first non-None result.
    """


@hookspec(firstresult=True)
def qlora_create_optimizer(strategy, options, model, training_args, runtime):
    """Called when the trainer is built: return `(optimizer_class, optimizer_kwargs)` for the Trainer, or None.

    The Trainer builds its parameter groups (weight decay) and scheduler around the class as usual. The built-in
    implementation returns bitsandbytes' paged AdamW named by `training_args.optim`. Stops at the first non-None
    result; return None everywhere to keep the Trainer's own optimizer.
    """


@hookspec
def qlora_trainer_callbacks(strategy, options, training_args):
    """Called when the trainer is built: return a list of `transformers.TrainerCallback`s to add (observers).

    Every implementation's callbacks are added, in registration order.
    """
