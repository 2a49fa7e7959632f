"""A strategy is a named preset of `StrategyOptions` that plugins register and hooks recognise by name."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from qlora_plugin.errors import QLoRAPluginError
from qlora_plugin.options import OPTION_NAMES


@dataclass(frozen=True)
class Strategy:
    """`--strategy NAME`. `option_defaults` override `StrategyOptions` defaults; the user's choices override both.

    `plugin` is filled in with the name of the plugin that registered it.
    """

    name: str
    description: str
    option_defaults: Mapping = field(default_factory=dict)
    plugin: str = ""

    def __post_init__(self):
        if not self.name or not self.name.replace("-", "_").isidentifier():
            raise QLoRAPluginError(f"Strategy name {self.name!r} must be a word (letters, digits, - or _).")
        unknown = sorted(set(self.option_defaults) - set(OPTION_NAMES))
        if unknown:
            raise QLoRAPluginError(f"Strategy {self.name!r} sets unknown option(s): {', '.join(unknown)}.")
        object.__setattr__(self, "option_defaults", MappingProxyType(dict(self.option_defaults)))

    @property
    def quantized(self) -> bool:
        return bool(self.option_defaults.get("load_in_4bit", True))


def unknown_strategy_error(name: str, available: list[str]) -> QLoRAPluginError:
    """The error for `--strategy NAME` that no installed plugin registers: lists them and the closest."""
    close = difflib.get_close_matches(name, available, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return QLoRAPluginError(
        f"Unknown strategy {name!r}.{hint} Available: {', '.join(sorted(available))}. "
        "`qlora-plugin strategies` lists them with their options; plugins add more."
    )
