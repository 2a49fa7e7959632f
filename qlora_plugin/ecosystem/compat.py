"""Every version-dependent or private access to transformers, TRL, peft, accelerate and bitsandbytes, and the check
that the installed releases are ones this package supports.

Why one module: the plugin patches Trainer internals and reads library internals that carry no compatibility
promise. Each such access is named here, with the releases where it was checked (the floor set of `make
test-floor` and the newest set of `make test`; README, "Supported versions") and what happens when it is missing,
so a new upstream release is checked in one file, and a break ends in one line instead of a traceback from deep
inside a patch.

The supported range is the package's own declared dependencies (pyproject.toml, read back from the installed
metadata): one source of truth for pip, CI and this check. `check_at_activation` runs only when a strategy is
requested; without one nothing here is called and TRL runs as it is.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import pathlib
import re

from qlora_plugin.core.errors import QLoRAPluginError

DISTRIBUTION = "qlora-plugin"
LIBRARIES = ("torch", "transformers", "accelerate", "trl", "peft", "bitsandbytes", "datasets")
_PYPROJECT = pathlib.Path(__file__).resolve().parent.parent / "pyproject.toml"  # a source checkout, not installed


# --- Which releases are supported -------------------------------------------------------------------------------

def installed_version(name: str) -> str | None:
    """The installed release of `name`, or None when it is not installed."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def supported_ranges() -> dict[str, str]:
    """{library: specifier} for the libraries in LIBRARIES, as this package declares them (`>=5.17`): from the
    installed metadata, or pyproject.toml when running from a source checkout that is not installed."""
    try:
        declared = importlib.metadata.requires(DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        declared = _pyproject_dependencies()
    ranges = {}
    for requirement in declared:
        match = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*([^;]*?)\s*(;.*)?", requirement)
        if match and not match.group(3) and match.group(1).lower() in LIBRARIES:
            ranges[match.group(1).lower()] = match.group(2).replace(" ", "")
    return ranges


def _pyproject_dependencies() -> list[str]:
    if not _PYPROJECT.is_file():
        return []
    import tomllib

    return tomllib.loads(_PYPROJECT.read_text())["project"]["dependencies"]


def version_report(version=None) -> list[tuple[str, str | None, str, bool]]:
    """(library, installed release or None, supported range, whether it is supported) for each library;
    `version(name)` looks a release up (default: `installed_version`)."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    version = version or installed_version
    rows = []
    for name, spec in supported_ranges().items():
        found = version(name)
        try:
            ok = found is not None and SpecifierSet(spec).contains(Version(found), prereleases=True)
        except InvalidVersion:
            ok = False
        rows.append((name, found, spec, ok))
    return rows


def unsupported_line(name: str, found: str | None, spec: str, why: str = "") -> str:
    """The one line for a library outside the supported range, or (`why`) a release inside it that lacks what the
    plugin needs: then the fix is a release below that one (or a qlora-plugin that knows it)."""
    if found is None:
        return f"{name} is not installed; qlora-plugin needs {name}{spec}. Fix: pip install '{name}{spec}'"
    if why:
        below = re.match(r"[0-9.]*[0-9]", found).group(0) if re.match(r"[0-9]", found) else found
        return (f"{name} {found} is not supported by qlora-plugin ({why}); supported: {name}{spec}. Fix: pip "
                f"install '{name}{spec},<{below}', or a qlora-plugin release that supports {name} {found}")
    return f"{name} {found} is not supported by qlora-plugin; supported: {name}{spec}. Fix: pip install '{name}{spec}'"


def check_versions(version=None) -> None:
    """Raise one `QLoRAPluginError` line for the first library outside its supported range."""
    for name, found, spec, ok in version_report(version):
        if not ok:
            raise QLoRAPluginError(unsupported_line(name, found, spec))


def _broken(library: str, what: str) -> QLoRAPluginError:
    spec = supported_ranges().get(library, "")
    return QLoRAPluginError(unsupported_line(library, installed_version(library), spec, f"{what} is missing"))


# --- The internals the patches rely on, checked at activation ---------------------------------------------------
# (library, module, attribute path or "", what breaks without it). All present in transformers 5.17 and 5.25, TRL
# 1.8, 1.9, 1.10, 1.11, 1.12 and 1.16, peft 0.18, 0.19 and 0.21, bitsandbytes 0.49 and 0.50. Missing: the activation
# check ends the run with `unsupported_line` (a newer release renamed it), before any patch is installed.
INTERNALS = (
    ("transformers", "transformers.trainer", "Trainer._save_checkpoint", "atomic checkpoints, stop on a signal"),
    ("transformers", "transformers.trainer", "Trainer._get_output_dir", "atomic checkpoints"),
    ("transformers", "transformers.trainer", "Trainer._save", "the final adapter under FSDP"),
    ("transformers", "transformers.hf_argparser", "HfArgumentParser.parse_dict", "TRL fields for the script"),
    ("transformers", "transformers.modeling_utils", "PreTrainedModel._from_config", "the quantized-base cache"),
    ("transformers", "transformers.models.auto.modeling_auto", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
     "which model a script loads"),
    ("transformers", "transformers.quantizers.base", "HfQuantizer.get_modules_to_not_convert",
     "which layers are 4-bit"),
    ("transformers", "transformers.quantizers.quantizers_utils", "should_convert_module", "which layers are 4-bit"),
    ("trl", "trl.trainer.sft_trainer", "SFTTrainer", "the strategy's trainer arguments"),
    ("trl", "trl.trainer.base_trainer", "_BaseTrainer", "refusing the trainers a strategy does not apply to"),
    ("trl", "trl.scripts.utils", "TrlParser.set_defaults_with_config", "the plugin's YAML keys"),
    ("trl", "trl.trainer.utils", "create_model_from_path", "TRL's own model loading"),
    ("peft", "peft.tuners.lora", "Linear4bit", "LoRA on 4-bit layers"),  # peft defines it only with bitsandbytes
    ("bitsandbytes", "bitsandbytes.nn.modules", "fix_4bit_weight_quant_state_from_module", "the 4-bit matmul paths"),
    ("bitsandbytes", "bitsandbytes.optim.optimizer", "Optimizer8bit.get_state_buffer", "resuming paged optimizers"),
)


NEEDS_BITSANDBYTES = ("peft.tuners.lora.Linear4bit",)  # present only where bitsandbytes imports


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except Exception:  # noqa: BLE001 - a broken install counts as absent
        return False
    return True


def check_internals() -> None:
    """Raise one `QLoRAPluginError` line for the first internal in INTERNALS that the installed release lacks.
    Where bitsandbytes itself cannot be imported, its internals (and peft's that need it) are not judged here: the
    4-bit strategy then stops with its own message, which names the install (`quant/config.py`), and the 16-bit
    strategy does not need them."""
    bitsandbytes = _importable("bitsandbytes")
    for library, module_name, path, what in INTERNALS:
        if not bitsandbytes and (library == "bitsandbytes" or f"{module_name}.{path}" in NEEDS_BITSANDBYTES):
            continue
        try:
            target = importlib.import_module(module_name)
            for part in filter(None, path.split(".")):
                target = getattr(target, part)
        except (ImportError, AttributeError):
            raise _broken(library, f"`{module_name}{'.' + path if path else ''}`, needed for {what},") from None


def check_at_activation() -> None:
    """Called only when a strategy is requested, before anything is patched: supported releases, then internals."""
    check_versions()
    check_internals()


# --- transformers ----------------------------------------------------------------------------------------------

# `AutoModelForCausalLM.from_pretrained` calls the concrete class's `from_pretrained` with `_from_auto=True`
# (transformers 5.17-5.25, auto_factory.py). Missing in a later release: the concrete call is taken for a script's
# own load, and `integration.state.claim_model` (one load per process) still keeps it to one load.
FROM_AUTO_KWARG = "_from_auto"


def loaded_through_auto(kwargs: dict) -> bool:
    """Whether a concrete class's `from_pretrained` was called by `AutoModelForCausalLM.from_pretrained`."""
    return bool(kwargs.get(FROM_AUTO_KWARG))


# `Trainer._save_checkpoint(model, trial)`: where a scheduled checkpoint is written (transformers 5.17-5.25; TRL's
# trainers override it and call it; checked at activation). The one Trainer method the plugin wraps (on the
# strategy's trainer instance, `training.checkpointing`) through a private name.
SAVE_CHECKPOINT_METHOD = "_save_checkpoint"


def trainer_output_dir(trainer, trial=None) -> str:
    """The run folder `Trainer._save_checkpoint` saves `checkpoint-N` into (`Trainer._get_output_dir`,
    transformers 5.17-5.25; checked at activation)."""
    return trainer._get_output_dir(trial=trial)


def redirect_output_dir(trainer, folder: str) -> None:
    """Make this trainer's `_save_checkpoint` write `checkpoint-N` under `folder` (an instance attribute over the
    class's `_get_output_dir`; `restore_output_dir` removes it)."""
    trainer._get_output_dir = lambda trial=None: folder


def restore_output_dir(trainer) -> None:
    del trainer._get_output_dir


def save_checkpoint(trainer) -> None:
    """`Trainer._save_checkpoint(model, trial=None)` (transformers 5.17-5.25; checked at activation): a checkpoint
    now, with the optimizer, scheduler and RNG states a resume needs."""
    trainer._save_checkpoint(trainer.model, trial=None)


def trainer_save(trainer, output_dir: str, state_dict: dict) -> None:
    """`Trainer._save(output_dir, state_dict=...)` (transformers 5.17-5.25; checked at activation): the model's
    `save_pretrained` (peft: the adapter only) with a given state dict, plus the tokenizer and training args."""
    trainer._save(output_dir, state_dict=state_dict)


def model_from_config(architecture, config, dtype):
    """`architecture._from_config(config, dtype=...)`: the model class TRL will load, without the Auto class's
    mapping (transformers 5.17-5.25). Missing: None, and the caller uses `AutoModelForCausalLM.from_config`."""
    build = getattr(architecture, "_from_config", None)
    return None if build is None else build(config, dtype=dtype)


def keep_in_fp32_modules(model):
    """The model class's `_keep_in_fp32_modules` (transformers 5.17-5.25; None on most architectures), which
    transformers' 4-bit rule leaves unquantized. Missing: None (no module kept in fp32)."""
    return getattr(model, "_keep_in_fp32_modules", None)


def config_source(config) -> tuple[str, str | None]:
    """(`config._name_or_path`, `config._commit_hash`): where a config was loaded from, and the Hub commit when
    it came from the Hub (transformers 5.17-5.25). Missing commit: None (the newest files are read)."""
    return config._name_or_path, getattr(config, "_commit_hash", None)


# --- TRL -------------------------------------------------------------------------------------------------------

# TRL 1.x vendors its own copy of `HfArgumentParser` as the base of `TrlParser` (TRL 1.8-1.16). Missing in a
# later release (TrlParser back on transformers' class): nothing is watched there, transformers' class is.
TRL_VENDORED_PARSER_MODULE = "trl.scripts._hf_argparser"


# `trl.trainer.base_trainer._BaseTrainer`: the base class of every TRL trainer (TRL 1.8-1.16; checked at
# activation), whose `__new__` refuses the trainers a strategy cannot apply to whole (`integration.trl_patches`).
TRL_BASE_TRAINER = "_BaseTrainer"


# --- bitsandbytes ----------------------------------------------------------------------------------------------

def fsdp_wrapped_quant_state_key(optimizer) -> str | None:
    """The key under which bitsandbytes' optimizers nest a parameter's state under FSDP
    (`Optimizer8bit._FSDP_WRAPPED_QUANT_STATE_KEY`, bitsandbytes 0.50). Missing: None, no nested state."""
    return getattr(optimizer, "_FSDP_WRAPPED_QUANT_STATE_KEY", None)


def fix_4bit_quant_state(layer) -> None:
    """bitsandbytes' `fix_4bit_weight_quant_state_from_module` (0.50; checked at activation): puts back a weight's
    quant state that FSDP or a copy dropped, as `Linear4bit.forward` does first."""
    from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

    fix_4bit_weight_quant_state_from_module(layer)


def prepare_4bit_call(layer, x):
    """What bitsandbytes' `Linear4bit.forward` does before its matmul (bitsandbytes 0.49-0.50, nn/modules.py): the
    weight's quant state put back (`fix_4bit_quant_state`), the compute dtype set from the first input
    (`compute_type_is_set`, `set_compute_type`). Returns (quant state, compute dtype), or None for a weight
    repacked for bitsandbytes' CPU kernel (`packing_format_for_cpu`), which only its own forward runs."""
    fix_4bit_quant_state(layer)
    quant_state = layer.weight.quant_state
    if getattr(quant_state, "packing_format_for_cpu", False):
        return None
    if not layer.compute_type_is_set:
        layer.set_compute_type(x)
        layer.compute_type_is_set = True
    return quant_state, layer.compute_dtype or x.dtype


def undo_cpu_weight_packing(layer) -> None:
    """Undo bitsandbytes' AVX512-BF16 repacking of a `Linear4bit` weight (`_convert_weight_packed_for_cpu_inverse`,
    bitsandbytes 0.50). Only a release that repacks can have a repacked layer; one that repacks without the inverse
    gets the one-line error (merging and training a repacked weight would be wrong)."""
    try:
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse
    except ImportError:
        raise _broken("bitsandbytes", "`bitsandbytes.functional._convert_weight_packed_for_cpu_inverse`") from None
    weight = layer.weight
    weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
    layer.quant_state = weight.quant_state
