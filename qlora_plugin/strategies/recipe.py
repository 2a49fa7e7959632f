"""The training recipe, applied to the trainer config's fields the user did not set (`SFTConfig`, `DPOConfig`, ...).

"Set" means named on the command line or in the YAML config, or (Python API) holding a value other than the
config class's default. Explicit choices always win.

Gradient checkpointing is `activation_checkpointing(_kwargs)` since transformers 5.24: the Trainer reads only
those, and `gradient_checkpointing(_kwargs)` are deprecated aliases that `TrainingArguments.__post_init__` copies
into them and then mirrors. The recipe is applied after `__post_init__`, so it sets the fields the Trainer reads
and mirrors the old names as `__post_init__` does (TRL still reads them); the user's value under either name wins.
"""

from __future__ import annotations

import dataclasses

from qlora_plugin.strategies.adapters import BIG_MODEL_PARAMS
from qlora_plugin.ecosystem.runtime import Runtime

MIXED_PRECISION = ("bf16", "fp16")
# On CPU, rows are padded to a multiple of this many tokens: at most max_length / 64 batch shapes (docs/plan.md,
# "Rows of different lengths on CPU")
CPU_PAD_MULTIPLE = 64


def training_defaults(num_params: int, runtime: Runtime, trainer_kind: str | None = "sft") -> dict:
    """The paper's 4-bit training setup for every trainer: paged AdamW 32-bit, gradient checkpointing (reentrant
    only where DeepSpeed ZeRO-3 requires it), and bf16 mixed precision only where the device runs bf16 natively
    (TRL turns it on everywhere; emulated bf16 is many times slower), fp16 mixed precision on CUDA GPUs without it
    (`Runtime.half_dtype`). Then the method's own published QLoRA recipe (`METHOD_RECIPES`, sources in
    docs/adoption.md); for SFT the paper's: lr 2e-4 (1e-4 above 20B), max_grad_norm 0.3, constant schedule with 3%
    warmup. On CPU, rows padded to a multiple of `CPU_PAD_MULTIPLE` tokens: every new batch shape leaves memory
    behind there (oneDNN's per-shape kernels and heap fragments: 30 steps of rows of different lengths grew a run by
    210 MiB, padded to 64 by none), so a run's memory stays what `plan` predicts (TRL pads the same way on Neuron,
    which compiles once per shape)."""
    fp16 = {"fp16": True} if runtime.half_dtype == "float16" else {}  # adapters then stay fp32 (`trainable_dtype`)
    padding = {"pad_to_multiple_of": CPU_PAD_MULTIPLE} if runtime.device_type == "cpu" else {}
    method = METHOD_RECIPES.get(trainer_kind) or {
        "learning_rate": 1e-4 if num_params > BIG_MODEL_PARAMS else 2e-4,
        "max_grad_norm": 0.3,
        "lr_scheduler_type": "constant_with_warmup",
        "warmup_steps": 0.03,
    }
    return {
        "bf16": runtime.bf16_native,
        **fp16,
        **method,
        "optim": "paged_adamw_32bit",
        "activation_checkpointing": True,
        "activation_checkpointing_kwargs": {"use_reentrant": runtime.engine == "deepspeed_zero3"},
        **padding,
    }


# Published QLoRA recipes per method (docs/adoption.md names each source); the 4-bit setup above comes with each.
_ONLINE_RL = {  # Unsloth's QLoRA GRPO notebook (Llama 3.1 8B, load_in_4bit)
    "learning_rate": 5e-6, "adam_beta1": 0.9, "adam_beta2": 0.99, "weight_decay": 0.1,
    "lr_scheduler_type": "cosine", "warmup_steps": 0.1, "max_grad_norm": 0.1,
}
METHOD_RECIPES = {
    # alignment-handbook, recipes/zephyr-7b-beta/dpo/config_qlora.yaml
    "dpo": {"learning_rate": 5e-6, "beta": 0.01, "lr_scheduler_type": "cosine", "warmup_steps": 0.1},
    # TRL, trl/scripts/kto.py, its QLoRA command
    "kto": {"learning_rate": 5e-7, "lr_scheduler_type": "cosine", "warmup_steps": 0.1},
    # TRL, examples/scripts/reward_modeling.py, its LoRA command
    "reward": {"learning_rate": 1e-4},
    "grpo": _ONLINE_RL,
    "rloo": _ONLINE_RL,  # no published QLoRA RLOO recipe: GRPO's, the same family of online RL
}


# The field the Trainer reads -> its deprecated alias (the only name before transformers 5.24).
CHECKPOINTING_ALIASES = {"activation_checkpointing": "gradient_checkpointing",
                         "activation_checkpointing_kwargs": "gradient_checkpointing_kwargs"}


def _field(args, name: str) -> str | None:
    """The field to set for `name`: the one the Trainer reads (a plugin's defaults may use the deprecated name), or
    the older alias where this transformers has no such field; None if neither exists."""
    newer = {old: new for new, old in CHECKPOINTING_ALIASES.items()}.get(name)
    for candidate in (newer, name, CHECKPOINTING_ALIASES.get(name)):
        if candidate and hasattr(args, candidate):
            return candidate
    return None


def _class_default(args, name):
    for f in dataclasses.fields(type(args)):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
    return dataclasses.MISSING


def _normalised(value):
    return getattr(value, "value", value)


def user_set(args, name: str, explicit_names) -> bool:
    """True if the user chose this field (named it or its alias, or gave a non-default value through Python)."""
    if {name, CHECKPOINTING_ALIASES.get(name)} & set(explicit_names):
        return True
    default = _class_default(args, name)
    if name == "bf16" and default is None:  # TRL resolves bf16=None to `not fp16` in __post_init__
        default = not args.fp16
    if name == "pad_to_multiple_of" and default == "auto":  # TRL resolves "auto" to None off Neuron
        default = None if getattr(args, name, None) is None else default
    if name in CHECKPOINTING_ALIASES and default is None:  # __post_init__ resolves it from the alias's default
        default = _class_default(args, CHECKPOINTING_ALIASES[name])
        if default is None and name == "activation_checkpointing":
            default = False
    return default is not dataclasses.MISSING and _normalised(getattr(args, name, None)) != _normalised(default)


def apply_training_defaults(args, defaults: dict, explicit_names) -> dict:
    """Set each recipe default the user did not choose; returns what was applied."""
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    converters = {"lr_scheduler_type": SchedulerType, "optim": OptimizerNames}
    # bf16 and fp16 are one choice (mixed precision): when the user named either, neither default applies
    precision_chosen = any(user_set(args, name, explicit_names) for name in MIXED_PRECISION if hasattr(args, name))
    applied = {}
    for name, value in defaults.items():
        name = _field(args, name)
        if name is None or user_set(args, name, explicit_names):
            continue
        if name in MIXED_PRECISION and precision_chosen:
            continue
        setattr(args, name, converters[name](value) if name in converters else value)
        if hasattr(args, CHECKPOINTING_ALIASES.get(name, "")):
            setattr(args, CHECKPOINTING_ALIASES[name], getattr(args, name))  # the same object, as __post_init__
        applied[name] = value
    if any(name in applied for name in MIXED_PRECISION):
        _sync_mixed_precision(args)
    return applied


def _sync_mixed_precision(args) -> None:
    """`TrainingArguments.__post_init__` derives `mixed_precision` (what the Accelerator's autocast uses) from
    `bf16`; changing `bf16` afterwards must update it the same way, or bf16 autocast stays on."""
    import os

    if not hasattr(args, "mixed_precision"):
        return
    args.mixed_precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if args.fp16:
        args.mixed_precision = "fp16"
    elif args.bf16:
        args.mixed_precision = "bf16"
