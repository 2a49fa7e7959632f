"""TRL's own QLoRA/LoRA arguments (`ModelConfig`'s `load_in_4bit`, `lora_r`, ...) as a strategy fills them in.

Why: widely copied SFT scripts build their configs from TRL's `ModelConfig` themselves
(`get_quantization_config(model_args)`, `get_peft_config(model_args)`). While a strategy is active the script's
parser returns these fields with the run's effective values (the user's explicit choice, else the strategy's), so
the script's own objects agree with the strategy; and when such a derived config reaches the strategy again
(`SFTTrainer(peft_config=..., quantization_config=...)`), it is recognised as the strategy's own, not as a choice
that overrides it.
"""

from __future__ import annotations

from qlora_plugin.core.options import StrategyOptions

# What `ModelConfig.lora_dropout` shows when the strategy decides the dropout by model size at load time (0.1 up
# to 20B parameters, 0.05 above): the value for the models most runs train. The LoRA the strategy adds uses the
# size rule.
SIZE_DEPENDENT_DROPOUT_SHOWN = 0.1


def model_config_values(options: StrategyOptions) -> dict:
    """`ModelConfig` field -> the value it holds under these options (fields TRL names like the options)."""
    targets = options.lora_target_modules
    return {
        "use_peft": True,
        "load_in_8bit": options.quant_backend == "bnb_int8",
        "load_in_4bit": options.load_in_4bit,
        "bnb_4bit_quant_type": options.bnb_4bit_quant_type,
        "use_bnb_nested_quant": options.use_bnb_nested_quant,
        "bnb_4bit_quant_storage": None if options.bnb_4bit_quant_storage == "auto" else options.bnb_4bit_quant_storage,
        "lora_r": options.lora_r,
        "lora_alpha": options.lora_alpha,
        "lora_dropout": SIZE_DEPENDENT_DROPOUT_SHOWN if options.lora_dropout is None else options.lora_dropout,
        # ModelConfig.__post_init__ turns a one-element list into the string, which peft needs for `all-linear`
        "lora_target_modules": targets[0] if len(targets) == 1 else list(targets),
        "lora_modules_to_save": options.lora_modules_to_save,
        "lora_task_type": options.lora_task_type,
        "use_dora": options.use_dora,
        "use_rslora": options.use_rslora,
    }


def fill_parsed(objects, options: StrategyOptions) -> list[str]:
    """Set the fields above on every parsed dataclass that has them (TRL's `ModelConfig`, or a script's own with
    TRL's names); returns the names set."""
    values = model_config_values(options)
    changed = []
    for obj in objects:
        names = set(getattr(obj, "__dataclass_fields__", {}))
        for name in sorted(names & set(values)):
            setattr(obj, name, values[name])
            changed.append(name)
    return changed


def _modules(value) -> frozenset:
    if value is None:
        return frozenset()
    return frozenset([value] if isinstance(value, str) else value)


def is_strategy_peft_config(config, options: StrategyOptions) -> bool:
    """Whether `config` is the LoRA config `get_peft_config` builds from the filled-in fields, i.e. the strategy's
    own settings (the strategy then adds the adapter itself, with its size rules and k-bit preparation)."""
    values = model_config_values(options)
    if type(config).__name__ != "LoraConfig":
        return False
    return (config.r == values["lora_r"] and config.lora_alpha == values["lora_alpha"]
            and config.lora_dropout == values["lora_dropout"]
            and _modules(config.target_modules) == _modules(values["lora_target_modules"])
            and _modules(config.modules_to_save) == _modules(values["lora_modules_to_save"])
            and bool(config.use_dora) == values["use_dora"] and bool(config.use_rslora) == values["use_rslora"])


def is_strategy_quantization_config(config, options: StrategyOptions) -> bool:
    """Whether `config` is the `BitsAndBytesConfig` `get_quantization_config` builds from the filled-in fields
    (compute dtype aside, which follows `--dtype`; the strategy then builds its own, with the storage dtype the
    distributed engine needs)."""
    if config is not None and getattr(config, "load_in_8bit", False) and options.quant_backend == "bnb_int8":
        return True  # `get_quantization_config` under `lora-int8`: the strategy builds its own (same settings)
    if config is None or not getattr(config, "load_in_4bit", False) or not options.load_in_4bit:
        return False
    storage = str(getattr(config, "bnb_4bit_quant_storage", "uint8")).replace("torch.", "")
    expected_storage = "uint8" if options.bnb_4bit_quant_storage == "auto" else options.bnb_4bit_quant_storage
    return (config.bnb_4bit_quant_type == options.bnb_4bit_quant_type
            and bool(config.bnb_4bit_use_double_quant) == options.use_bnb_nested_quant
            and storage == expected_storage)
