"""A hook file the trainer tests load with `--qlora_hooks`: what the running trainer really holds, written to
$PROBE_DIR/probe.json when training begins (after the optimizer is built) and when it ends."""

import gc
import json
import os

from transformers import PreTrainedModel, TrainerCallback

from qlora_plugin import hookimpl


def _models_in_memory() -> list[str]:
    """Every whole model object alive in this process (a model's submodules are not `PreTrainedModel`s)."""
    models = [o for o in gc.get_objects() if isinstance(o, PreTrainedModel)]
    inner = {id(m) for model in models for m in model.modules() if m is not model}
    return sorted(type(m).__name__ for m in models if id(m) not in inner)


class Probe(TrainerCallback):
    def __init__(self, trainer_kind):
        self.seen = {"trainer_kind": trainer_kind}

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.seen.update(
            optimizer_classes=[c.__name__ for c in type(getattr(optimizer, "optimizer", optimizer)).__mro__],
            adapters=sorted(model.peft_config),
            task_type=str(model.peft_config["default"].task_type),
            layers_4bit=sum(type(m).__module__.startswith("bitsandbytes") and type(m).__name__ == "Linear4bit"
                            for m in model.modules()),
            lora_layers=sorted({n.split(".")[-2] for n, _ in model.named_modules() if n.endswith(".lora_A")}),
            trainable=sorted({n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}),
            models_in_memory=_models_in_memory(),
            gradient_checkpointing=bool(getattr(args, "gradient_checkpointing", False)),
            beta=getattr(args, "beta", None),
            learning_rate=args.learning_rate,
        )

    def on_train_end(self, args, state, control, **kwargs):
        self.seen["logged"] = sorted({k for entry in state.log_history for k in entry})
        with open(os.path.join(os.environ["PROBE_DIR"], "probe.json"), "w") as f:
            json.dump(self.seen, f)


@hookimpl
def qlora_trainer_callbacks(trainer_kind):
    return [Probe(trainer_kind)]
