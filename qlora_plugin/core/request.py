"""What the user asked for: a strategy name, the options they set, and which training arguments they set."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StrategyRequest:
    """One activation. `options` holds only what the user set explicitly (strategy defaults fill the rest).

    `explicit_training_args` names `SFTConfig`/`ModelConfig` fields the user set on the command line or in YAML;
    the recipe never overrides those. `source` says where the strategy came from (cli, yaml, env, api).
    `model_name_or_path` is the script's `--model_name_or_path` (command line or YAML), when it has one: the model
    whose `from_pretrained` the strategy loads (see integration.model_loading). `manager` and `resolved` are the plugin
    manager, strategy and options built for this request, once (`plugin.resolution`); not part of its identity.
    """

    strategy: str
    options: dict = field(default_factory=dict)
    explicit_training_args: frozenset = frozenset()
    hook_files: tuple = ()
    source: str = "api"
    model_name_or_path: str | None = None
    manager: object = field(default=None, compare=False, repr=False)
    resolved: object = field(default=None, compare=False, repr=False)
