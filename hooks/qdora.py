"""QDoRA = QLoRA + DoRA: the 4-bit NF4 base of `qlora`, with weight-decomposed LoRA adapters.

Enable it by path, then ask for it by name:

    QLORA_PLUGIN_HOOKS=hooks/qdora.py python -m trl.scripts.sft ... --strategy qdora
    python -m trl.scripts.sft ... --qlora_hooks hooks/qdora.py --strategy qdora
    # YAML: qlora_hooks: [hooks/qdora.py] and strategy: qdora

It only registers a strategy: loading, wrapping and the optimizer are the built-in hooks', driven by the options.
"""

from qlora_plugin import Strategy, hookimpl


@hookimpl
def qlora_register_strategies(register):
    register(
        Strategy(
            "qdora",
            "QDoRA: qlora's NF4 base with DoRA (weight-decomposed) adapters on every linear layer.",
            {"load_in_4bit": True, "use_dora": True},
        )
    )
