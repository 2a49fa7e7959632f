"""The hooks of qlora-plugin, in the order a training run calls them. Specs only: implementations live in plugins.

Every hook name starts with `qlora_`. An implementation may take any subset of a hook's parameters.
`firstresult` hooks stop at the first non-None answer; the built-in answers are `trylast`, so any plugin can
override them for its own strategy, or for all. Parameters common to most hooks:

- `strategy`: the `Strategy` the run asked for (`strategy.name`, `strategy.option_defaults`);
- `options`: the run's `StrategyOptions` (dataclass defaults < the strategy's < the user's explicit values);
- `runtime`: the `Runtime` (device type, native bf16, distributed engine, rank);
- `model`: the model as loaded (`qlora_model_loaded`) or as wrapped (every later hook);
- `trainer_kind`: which TRL trainer the strategy is applied to: `sft`, `dpo`, `kto`, `reward`, `grpo` or `rloo`
  (`qlora_plugin.core.trainer_kinds`); None while a script loads its model itself, before it builds the trainer.
"""

import pluggy

hookspec = pluggy.HookspecMarker("qlora_plugin")
hookimpl = pluggy.HookimplMarker("qlora_plugin")


@hookspec
def qlora_register_strategies(register):
    """Called when a plugin manager's strategies are listed: call `register(Strategy(...))` for each strategy you
    add. Two plugins registering one name is an error."""


@hookspec
def qlora_register_options(register):
    """Called when a plugin manager's options are gathered (once per run, `qlora-plugin options` and
    `qlora-plugin strategies`): call `register(name, type, default, help, choices=())` for each option your plugin
    adds. Return values are ignored.

    `name` is a new lowercase identifier (not a built-in option or another plugin's: an error names both plugins),
    `type` one of bool, int, float, str, `default` of that type or None, `help` what it does and when (it becomes
    the row in `qlora-plugin options`), `choices` the allowed values, if any. The option is then a `--name` flag, a
    YAML key, a key of `QLORA_PLUGIN_OPTIONS` and of the Python API's `options`, validated like a built-in option
    (a wrong type or value is a one-line error), and `options.name` in every hook of the run. A strategy's
    `option_defaults` name built-in options only.
    """


@hookspec(firstresult=True)
def qlora_model_init_kwargs(strategy, options, model_id, init_kwargs, runtime, trainer_kind):
    """Called before the base model is loaded: return the `from_pretrained` kwargs to load `model_id` with.

    `init_kwargs` are the script's own (`SFTConfig.model_init_kwargs`, read-only); the returned dict replaces them
    (start from a copy). The built-in implementation adds the `BitsAndBytesConfig`, dtype and device map.
    Stops at the first non-None result.
    """


@hookspec(firstresult=True)
def qlora_load_model(strategy, options, model_id, init_kwargs, runtime, trainer_kind):
    """Called to load the base model: return the loaded `PreTrainedModel`, or None to leave it to the next plugin.

    `init_kwargs` is what `qlora_model_init_kwargs` returned. When the load replaces a script's own
    `SomeClass.from_pretrained(...)` call, `init_kwargs["architecture"]` is that class (the parameter of TRL's
    `create_model_from_path`; pop it if you call `from_pretrained` yourself). The built-in implementation (last) is
    TRL's `create_model_from_path`; the quantized-base cache answers first when it holds (or can make) a packed
    4-bit copy of a base on this machine. Stops at the first non-None result.
    """


@hookspec
def qlora_model_loaded(strategy, options, model, runtime, trainer_kind):
    """Called after the base model is loaded and before it is wrapped, also for a model object the script loaded
    itself: inspect or adjust it in place. Return values are ignored."""


@hookspec(firstresult=True)
def qlora_wrap_model(strategy, options, model, runtime, trainer_kind):
    """Called after `qlora_model_loaded`: return the model wrapped for training (e.g. a `PeftModel`).

    The built-in implementation prepares a k-bit model for training and adds the LoRA adapter. `plan` calls it too,
    on a meta-device skeleton, so what it adds is what `plan` counts. Stops at the first non-None result.
    """


@hookspec(firstresult=True)
def qlora_training_defaults(strategy, options, num_params, runtime, trainer_kind):
    """Called once the model is wrapped: return `{config field: value}` (the trainer's `SFTConfig`, `DPOConfig`,
    ...), the recipe applied to every field the user did not set (named on the command line or in YAML, or changed
    from the default in Python).

    `num_params` counts the model as trained in 16-bit. The built-in implementation is the paper's recipe for SFT
    and a published QLoRA recipe for each other `trainer_kind` (docs/adoption.md).
    Stops at the first non-None result.
    """


@hookspec(firstresult=True)
def qlora_create_optimizer(strategy, options, model, training_args, runtime, trainer_kind):
    """Called when the trainer is built: return `(optimizer_class, optimizer_kwargs)` for the Trainer, or None.

    The Trainer builds its parameter groups (weight decay) and scheduler around the class as usual. The built-in
    implementation returns bitsandbytes' paged AdamW named by `training_args.optim`. Stops at the first non-None
    result; return None everywhere to keep the Trainer's own optimizer.
    """


@hookspec
def qlora_run_facts(strategy, options, explicit_options, model, training_args, runtime, trainer_kind):
    """Called once the trainer's arguments are settled: return a dict of facts for the summary and
    `qlora_plugin_report.json`, or None.

    Nested dicts are merged into the run's sections (`quantization`, `adapter`, `runtime`, ...); the list under
    `fallbacks` holds one-line notes on options this run cannot honour, shown as "fell back". `explicit_options`
    are the options the user set explicitly (a note is for what they asked, not for a default).
    """


@hookspec
def qlora_summary_lines(facts):
    """Called once the run's facts are complete (every `qlora_run_facts` merged, the plan's prediction added),
    before the trainer is built: return a list of `(label, text)` pairs for the summary printed when the trainer is
    ready, or None.

    Each pair becomes one line `  label      : text` after the adapter's lines, in registration order (the built-in
    features first); keep `label` to ten characters and `text` to one line saying what this run does differently
    and which option controls it. Read what you need from `facts` (your own `qlora_run_facts` sections included);
    do not change it. The lines are kept in the report too (`summary_lines`).
    """


@hookspec
def qlora_trainer_callbacks(strategy, options, training_args, facts, runtime, trainer_kind):
    """Called last, when the trainer is built: return a list of `transformers.TrainerCallback`s to add.

    `facts` is the run's summary (what `qlora_run_facts` gathered); callbacks may add measurements to it. Every
    implementation's callbacks are added; a callback's `on_init_end` is the point where the trainer is ready.
    """
