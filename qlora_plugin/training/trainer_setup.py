"""What differs between the TRL trainers a strategy applies to (`trainer_kinds`), on the way in and after `__init__`.

Before the hooks run (`options_for_kind`, `check_kind_options`, `load_kwargs_for_kind`):
- a reward model is a one-output sequence-classification head on the base: loaded so, its adapter `SEQ_CLS` (peft
  then trains the `score` head in full and saves it with the adapter);
- `init_lora_weights auto` (the calibrated LoftQ start on a 4-bit base) per trainer, by whether its first
  training batches can feed the calibration and whether the start must be the reference:
  - reward: calibrated, on its own first batches: TRL's `DataCollatorForPreference` gives `input_ids` and
    `attention_mask` (the chosen and the rejected sequences as rows), what `calibration.first_batches` reads;
  - DPO, KTO, GRPO, RLOO: peft's zero start. They score against the base with the adapter disabled, which is the
    starting policy only when the adapter starts at zero; a LoftQ start would need TRL's `ref` adapter copy of it
    (a second adapter's memory and compute; plain `--init_lora_weights loftq` does that, made at `__init__`), and a
    calibrated start is computed after `__init__`, when that copy already holds peft's placeholder, so it is
    refused. GRPO/RLOO batches are raw prompts besides (the completions do not exist before the first step). The
    summary's LoRA init line says why (`note_zero_start`).

After `__init__` (`finish_trainer`):
- the resume and atomic-save wrappers on this trainer instance (`checkpointing.install`);
- TRL's DPO, KTO, GRPO and RLOO trainers, handed a PEFT model, add a frozen `ref` adapter copied from the starting
  adapter and score against it. From a zero start that copy adds nothing the disabled adapter does not give (and
  costs a second adapter's memory and compute), so it is removed: TRL then scores the reference with the adapter
  disabled. From a LoftQ start it is the starting policy, and stays.
- the optimizer for trainers whose `__init__` has no `optimizer_cls_and_kwargs` (DPO, KTO, GRPO, RLOO), set where
  `Trainer.create_optimizer` reads it.
"""

from __future__ import annotations

import dataclasses
import logging

from qlora_plugin.core.errors import QLoRAPluginError
from qlora_plugin.core.trainer_kinds import TrainerKind
from qlora_plugin.training.checkpointing import install as install_checkpointing

logger = logging.getLogger(__name__)

REFERENCE = "ref"  # the adapter name TRL gives the reference copy
ZERO_START_NOTE = "auto starts {name} from peft's zero adapter: {why}"
WHY_ZERO_START = "its reference is the base with the adapter disabled, the starting policy only from a zero start"


def options_for_kind(options, kind: TrainerKind, explicit_options: dict):
    """The run's options as this trainer needs them (explicit options always win)."""
    changes = {}
    if kind.sequence_classification and "lora_task_type" not in explicit_options:
        changes["lora_task_type"] = "SEQ_CLS"
    if kind.reference and options.init_lora_weights == "auto":
        changes["init_lora_weights"] = "default"
    return dataclasses.replace(options, **changes) if changes else options


def check_kind_options(options, kind: TrainerKind) -> None:
    """Options that cannot apply to this trainer: refused, never ignored."""
    if kind.name == "sft":
        return
    if options.init_lora_weights == "loftq_calibrated" and kind.reference:
        raise QLoRAPluginError(
            f"`init_lora_weights loftq_calibrated` cannot run under {kind.class_name}: it is computed when training "
            "starts, after TRL has copied the starting adapter as the reference. Use `--init_lora_weights loftq` "
            "(uncalibrated; TRL keeps it as the reference) or leave it at auto (peft's zero start)."
        )
    if options.memory_budget and kind.generates:
        raise QLoRAPluginError(
            f"`memory_budget` cannot size {kind.class_name}'s batches: its config bounds no prompt length (the "
            "prompts decide it), and the generation batch grows with it. Remove `--memory_budget`, plan with "
            f"`qlora-plugin plan MODEL --trainer {kind.name} --seq-len PROMPT_TOKENS`, and set "
            "`--per_device_train_batch_size` yourself."
        )
    if kind.sequence_classification and options.lora_task_type != "SEQ_CLS":
        raise QLoRAPluginError(
            f"`lora_task_type {options.lora_task_type}` contradicts {kind.class_name}: a reward model is a "
            "sequence-classification head. Use `--lora_task_type SEQ_CLS` or leave it unset."
        )


def load_kwargs_for_kind(init_kwargs: dict, kind: TrainerKind) -> dict:
    """`from_pretrained` kwargs for this trainer's model: a reward model is a one-output classifier (as TRL's
    RewardTrainer loads it)."""
    if not kind.sequence_classification:
        return init_kwargs
    from transformers import AutoModelForSequenceClassification

    return {"architecture": AutoModelForSequenceClassification, **init_kwargs, "num_labels": 1}


def init_method(model) -> str:
    """How the adapter started (`adapters.wrap_with_lora` records it on the model)."""
    return getattr(model, "qlora_lora_init", {}).get("method", "default")


def note_zero_start(model, kind: TrainerKind, auto_init: bool) -> None:
    """The summary's LoRA init line says why `auto` gave peft's zero start here."""
    facts = getattr(model, "qlora_lora_init", None)
    if auto_init and kind.reference and isinstance(facts, dict) and "note" not in facts:
        facts["note"] = ZERO_START_NOTE.format(name=kind.class_name, why=WHY_ZERO_START)


def reference_fact(kind: TrainerKind, ref_model, init_method: str, args) -> str | None:
    """What the summary says the reference policy is."""
    if not kind.reference:
        return None
    if getattr(args, "beta", None) == 0.0 and kind.generates:
        return "none: beta=0, no KL term (set --beta to score against the base with the adapter disabled)"
    if ref_model is not None:
        return "yours (the ref_model you passed)"
    if init_method == "loftq":
        return "a frozen copy of the LoftQ start adapter on the same 4-bit base (TRL's `ref` adapter)"
    return "the same base with the adapter disabled (no second copy of the model)"


def split_unaccepted(kwargs: dict, signature) -> tuple[dict, dict]:
    """The prepared kwargs this trainer's `__init__` takes, and those to set on it afterwards."""
    later = {name: kwargs.pop(name) for name in ("optimizer_cls_and_kwargs",)
             if name in kwargs and name not in signature.parameters}
    return kwargs, later


def finish_trainer(trainer, kind: TrainerKind, later: dict) -> None:
    """After the trainer's own `__init__`: checkpointing, the deferred arguments, and the reference adapter (module
    docstring)."""
    install_checkpointing(trainer)
    for name, value in later.items():
        setattr(trainer, name, value)
    model = trainer.model
    configs = getattr(model, "peft_config", None)
    if not kind.reference or not isinstance(configs, dict) or REFERENCE not in configs:
        return
    if init_method(model) == "loftq":
        return  # the copy is the starting policy; the disabled adapter is not
    model.delete_adapter(REFERENCE)
    logger.info("Removed TRL's `%s` adapter: the reference is the base with the adapter disabled.", REFERENCE)
