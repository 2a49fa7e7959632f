"""Before a run resumes: refuse a checkpoint it cannot continue, in one line, before training starts.

transformers' `Trainer` loads whatever `--resume_from_checkpoint` names: a LoRA (16-bit base) checkpoint into a
QLoRA run and the reverse without a word, a different `--lora_r` ends in a long size-mismatch traceback, a
truncated adapter or a garbage `trainer_state.json` in a library traceback, and a checkpoint without
`optimizer.pt`/`scheduler.pt` silently restarts the optimizer and the learning-rate schedule. Here each becomes a
`QLoRAPluginError` naming the mismatch or the bad file and the way out.

Two moments, the same comparisons:
- `check_before_load`: when the trainer is built, before the model loads. What the strategy options decide
  (4-bit or not, the LoRA rank and scaling when the strategy builds the adapter) and the files' integrity.
- `ResumeGuard.check`: in `train()`, against the loaded model (its quantization, its adapter's config and
  parameter shapes) and the optimizer files. Covers `trainer.train(resume_from_checkpoint=...)` and adapters
  the user configured.
"""

from __future__ import annotations

import json
import logging
import os
import struct

from transformers import TrainerCallback

from qlora_plugin.core.errors import QLoRAPluginError
from qlora_plugin.quant.backends import registered
from qlora_plugin.quant.record import RECORD_FILE, quantization_record

logger = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
TRAINER_STATE = "trainer_state.json"
SCHEDULER_FILE = "scheduler.pt"
QUANT_KEYS = ("quant_backend", "load_in_4bit", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant")
ADAPTER_KEYS = ("r", "lora_alpha", "use_dora", "use_rslora")
FLAG = {"r": "--lora_r", "lora_alpha": "--lora_alpha", "use_dora": "--use_dora", "use_rslora": "--use_rslora",
        "load_in_4bit": "--strategy", "quant_backend": "--strategy", "bnb_4bit_quant_type": "--bnb_4bit_quant_type",
        "bnb_4bit_use_double_quant": "--use_bnb_nested_quant"}
WAY_OUT = ("Resume with the settings the checkpoint was trained with, or start a new run (a fresh --output_dir, "
           "no --resume_from_checkpoint).")


def _bad(folder: str, name: str, what: str) -> QLoRAPluginError:
    return QLoRAPluginError(
        f"--resume_from_checkpoint {folder!r}: {name} {what}, so the checkpoint is damaged. Resume from an "
        "earlier checkpoint-N of the run, or start a new run (a fresh --output_dir, no --resume_from_checkpoint)."
    )


def check_trainer_state(folder: str) -> None:
    """`trainer_state.json` must be a JSON object with an integer `global_step` (what transformers reads first)."""
    state = _json(folder, TRAINER_STATE)
    step = state.get("global_step") if state else None
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise _bad(folder, TRAINER_STATE, "has no integer `global_step`")


def safetensors_shapes(path: str) -> dict[str, list[int]]:
    """Tensor shapes from a safetensors header, after checking the file holds all the bytes the header lists
    (reads the header only: a truncated or overwritten file is caught without loading it)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{size} bytes, shorter than a safetensors header")
        (length,) = struct.unpack("<Q", prefix)
        if length > size - 8:
            raise ValueError(f"its header claims {length} bytes, the file has {size}")
        header = json.loads(f.read(length))
    tensors = {k: v for k, v in header.items() if k != "__metadata__"} if isinstance(header, dict) else None
    if not tensors or not all(isinstance(v, dict) and len(v.get("data_offsets", ())) == 2 for v in tensors.values()):
        raise ValueError("its header lists no tensors")
    expected = 8 + length + max(v["data_offsets"][1] for v in tensors.values())
    if expected != size:
        raise ValueError(f"truncated: {size} of {expected} bytes" if size < expected
                         else f"{size} bytes where its header accounts for {expected}")
    return {k: list(v.get("shape", [])) for k, v in tensors.items()}


def _json(folder: str, name: str) -> dict | None:
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise _bad(folder, name, f"is not readable JSON ({err})") from None
    if not isinstance(value, dict):
        raise _bad(folder, name, "is not a JSON object")
    return value


def check_files(folder: str) -> dict[str, list[int]] | None:
    """The trainer state, the adapter's config and weights (when saved as a file) are intact; the adapter's
    tensor shapes, or None when the checkpoint holds no `adapter_model.safetensors` (e.g. FSDP shards)."""
    check_trainer_state(folder)
    config = _json(folder, ADAPTER_CONFIG)
    _json(folder, RECORD_FILE)
    path = os.path.join(folder, ADAPTER_WEIGHTS)
    if not os.path.isfile(path):
        if config is not None and not _other_weights(folder):
            raise _bad(folder, ADAPTER_WEIGHTS, f"is missing beside its {ADAPTER_CONFIG}")
        return None
    try:
        return safetensors_shapes(path)
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise _bad(folder, ADAPTER_WEIGHTS, f"is not a complete safetensors file ({err})") from None


def _other_weights(folder: str) -> bool:
    """Adapter weights in another form transformers also resumes from: `.bin`, FSDP's sharded folders, or one
    subfolder per adapter."""
    for name in os.listdir(folder):
        sub = os.path.join(folder, name)
        if name == "adapter_model.bin" or name.startswith("pytorch_model_fsdp") or (
                os.path.isdir(sub) and os.path.isfile(os.path.join(sub, ADAPTER_WEIGHTS))):
            return True
    return False


def _describe(key: str, value) -> str:
    if key == "load_in_4bit":
        return "a 4-bit base (--strategy qlora)" if value else "a 16-bit base (--strategy lora)"
    if key == "quant_backend":
        backend = registered().get(value)
        if backend is None:
            return "a 16-bit base (--strategy lora)"
        return f"{backend.article} {backend.label} base (--strategy {backend.strategy})"
    return f"{FLAG[key]} {value}"


def compare(folder: str, saved: dict | None, now: dict, keys) -> None:
    """Refuse the first of `keys` whose value in the checkpoint (`saved`) differs from this run's (`now`)."""
    if not saved:
        return  # not written by this plugin (or by an older version): nothing recorded to compare
    if saved.get("load_in_4bit") is False or now.get("load_in_4bit") is False:
        # no 4-bit settings to compare
        keys = [k for k in keys if k in ("quant_backend", "load_in_4bit") or k not in QUANT_KEYS]
    for key in keys:
        if key in saved and key in now and saved[key] != now[key]:
            raise QLoRAPluginError(
                f"--resume_from_checkpoint {folder!r} was trained with {_describe(key, saved[key])}; this run has "
                f"{_describe(key, now[key])}. {WAY_OUT}"
            )


def _adapter_settings(peft_config) -> dict:
    return {key: getattr(peft_config, key) for key in ADAPTER_KEYS if hasattr(peft_config, key)}


def check_before_load(folder: str | None, options, own_quantization: bool, own_adapter: bool) -> None:
    """The checks the strategy options decide, before any weight is read (the base's quantization when the
    strategy, not a config the user passed, quantizes it; the adapter's settings when the strategy builds it)."""
    if folder is None:
        return
    check_files(folder)
    if own_quantization:
        now = {"quant_backend": options.quant_backend, "load_in_4bit": options.load_in_4bit,
               "bnb_4bit_quant_type": options.bnb_4bit_quant_type,
               "bnb_4bit_use_double_quant": options.use_bnb_nested_quant}
        compare(folder, _json(folder, RECORD_FILE), now, QUANT_KEYS)
    if own_adapter:
        mine = {"r": options.lora_r, "lora_alpha": options.lora_alpha, "use_dora": options.use_dora,
                "use_rslora": options.use_rslora}
        compare(folder, _json(folder, ADAPTER_CONFIG), mine, ADAPTER_KEYS)


def _check_shapes(folder: str, saved: dict[str, list[int]], model) -> None:
    """Each saved adapter tensor has a parameter of the same name and shape (a different base or target set)."""
    from peft import get_peft_model_state_dict

    mine = {name: list(t.shape) for name, t in get_peft_model_state_dict(model).items()}
    missing = sorted(set(saved) - set(mine))
    wrong = sorted(n for n in saved if n in mine and saved[n] != mine[n])
    if missing or wrong:
        name = (missing or wrong)[0]
        what = (f"{name} has shape {saved[name]}, this model's {mine[name]}" if not missing
                else f"{name} has no counterpart in this model's adapter")
        raise QLoRAPluginError(
            f"--resume_from_checkpoint {folder!r} holds an adapter that does not fit this run's "
            f"({len(missing) + len(wrong)} of {len(saved)} tensors differ; {what}): it was trained on another base "
            f"model, other --lora_target_modules or another rank. {WAY_OUT}"
        )


def has_optimizer_state(folder: str) -> bool:
    """What transformers' `_load_optimizer_and_scheduler` looks for: `optimizer.pt`/`.bin` or an `optimizer*`
    folder (FSDP sharded state)."""
    names = os.listdir(folder)
    return any(n in ("optimizer.pt", "optimizer.bin") or (n.startswith("optimizer")
                                                          and os.path.isdir(os.path.join(folder, n))) for n in names)


def missing_optimizer_files(folder: str, deepspeed: bool) -> list[str]:
    """Optimizer and scheduler files a checkpoint lacks (DeepSpeed keeps its optimizer in `global_step*/`)."""
    missing = []
    if deepspeed:
        if not any(n.startswith("global_step") for n in os.listdir(folder)):
            missing.append("global_step*/ (DeepSpeed's optimizer state)")
    elif not has_optimizer_state(folder):
        missing.append("optimizer.pt")
    if not os.path.isfile(os.path.join(folder, SCHEDULER_FILE)):
        missing.append(SCHEDULER_FILE)
    return missing


class ResumeGuard(TrainerCallback):
    """Carries the run's resume settings to `train()` (found on the trainer by type), where `check` runs."""

    def __init__(self, accept_missing_optimizer: bool = False):
        self.accept_missing_optimizer = accept_missing_optimizer

    def check(self, folder: str | None, trainer) -> None:
        """Against the loaded model: quantization, the adapter's settings and shapes, and the optimizer files."""
        if folder is None:
            return
        shapes = check_files(folder)
        model = trainer.model
        compare(folder, _json(folder, RECORD_FILE), quantization_record(model), QUANT_KEYS)
        peft_config = getattr(model, "peft_config", None)
        if peft_config:
            active = getattr(model, "active_adapter", None)
            active = active if isinstance(active, str) and active in peft_config else next(iter(peft_config))
            compare(folder, _json(folder, ADAPTER_CONFIG), _adapter_settings(peft_config[active]), ADAPTER_KEYS)
            if shapes is not None and not (trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled):
                _check_shapes(folder, shapes, model)
        self._check_optimizer(folder, trainer.is_deepspeed_enabled)

    def _check_optimizer(self, folder: str, deepspeed: bool) -> None:
        missing = missing_optimizer_files(folder, deepspeed)
        if not missing:
            return
        what = (f"--resume_from_checkpoint {folder!r} has no {' or '.join(missing)}: the optimizer and the "
                "learning-rate schedule would start over (Adam moments lost, warmup repeated) while the adapter "
                "and step continue")
        if not self.accept_missing_optimizer:
            raise QLoRAPluginError(
                f"{what}. Resume from a checkpoint-N that has them, or pass --resume_without_optimizer true to "
                "accept the restart."
            )
        logger.warning("[qlora-plugin] WARNING: %s (accepted by --resume_without_optimizer).", what)
