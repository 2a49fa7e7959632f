"""Strategy options: the one source of truth for the CLI flags, YAML keys, Python API and docs reference.

Field names are TRL's own `ModelConfig` names wherever TRL has one (`lora_r`, `use_bnb_nested_quant`, ...), so a
user's existing flags keep their meaning. Defaults are the QLoRA paper's recipe; `None` means "decided at load
time from the model and the device" (see `resolve`). A strategy may change these defaults (e.g. `lora` turns
quantization off); anything the user sets explicitly always wins.

Plugins add options of their own through the `qlora_register_options` hook (`PluginOption`): a run's options are
then an instance of `options_class(extra)`, a subclass of `StrategyOptions` with one more field per plugin option,
validated the same way (type, choices) and reaching the same places (flags, YAML, `QLORA_PLUGIN_OPTIONS`, the
Python API's `options`, `qlora-plugin options` and `strategies`, `options.NAME` in every hook).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from qlora_plugin.core.errors import QLoRAPluginError
from qlora_plugin.core.sizes import parse_memory

DTYPE_CHOICES = ("auto", "bfloat16", "float16", "float32")
INIT_CHOICES = ("auto", "loftq_calibrated", "loftq", "default", "gaussian")
STORAGE_CHOICES = ("auto", "uint8", "bfloat16", "float16", "float32")


@dataclass
class StrategyOptions:
    """Options every strategy understands. Each field is a `--flag` and a YAML key of the same name."""

    load_in_4bit: bool = field(
        default=True,
        metadata={"help": "Store the frozen base's linear layers in bitsandbytes 4-bit. Set by the strategy."},
    )
    quant_backend: str | None = field(
        default=None,
        metadata={
            "help": "How the frozen base is quantized: bnb_4bit (bitsandbytes NF4/FP4, the qlora strategy's), "
            "bnb_int8 (bitsandbytes LLM.int8(), the lora-int8 strategy's) or none (16-bit). Default: bnb_4bit when "
            "load_in_4bit is on, else none. Set by the strategy; naming a backend sets load_in_4bit to match.",
            "choices": ["bnb_4bit", "bnb_int8", "none"],
        },
    )
    bnb_4bit_quant_type: str = field(
        default="nf4",
        metadata={"help": "4-bit data type: nf4 (NormalFloat, the paper's) or fp4.", "choices": ["nf4", "fp4"]},
    )
    use_bnb_nested_quant: bool = field(
        default=True,
        metadata={"help": "Double quantization: quantize the quantization constants (4.127 instead of 4.5 bits)."},
    )
    bnb_4bit_compute_dtype: str = field(
        default="auto",
        metadata={
            "help": "dtype of the 4-bit matmuls. auto: bfloat16 where the device runs it natively; float16 on CUDA "
            "GPUs without it (compute capability below 8.0: T4, V100), with fp32 adapters and fp16 mixed precision; "
            "else float32.",
            "choices": list(DTYPE_CHOICES),
        },
    )
    bnb_4bit_quant_storage: str = field(
        default="auto",
        metadata={
            "help": "dtype the packed 4-bit weights are stored in. auto: uint8, or the model dtype under FSDP and "
            "DeepSpeed ZeRO-3 (which require it).",
            "choices": list(STORAGE_CHOICES),
        },
    )
    quantized_cache: bool = field(
        default=True,
        metadata={
            "help": "Quantize the base once (a local folder, or a Hub model already in the Hugging Face cache) and "
            "load the cached 4-bit copy on later runs (seconds instead of minutes, never holding the 16-bit "
            "weights). Folder: $QLORA_PLUGIN_CACHE_DIR, else ~/.cache/qlora_plugin. Keyed on the files' identity "
            "(sizes, times, inodes, safetensors headers, the Hub commit) and the quantization settings; each entry "
            "is checked against the digests recorded when it was written, and rebuilt if damaged. The calibrated "
            "LoRA start is cached beside it (same base, adapter and first training batches)."
        },
    )
    release_memory_after_load: bool = field(
        default=True,
        metadata={
            "help": "When training starts, return the memory that loading freed to the operating system "
            "(glibc malloc_trim; the process otherwise keeps it for the whole run)."
        },
    )
    # read at `import trl`, before any plugin loads (the re-execution comes first): so a built-in option
    cpu_malloc_tunables: bool = field(
        default=False,
        metadata={
            "help": "Opt-in. On CPU-only runs under glibc (Linux), re-execute the script once at `import trl` with "
            "GLIBC_TUNABLES set so freed tensor blocks merge instead of fragmenting the heap (small-block caches off, "
            "512 MiB kept at the heap top: about a third lower peak, steps as fast; docs/benchmarks.md). The script "
            "then runs again from its start, so whatever it does before importing trl happens twice: "
            "`qlora-plugin run -- COMMAND` starts the command with the settings instead, once. Your own "
            "GLIBC_TUNABLES malloc settings win."
        },
    )
    reuse_dequantized_weights: bool = field(
        default=False,
        metadata={
            "help": "Under gradient checkpointing, keep each 4-bit weight dequantized by the recomputation for the "
            "backward that follows (2 dequantizations per layer per step instead of 3; bit-identical). Costs one "
            "block's weights in the compute dtype. CPU only (measured there; on GPUs it has no effect)."
        },
    )
    lora_r: int = field(default=64, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float | None = field(
        default=None,
        metadata={"help": "LoRA dropout. Default: 0.1, or 0.05 for models above 20B parameters."},
    )
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"],
        metadata={
            "help": "Module names to adapt, or all-linear: every linear layer of the transformer blocks, not lm_head."
        },
    )
    lora_modules_to_save: list[str] | None = field(
        default=None,
        metadata={"help": "Modules trained in full and saved with the adapter (e.g. embed_tokens lm_head)."},
    )
    use_dora: bool = field(default=False, metadata={"help": "Weight-decomposed LoRA (DoRA)."})
    use_rslora: bool = field(default=False, metadata={"help": "Rank-stabilised LoRA scaling (alpha / sqrt(r))."})
    init_lora_weights: str = field(
        default="auto",
        metadata={
            "help": "How the adapter starts. loftq: at the best rank-r correction of each 4-bit layer's quantization "
            "error (LoftQ; reads the base's 16-bit safetensors once), so training starts closer to the 16-bit model; "
            "loftq_calibrated: the same correction, weighted by each layer's inputs on the first 16 training "
            "examples (computed when training starts); default: peft's (A random, B zero: the 4-bit model "
            "unchanged); gaussian: peft's gaussian A. auto: loftq_calibrated on a 4-bit base (plain loftq under "
            "DeepSpeed ZeRO-1/2; not with DoRA or under FSDP/ZeRO-3), else default (docs/benchmarks.md).",
            "choices": list(INIT_CHOICES),
        },
    )
    lora_task_type: str = field(default="CAUSAL_LM", metadata={"help": "PEFT task type of the adapter."})
    memory_budget: str | None = field(
        default=None,
        metadata={
            "help": "Fit the run to this much memory per device (e.g. 22GiB, 24GB, a GPU name such as t4, or auto): "
            "the largest per-device train batch the plan predicts to fit, with gradient accumulation keeping your "
            "effective batch, and the eval batch likewise. Batch sizes you set are checked instead (docs/plan.md)."
        },
    )
    strict_budget: bool = field(
        default=False,
        metadata={"help": "With memory_budget: refuse (instead of warning about) batch sizes you set that the plan "
                          "predicts to exceed the budget."},
    )
    resume_without_optimizer: bool = field(
        default=False,
        metadata={"help": "Let --resume_from_checkpoint continue from a checkpoint without optimizer.pt or "
                          "scheduler.pt (refused by default): the optimizer and learning-rate schedule then start "
                          "over (Adam moments lost, warmup repeated); the adapter, step and data position are kept."},
    )

    plugin_options = {}  # class attribute, not a field: {name: PluginOption} on a class with plugin options

    def __post_init__(self):
        if isinstance(self.lora_target_modules, str):
            self.lora_target_modules = [self.lora_target_modules]
        if isinstance(self.lora_modules_to_save, str):
            self.lora_modules_to_save = [self.lora_modules_to_save]
        _check_types(self)
        for name, allowed in (
            ("bnb_4bit_quant_type", ("nf4", "fp4")),
            ("bnb_4bit_compute_dtype", DTYPE_CHOICES),
            ("bnb_4bit_quant_storage", STORAGE_CHOICES),
            ("init_lora_weights", INIT_CHOICES),
        ):
            if getattr(self, name) not in allowed:
                raise QLoRAPluginError(
                    f"`{name}` must be one of {', '.join(allowed)}; got {getattr(self, name)!r}."
                )
        if self.quant_backend is None:
            self.quant_backend = "bnb_4bit" if self.load_in_4bit else "none"
        elif self.load_in_4bit != (self.quant_backend == "bnb_4bit"):
            raise QLoRAPluginError(
                f"`load_in_4bit` {str(self.load_in_4bit).lower()} contradicts `quant_backend` {self.quant_backend}: "
                "name one of them (quant_backend bnb_4bit is load_in_4bit true)."
            )
        if not isinstance(self.lora_r, int) or isinstance(self.lora_r, bool) or self.lora_r < 1:
            raise QLoRAPluginError(f"`lora_r` must be a positive integer (e.g. 64); got {self.lora_r!r}.")
        if not isinstance(self.lora_alpha, (int, float)) or self.lora_alpha <= 0:
            raise QLoRAPluginError(f"`lora_alpha` must be a positive number (e.g. 16); got {self.lora_alpha!r}.")
        if self.lora_dropout is not None and not (0.0 <= float(self.lora_dropout) < 1.0):
            raise QLoRAPluginError(f"`lora_dropout` must be in [0, 1); got {self.lora_dropout!r}.")
        if self.memory_budget is not None and self.memory_budget != "auto":
            parse_memory(self.memory_budget, "--memory_budget")
        if not self.lora_target_modules or not all(isinstance(m, str) and m for m in self.lora_target_modules):
            raise QLoRAPluginError(
                "`lora_target_modules` must name at least one module (or `all-linear`); "
                f"got {self.lora_target_modules!r}."
            )


OPTION_NAMES = tuple(f.name for f in dataclasses.fields(StrategyOptions))  # the built-in options
# Options that act on 4-bit layers only: meaningless for a strategy that loads a 16-bit base (`load_in_4bit` off).
# `bnb_4bit_compute_dtype` is not one of them: it also picks the 16-bit load dtype.
FOUR_BIT_OPTIONS = ("bnb_4bit_quant_type", "use_bnb_nested_quant", "bnb_4bit_quant_storage", "quantized_cache",
                    "cpu_dequant_buffer", "reuse_dequantized_weights")  # cpu_dequant_buffer: cpu/dequant_buffer.py
HOOKS_KEY = "qlora_hooks"  # hook files or packaged hook names, on the command line and in YAML
# TRL ModelConfig flags a strategy answers for: `use_peft` is implied, `load_in_8bit` is refused with every strategy
# (each picks its base: `quant_backend`; the one check is `quant.backends.registry.check_asked_quantization`).
TRL_ANSWERED_FLAGS = ("use_peft", "load_in_8bit")
OWN_KEYS = frozenset(("strategy", HOOKS_KEY, *OPTION_NAMES, *TRL_ANSWERED_FLAGS))  # taken out of the script's argv

_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _accepts(annotation, value) -> bool:
    """Does `value` have the type `annotation` (bool, int, float, str, list[...], X | None) says? No coercion."""
    import typing

    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is list:
        return isinstance(value, list) and all(_accepts(args[0], v) for v in value)
    if args:  # X | None
        return any(_accepts(a, value) for a in args)
    if annotation is type(None):
        return value is None
    if annotation in (int, float):
        return isinstance(value, (int, float) if annotation is float else int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def _kind(annotation) -> str:
    import typing

    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is list:
        return "a list of strings"
    return _kind(args[0]) if args else _KINDS[annotation]


def _check_types(options: StrategyOptions) -> None:
    """Each value has its field's type (a YAML `lora_r: eight` or `use_dora: 3` is refused, not coerced)."""
    import typing

    for name, annotation in typing.get_type_hints(type(options)).items():
        value = getattr(options, name)
        if not _accepts(annotation, value):
            raise QLoRAPluginError(f"`{name}` must be {_kind(annotation)}; got {value!r} ({type(value).__name__}).")


@dataclass(frozen=True)
class PluginOption:
    """One option a plugin adds (`qlora_register_options`): a `--name` flag, a YAML key and `options.name`."""

    name: str
    type: type
    default: object
    help: str
    choices: tuple = ()
    plugin: str = ""


OPTION_TYPES = (bool, int, float, str)


def check_plugin_option(option: PluginOption, taken) -> None:
    """A plugin's option is refused, naming the plugin, unless it is a new lowercase identifier (not a built-in
    option, a flag of the plugin's own, or another plugin's), of a type in OPTION_TYPES, with a default of that type
    (or None) among its choices, and a help text."""
    where = f"Plugin {option.plugin} registers option {option.name!r}"
    if not (isinstance(option.name, str) and option.name.isidentifier() and option.name == option.name.lower()):
        raise QLoRAPluginError(f"{where}: an option name must be a lowercase identifier such as `my_feature`.")
    if option.name in OWN_KEYS:
        raise QLoRAPluginError(f"{where}, which qlora-plugin already defines. Give the option a name of its own.")
    if option.name in taken:
        raise QLoRAPluginError(f"Plugins {taken[option.name]} and {option.plugin} both register option "
                               f"{option.name!r}. Uninstall one, or rename its option.")
    if option.type not in OPTION_TYPES:
        raise QLoRAPluginError(f"{where} of type {option.type!r}; allowed: bool, int, float, str.")
    if not isinstance(option.help, str) or not option.help.strip():
        raise QLoRAPluginError(f"{where} without a help text; say what it does and when (docs/options.md).")
    if option.default is not None and not _accepts(option.type, option.default):
        raise QLoRAPluginError(f"{where} with default {option.default!r}, not {_kind(option.type)}.")
    if option.choices and option.default not in option.choices:
        raise QLoRAPluginError(f"{where} with default {option.default!r}, not one of its choices {option.choices}.")


_CLASSES: dict = {}


def options_class(extra: tuple = ()) -> type:
    """`StrategyOptions`, or a subclass with one field per plugin option in `extra` (one class per set of options,
    so options of one run compare and `dataclasses.replace` as the built-in ones do)."""
    if not extra:
        return StrategyOptions
    key = tuple(extra)
    if key not in _CLASSES:
        # metadata as the built-in fields hold it (HfArgumentParser passes it to argparse); the plugins on the class
        fields = [(o.name, o.type if o.default is not None else o.type | None,
                   field(default=o.default, metadata={"help": o.help, **({"choices": list(o.choices)}
                                                                         if o.choices else {})}))
                  for o in extra]
        _CLASSES[key] = dataclasses.make_dataclass("StrategyOptions", fields, bases=(StrategyOptions,), namespace={
            "__module__": __name__, "plugin_options": {o.name: o for o in extra}})
    return _CLASSES[key]


def option_names(extra: tuple = ()) -> tuple:
    """Every option a run with these plugin options understands."""
    return (*OPTION_NAMES, *(o.name for o in extra))


def _check_choices(options: StrategyOptions) -> None:
    """Plugin options with choices hold one of them (the built-in ones are checked in `__post_init__`)."""
    for name, option in type(options).plugin_options.items():
        if option.choices and getattr(options, name) not in option.choices:
            raise QLoRAPluginError(f"`{name}` must be one of {', '.join(map(str, option.choices))}; got "
                                   f"{getattr(options, name)!r}.")


def build_options(strategy_defaults: dict, explicit: dict, extra: tuple = ()) -> StrategyOptions:
    """Options for one run: dataclass defaults, then the strategy's defaults, then what the user set. `extra`: the
    plugin options the run's manager registered (`plugin.manager.collect_options`)."""
    names = option_names(extra)
    unknown = sorted(map(str, set(explicit) - set(names)))
    if unknown:
        import difflib

        close = [m for name in unknown for m in difflib.get_close_matches(name, names, n=1, cutoff=0.75)]
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise QLoRAPluginError(
            f"Unknown strategy option(s): {', '.join(unknown)}.{hint} Allowed: {', '.join(names)}."
        )
    values = {**strategy_defaults, **explicit}
    if "quant_backend" in explicit and "load_in_4bit" not in explicit:  # the user's backend wins over the preset
        values["load_in_4bit"] = explicit["quant_backend"] == "bnb_4bit"
    elif "load_in_4bit" in explicit and "quant_backend" not in explicit:
        values["quant_backend"] = None  # derived from the user's load_in_4bit
    try:
        options = options_class(extra)(**values)
    except TypeError as err:  # a value of the wrong type from YAML or Python
        raise QLoRAPluginError(f"Invalid strategy option: {err}") from None
    _check_choices(options)
    return options


def option_defaults(extra: tuple = ()) -> dict:
    """{name: default} of every option, built-in then plugin options."""
    return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
            for f in dataclasses.fields(options_class(extra))}


def options_reference_markdown(extra: tuple = ()) -> str:
    """The options table in docs/options.md, generated from the dataclass and the plugin options `extra` (a test
    keeps the docs in step)."""
    rows = ["| option (flag / YAML key) | default | meaning |", "|---|---|---|"]
    cls = options_class(extra)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        choices = f.metadata.get("choices")
        plugin = cls.plugin_options[f.name].plugin if f.name in cls.plugin_options else None
        meaning = f.metadata["help"] + (f" Choices: {', '.join(choices)}." if choices else "") + \
            (f" (plugin `{plugin}`)" if plugin else "")
        rows.append(f"| `{f.name}` | `{default}` | {meaning} |")
    return "\n".join(rows) + "\n"
