"""QDoRA = QLoRA + DoRA: the 4-bit NF4 base of `qlora`, with weight-decomposed LoRA adapters.

Load it by name (it ships with the package), then ask for the strategy:

    QLORA_PLUGIN_HOOKS=qdora python -m trl.scripts.sft ... --strategy qdora
    python -m trl.scripts.sft ... --qlora_hooks qdora --strategy qdora
    # YAML: qlora_hooks: [qdora] and strategy: qdora

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
