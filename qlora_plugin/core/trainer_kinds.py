"""The TRL trainers a strategy applies to, whole: what differs between them is named here, once.

Why a closed list: a strategy is applied whole or refused (never half: a 4-bit base with torch's AdamW and no
summary). Each trainer below was read and run with the strategy (tests/test_trainers.py); any other TRL trainer,
TRL's experimental ones included, is refused before it reads a weight (`integration.trl_patches`).

- `reference`: the method scores against a frozen reference policy. Under a strategy it is the 4-bit base with the
  adapter disabled (TRL's own path for a PEFT model), never a second copy of the model.
- `sequence_classification`: the model is a one-output classification head on the base (a reward model).
- `generates`: the trainer samples completions from the policy while training (online RL).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TrainerKind:
    name: str  # what hooks see as `trainer_kind`, and the `trl <command>` that runs it
    module: str  # where TRL defines the class
    class_name: str
    config_class: str  # its `TrainingArguments` subclass, for a trainer built without `args`
    reference: bool = False
    sequence_classification: bool = False
    generates: bool = False


KINDS = {kind.name: kind for kind in (
    TrainerKind("sft", "trl.trainer.sft_trainer", "SFTTrainer", "SFTConfig"),
    TrainerKind("dpo", "trl.trainer.dpo_trainer", "DPOTrainer", "DPOConfig", reference=True),
    TrainerKind("kto", "trl.trainer.kto_trainer", "KTOTrainer", "KTOConfig", reference=True),
    TrainerKind("reward", "trl.trainer.reward_trainer", "RewardTrainer", "RewardConfig", sequence_classification=True),
    TrainerKind("grpo", "trl.trainer.grpo_trainer", "GRPOTrainer", "GRPOConfig", reference=True, generates=True),
    TrainerKind("rloo", "trl.trainer.rloo_trainer", "RLOOTrainer", "RLOOConfig", reference=True, generates=True),
)}
SUPPORTED = ", ".join(f"{kind.class_name} (trl {name})" for name, kind in KINDS.items())


def kind_of_class(cls) -> TrainerKind | None:
    """The kind a trainer class is, or None when the strategy does not apply to it: the first TRL class in its
    method resolution order decides (a user's subclass of DPOTrainer is dpo; TRL's own subclass of a supported
    trainer, e.g. an experimental one, is not)."""
    by_class = {(kind.module, kind.class_name): kind for kind in KINDS.values()}
    for klass in cls.__mro__:
        if klass.__module__.split(".")[0] == "trl":
            return by_class.get((klass.__module__, klass.__name__))
    return None
